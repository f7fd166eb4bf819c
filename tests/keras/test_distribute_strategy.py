"""recalibrate under a tf.distribute.MirroredStrategy scope (2 logical CPU devices)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import pytest

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.distribute needs the TensorFlow backend")

SCRIPT = textwrap.dedent(
    """
    import json, os
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np, keras
    import evalgap.keras as eg

    def make():
        keras.utils.set_random_seed(0)
        inp = keras.Input((8, 8, 3))
        h = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3)(inp))
        h = keras.layers.BatchNormalization()(keras.layers.Dense(5)(keras.layers.Flatten()(h)))
        m = keras.Model(inp, keras.layers.Dense(3)(h))
        m.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return m

    rng = np.random.default_rng(0)
    x = rng.normal(100, 30, (64, 8, 8, 3)).astype("float32")
    y = np.arange(64) % 3
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        mirrored = make()
    plain = make()
    mirrored.fit(x, y, batch_size=32, epochs=1, verbose=0)
    plain.set_weights(mirrored.get_weights())
    # fit's replicas normalize 8 + 8 of each batch of 16 on their own batch statistics, and so does the pass: the
    # plain model's batches are those halves (in order; deeper layers' inputs depend on how upstream ones normalized)
    r_m = eg.recalibrate(mirrored, x, batch_size=16, shuffle=False, progress=False)
    r_p = eg.recalibrate(plain, x, batch_size=8, shuffle=False, progress=False)
    replicas = eg.diagnose(mirrored, (x, y), batch_size=16, progress=False).finding("replicas")
    bn_m = [bn for _, bn in eg.find_batchnorms(mirrored)]
    bn_p = [bn for _, bn in eg.find_batchnorms(plain)]
    evaluated = [mirrored.evaluate(x, y, verbose=0), plain.evaluate(x, y, verbose=0)]
    max_rel_var = max(float(np.max(np.abs(a.moving_variance.numpy() / b.moving_variance.numpy() - 1))) for a, b in zip(bn_m, bn_p))
    max_abs_mean = max(float(np.max(np.abs(a.moving_mean.numpy() - b.moving_mean.numpy()))) for a, b in zip(bn_m, bn_p))
    # the same data as fit takes it from a strategy: PerReplica batches, made global ones (all 64 samples again)
    for a in bn_m:
        a.moving_mean.assign(a.moving_mean.numpy() * 0); a.moving_variance.assign(a.moving_variance.numpy() * 0 + 1)
    dds = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices(x).batch(16))
    r_d = eg.recalibrate(mirrored, dds, progress=False)
    eg.recalibrate(plain, x, batch_size=8, shuffle=False, progress=False)  # the same batches' replica halves, in order
    dds_xy = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((x, y)).batch(16))
    e_d = eg.diagnose(mirrored, dds_xy, progress=False).decompositions["loss"].values["E"]
    try:  # inside the scope Keras scales every loss by 1 / replicas: the loss read half of evaluate's
        with strategy.scope():
            inside = eg.diagnose(mirrored, (x, y), batch_size=16, progress=False).decompositions["loss"].values["E"]
    except Exception as exc:
        inside = f"{type(exc).__name__}: {exc}"
    print(json.dumps({
        "inside_scope": inside,
        "distributed_dataset": {
            "samples": r_d.samples, "e": e_d, "evaluate": mirrored.evaluate(dds_xy, verbose=0),
            "max_rel_var": max(float(np.max(np.abs(a.moving_variance.numpy() / b.moving_variance.numpy() - 1))) for a, b in zip(bn_m, bn_p)),
        },
        "replicas": strategy.num_replicas_in_sync,
        "max_rel_var": max_rel_var,
        "max_abs_mean": max_abs_mean,
        "eval": evaluated,
        "samples": [r_m.samples, r_p.samples],
        "replicas_finding": None if replicas is None else replicas.numbers,
    }))
    """
)


def test_same_statistics_with_and_without_mirrored_strategy():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    assert result["samples"] == [64, 64]
    assert result["max_rel_var"] < 1e-6 and result["max_abs_mean"] < 1e-4
    # diagnose names per-replica BatchNorm with the per-replica batch size
    assert result["replicas_finding"] == {"replicas": 2, "per_replica_batch": 8, "synchronized": False}
    # every replica got the statistics: evaluation (run per replica) agrees with the plain model
    assert abs(result["eval"][0] - result["eval"][1]) < 1e-4
    # strategy.experimental_distribute_dataset: its PerReplica batches are the global batches they split
    dd = result["distributed_dataset"]
    assert dd["samples"] == 64 and dd["max_rel_var"] < 1e-6
    assert str(result["inside_scope"]).startswith("DataError") and "outside the scope" in result["inside_scope"]
    assert abs(dd["e"] - dd["evaluate"]) < 1e-5 * max(1.0, abs(dd["evaluate"]))


COPIES = textwrap.dedent(
    """
    import json, os, sys
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np
    if os.environ.get("TF_USE_LEGACY_KERAS") == "1":
        import tf_keras as keras, evalgap.tf_keras as eg
    else:
        import keras, evalgap.keras as eg
    rng = np.random.default_rng(0)
    x = rng.normal(5, 3, (64, 6)).astype("float32")
    y = (x[:, 0] > 5).astype("int32")
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        keras.utils.set_random_seed(0)
        inp = keras.Input((6,))
        h = keras.layers.BatchNormalization(momentum=0.9)(keras.layers.Dense(8)(inp))
        m = keras.Model(inp, keras.layers.Dense(2)(h))
        m.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    m.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=True)  # each replica updates its own copy
    # the batch sizes evaluate splits into equal shares, and a ragged one: Keras 2 splits 7 as 4 + 3 (and the last
    # 64 % 7 = 1 as 1 + 0); Keras 3's evaluate fails on unequal shares, so 10 (5 + 5, the last 4 as 2 + 2)
    sizes = [64, 7] if os.environ.get("TF_USE_LEGACY_KERAS") == "1" else [64, 10]
    with tf.device("/cpu:0"):  # the one-set reading of the same weights: a plain model holding one replica's copy
        plain = keras.models.clone_model(m)
        plain.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        plain.set_weights(m.get_weights())

    def run():
        out = {"notes": [], "e": [], "evaluate": [], "plain": []}
        for size in sizes:
            report = eg.diagnose(m, (x, y), batch_size=size, shuffle=False, progress=False)
            out["e"].append(report.decompositions["loss"].values["E"])
            out["evaluate"].append(float(m.evaluate(x, y, batch_size=size, verbose=0)))
            out["plain"].append(float(plain.evaluate(x, y, batch_size=size, verbose=0)))
            out["notes"] += [n for n in report.notes if "copies of the moving statistics" in n]
        return out

    before = run()
    eg.recalibrate(m, x, batch_size=16, progress=False)
    print(json.dumps({"before": before, "after": run()}))
    """
)


@pytest.mark.parametrize("legacy", ["0", "1"], ids=["keras3", "tf_keras"])
def test_replicas_with_different_copies_of_the_moving_statistics_are_said(legacy):
    """After fit under a MirroredStrategy each replica holds its own copy of the moving statistics and evaluate
    normalizes each replica's share of a batch with its own copy: E does the same, so it equals evaluate (it used one
    copy and differed: the one-set reading, a plain model holding it, is checked to differ), on equal and ragged
    shares; the report says how far apart the copies are; after recalibrate they agree and the note goes."""
    if legacy == "1":
        pytest.importorskip("tf_keras")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_USE_LEGACY_KERAS=legacy)
    out = subprocess.run([sys.executable, "-c", COPIES], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    before, after = result["before"], result["after"]
    assert all(abs(p - v) > 1e-3 for p, v in zip(before["plain"], before["evaluate"]))  # one copy alone is not evaluate
    for run in (before, after):
        for e, evaluated in zip(run["e"], run["evaluate"]):
            assert abs(e - evaluated) < 1e-5 * max(1.0, abs(evaluated))
    assert len(before["notes"]) == 2 and "recalibrate writes one exact set" in before["notes"][0]
    assert after["notes"] == []


SHARES = textwrap.dedent(
    """
    import json, os
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np, keras
    import evalgap.keras as eg

    def make():
        keras.utils.set_random_seed(0)
        inp = keras.Input((6, 6, 2))
        h = keras.layers.BatchNormalization()(keras.layers.Conv2D(3, 3)(inp))
        h = keras.layers.BatchNormalization()(keras.layers.Dense(4)(keras.layers.Flatten()(h)))
        m = keras.Model(inp, keras.layers.Dense(3)(h))
        m.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        return m

    rng = np.random.default_rng(0)
    size, b = 45, 15  # 3 batches of 15, each split 8 + 7 between the replicas
    x = rng.normal(2, 1, (size, 6, 6, 2)).astype("float32")
    x[np.arange(size) % b >= 8] *= 3.0  # the two replicas' shares of a batch differ
    y = rng.integers(0, 3, size)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        mirrored = make()
    plain = make()
    plain.set_weights(mirrored.get_weights())
    shares = [slice(s, min(s + 8, s + b)) for s in range(0, size, b)] + [slice(s + 8, s + b) for s in range(0, size, b)]
    shares.sort(key=lambda s: s.start)

    # the reference: Keras's own training call of a plain copy on each replica's share, over all samples
    logits = np.concatenate([np.asarray(plain(x[s], training=True), np.float64) for s in shares])
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    ref_loss = float(-np.mean(logp[np.arange(size), y]))
    ref_acc = float(np.mean(logits.argmax(1) == y))
    ref_stats = []
    for bn in [bn for _, bn in eg.find_batchnorms(plain)]:
        sub = keras.Model(plain.inputs, bn.input)
        inputs = np.concatenate([np.asarray(sub(x[s], training=True), np.float64).reshape(-1, bn.input.shape[-1]) for s in shares])
        ref_stats.append((inputs.mean(0), inputs.var(0)))

    report = eg.diagnose(mirrored, (x, y), batch_size=b, shuffle=False, progress=False)
    result = eg.recalibrate(mirrored, x, batch_size=b, shuffle=False, progress=False)
    written = [(bn.moving_mean.numpy(), bn.moving_variance.numpy()) for _, bn in eg.find_batchnorms(mirrored)]
    print(json.dumps({
        "ref": {"loss": ref_loss, "accuracy": ref_acc},
        "modes": {name: {m: report.decompositions[name].values[m] for m in ("Td", "T")} for name in ("loss", "accuracy")},
        "max_rel_mean": max(float(np.max(np.abs(w[0] - r[0]) / (np.abs(r[0]) + np.sqrt(r[1])))) for w, r in zip(written, ref_stats)),
        "max_rel_var": max(float(np.max(np.abs(w[1] / r[1] - 1))) for w, r in zip(written, ref_stats)),
        "samples": result.samples,
        "calls_per_batch": [layer.calls_per_batch for layer in result.layers],
    }))
    """
)


def test_training_mode_runs_each_replica_share_on_its_own_batch_statistics():
    """Under a MirroredStrategy (BN not synchronized) fit normalizes each replica's share of a batch (8 + 7 of 15
    here) by its own batch statistics: Td, T and the statistics recalibrate writes do the same, equal to Keras's own
    training call of a plain copy on each share (not to one call on the whole batch)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", SHARES], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for name, values in result["modes"].items():
        for mode in ("Td", "T"):
            assert values[mode] == pytest.approx(result["ref"][name], rel=1e-5), (name, mode, result)
    assert result["max_rel_mean"] < 1e-5 and result["max_rel_var"] < 1e-5, result
    assert result["samples"] == 45 and result["calls_per_batch"] == [1, 1]  # the shares pooled: no "shared layer"
