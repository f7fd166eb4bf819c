"""An independent reference for the Keras 2 tests: eager training-mode forward, raw inputs captured."""

from __future__ import annotations

import numpy as np
import tf_keras as keras

#: Attributes evalgap patches on layer instances during a pass; none may remain afterwards.
PATCHED = ("call", "_moments", "add_update", "add_metric", "_assign_moving_average", "_assign_new_value")


def snapshot(model) -> list[tuple[str, bytes]]:
    """Every variable of the model (and its optimizer, if built), as bytes, in order."""
    out = [(v.name, np.asarray(v.numpy()).tobytes()) for v in model.variables]
    opt = getattr(model, "optimizer", None)
    if opt is not None and getattr(opt, "variables", None):
        out += [("optimizer/" + v.name, np.asarray(v.numpy()).tobytes()) for v in opt.variables]
    return out


def changed(before, after) -> set[str]:
    assert [name for name, _ in before] == [name for name, _ in after]
    return {name for (name, a), (_, b) in zip(before, after) if a != b}


def layer_state(model) -> list[tuple]:
    """Per layer: trainable, momentum, and which attributes its instance holds (patches leave none behind)."""
    return [
        (layer.name, layer.trainable, getattr(layer, "momentum", None), sorted(k for k in PATCHED if k in layer.__dict__))
        for layer in model._flatten_layers(include_self=False)
    ]


def reference_stats(model, batches, bn_layers) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Run ``model(x, training=True)`` eagerly with dropout rates set to 0, record each BN
    layer's raw input, then NumPy float64 moments over the concatenation (channels last).
    Every variable is restored after each batch (fixed weights and statistics, as in the pass)."""
    saved = [(v, v.numpy()) for v in model.variables]
    dropouts = [(layer, layer.rate) for layer in model._flatten_layers() if isinstance(layer, keras.layers.Dropout)]
    records: dict[int, list[np.ndarray]] = {id(bn): [] for bn in bn_layers}
    for bn in bn_layers:
        orig = type(bn).call

        def call(inputs, training=None, mask=None, _orig=orig, _bn=bn):
            records[id(_bn)].append(np.asarray(inputs, dtype=np.float64))
            return _orig(_bn, inputs, training=training, mask=mask)

        bn.__dict__["call"] = call
    try:
        for layer, _ in dropouts:
            layer.rate = 0.0
        for x in batches:
            model(x, training=True)
            for v, value in saved:
                v.assign(value)
    finally:
        for layer, rate in dropouts:
            layer.rate = rate
        for bn in bn_layers:
            bn.__dict__.pop("call", None)
        for v, value in saved:
            v.assign(value)
    out = {}
    for bn in bn_layers:
        flat = np.concatenate([a.reshape(-1, a.shape[-1]) for a in records[id(bn)]])
        out[id(bn)] = (flat.mean(axis=0), flat.var(axis=0))
    return out


def assert_close_to_reference(bn, ref, rtol=1e-5):
    mean, var = ref
    got_mean = np.asarray(bn.moving_mean.numpy(), dtype=np.float64).reshape(-1)
    got_var = np.asarray(bn.moving_variance.numpy(), dtype=np.float64).reshape(-1)
    np.testing.assert_array_less(np.abs(got_mean - mean) / np.sqrt(var), rtol, err_msg=f"{bn.name} mean")
    np.testing.assert_allclose(got_var, var, rtol=rtol, err_msg=f"{bn.name} var")
