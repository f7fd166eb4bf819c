"""An independent reference for the Keras tests: eager training-mode forward, raw inputs captured."""

from __future__ import annotations

import keras
import numpy as np


def snapshot(model) -> dict[str, bytes]:
    """Every variable of the model (and its optimizer, if built), as bytes, by path."""
    out = {v.path: np.asarray(v.numpy()).tobytes() for v in model.variables}
    opt = getattr(model, "optimizer", None)
    if opt is not None and getattr(opt, "built", False):
        out.update({"optimizer/" + v.path: np.asarray(v.numpy()).tobytes() for v in opt.variables})
    return out


def layer_state(model) -> dict[str, tuple]:
    return {
        layer.path if hasattr(layer, "path") else layer.name: (layer.trainable, getattr(layer, "momentum", None))
        for layer in model._flatten_layers(include_self=False)
    }


def reference_stats(model, batches, bn_layers) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Run ``model(x, training=True)`` eagerly with dropout rates set to 0, record each BN
    layer's raw input, then NumPy float64 moments over the concatenation. Every variable
    is restored afterwards."""
    saved = [(v, v.numpy()) for v in model.variables]
    dropouts = [(layer, layer.rate) for layer in model._flatten_layers() if isinstance(layer, keras.layers.Dropout)]
    records: dict[int, list[np.ndarray]] = {id(bn): [] for bn in bn_layers}
    originals = []
    for bn in bn_layers:
        orig = bn.call

        def call(inputs, training=None, mask=None, _orig=orig, _bn=bn):
            records[id(_bn)].append(np.asarray(keras.ops.convert_to_numpy(inputs), dtype=np.float64))
            return _orig(inputs, training=training, mask=mask)

        originals.append((bn, bn.__dict__.get("call")))
        bn.call = call
    try:
        for layer, _ in dropouts:
            layer.rate = 0.0
        for x in batches:
            model(x, training=True)
    finally:
        for layer, rate in dropouts:
            layer.rate = rate
        for bn, orig in originals:
            bn.__dict__.pop("call", None)
            if orig is not None:
                bn.call = orig
        for v, value in saved:
            v.assign(value)
    out = {}
    for bn in bn_layers:
        xs = records[id(bn)]
        axis = bn.axis
        flat = np.concatenate([np.moveaxis(a, axis, -1).reshape(-1, a.shape[axis]) for a in xs])
        out[id(bn)] = (flat.mean(axis=0), flat.var(axis=0))
    return out


def assert_close_to_reference(bn, ref, rtol=1e-5):
    mean, var = ref
    got_mean = np.asarray(bn.moving_mean.numpy(), dtype=np.float64)
    got_var = np.asarray(bn.moving_variance.numpy(), dtype=np.float64)
    np.testing.assert_array_less(np.abs(got_mean - mean) / np.sqrt(var), rtol, err_msg=f"{bn.name} mean")
    np.testing.assert_allclose(got_var, var, rtol=rtol, err_msg=f"{bn.name} var")
