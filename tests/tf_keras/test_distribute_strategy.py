"""Keras 2 under tf.distribute: MirroredStrategy on 2 logical CPUs, MultiWorkerMirroredStrategy with 2 local workers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

def _mirrored_pair():
    import tensorflow as tf
    import tf_keras as keras

    def make():
        keras.utils.set_random_seed(0)
        inp = keras.Input((8, 8, 3))
        h = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3)(inp))  # fused
        h = keras.layers.BatchNormalization(virtual_batch_size=4)(keras.layers.Conv2D(4, 1)(h))
        h = keras.layers.BatchNormalization()(keras.layers.Dense(5)(keras.layers.Flatten()(h)))
        m = keras.Model(inp, keras.layers.Dense(3)(h))
        m.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        return m

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        mirrored = make()
    return strategy, mirrored, make()


def test_mirrored_strategy_gives_the_statistics_of_one_device_on_every_replica():
    import tensorflow as tf

    import evalgap.tf_keras as eg

    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("needs 2 logical CPU devices, configured by conftest before TensorFlow starts (run tests/tf_keras alone)")
    rng = np.random.default_rng(0)
    x = rng.normal(100, 30, (64, 8, 8, 3)).astype("float32")
    y = np.arange(64) % 3
    strategy, mirrored, plain = _mirrored_pair()
    mirrored.fit(x, y, batch_size=32, epochs=1, verbose=0)  # each replica updates its own moving statistics
    plain.set_weights(mirrored.get_weights())
    bn_m = [bn for _, bn in eg.find_batchnorms(mirrored)]
    bn_p = [bn for _, bn in eg.find_batchnorms(plain)]
    assert not np.array_equal(*(v.numpy() for v in bn_m[0].moving_variance.values))  # the replicas' copies differ
    # each replica normalizes its half of a batch of 16, as fit does: one device over the same halves, batches of 8
    r_m = eg.recalibrate(mirrored, x, batch_size=16, shuffle=False, progress=False)
    r_p = eg.recalibrate(plain, x, batch_size=8, shuffle=False, progress=False)
    assert strategy.num_replicas_in_sync == 2 and r_m.samples == r_p.samples == 64
    for a, b in zip(bn_m, bn_p):
        np.testing.assert_allclose(a.moving_variance.numpy(), b.moving_variance.numpy(), rtol=1e-6)
        np.testing.assert_allclose(a.moving_mean.numpy(), b.moving_mean.numpy(), atol=1e-5 * np.sqrt(b.moving_variance.numpy().max()))
        for v in (a.moving_mean, a.moving_variance):  # the write set every replica's copy
            np.testing.assert_array_equal(*(part.numpy() for part in v.values))
    replicas = eg.diagnose(mirrored, (x, y), batch_size=16, progress=False).finding("replicas")
    assert replicas is not None and replicas.numbers == {"replicas": 2, "per_replica_batch": 8, "synchronized": False}
    evaluated = [m.evaluate(x, y, batch_size=16, verbose=0)[0] for m in (mirrored, plain)]
    assert abs(evaluated[0] - evaluated[1]) < 1e-4  # evaluation (per replica) agrees with the plain model


def test_distributed_dataset_batches_are_the_global_batches_they_split():
    """``strategy.experimental_distribute_dataset(ds)``, as Keras 2's ``fit`` takes it: each PerReplica batch is joined
    into the global batch it splits, replicas in order (as evalgap.keras does)."""
    import tensorflow as tf

    import evalgap.tf_keras as eg

    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("needs 2 logical CPU devices, configured by conftest before TensorFlow starts (run tests/tf_keras alone)")
    rng = np.random.default_rng(1)
    x = rng.normal(100, 30, (64, 8, 8, 3)).astype("float32")
    y = np.arange(64) % 3
    strategy, mirrored, plain = _mirrored_pair()
    mirrored.fit(x, y, batch_size=32, epochs=1, verbose=0)
    plain.set_weights(mirrored.get_weights())
    ds_xy = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    dds_xy = strategy.experimental_distribute_dataset(ds_xy)
    e = eg.diagnose(mirrored, dds_xy, progress=False).decompositions["loss"].values["E"]
    evaluated = mirrored.evaluate(dds_xy, steps=4, verbose=0, return_dict=True)["loss"]  # Keras 2 needs steps here
    assert e == pytest.approx(evaluated, rel=1e-5, abs=1e-6)
    bns = [bn for _, bn in eg.find_batchnorms(mirrored)]
    r_ds = eg.recalibrate(mirrored, ds_xy, progress=False)  # the dataset it distributes: the same global batches
    from_ds = [(bn.moving_mean.numpy(), bn.moving_variance.numpy()) for bn in bns]
    r_d = eg.recalibrate(mirrored, dds_xy, progress=False)
    r_p = eg.recalibrate(plain, ds_xy, progress=False)  # one process over the same global batches, in order
    assert r_d.samples == r_ds.samples == r_p.samples == 64 and r_d.batches == r_ds.batches == r_p.batches == 4
    for bn, (mean, var) in zip(bns, from_ds):
        np.testing.assert_allclose(bn.moving_variance.numpy(), var, rtol=1e-6)
        np.testing.assert_allclose(bn.moving_mean.numpy(), mean, atol=1e-5 * np.sqrt(var.max()))
        for v in (bn.moving_mean, bn.moving_variance):  # every replica's copy
            np.testing.assert_array_equal(*(part.numpy() for part in v.values))
    first, one = bns[0], eg.find_batchnorms(plain)[0][1]  # its inputs depend on no BatchNorm: one process's statistics
    np.testing.assert_allclose(first.moving_variance.numpy(), one.moving_variance.numpy(), rtol=1e-6)
    np.testing.assert_allclose(first.moving_mean.numpy(), one.moving_mean.numpy(), atol=1e-5 * np.sqrt(one.moving_variance.numpy().max()))


WORKER = textwrap.dedent(
    """
    import json, os, sys
    rank, ports, out = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3]
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": rank}})
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import tensorflow as tf
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import numpy as np, tf_keras as keras
    import evalgap.tf_keras as eg
    sys.path.insert(0, os.path.dirname(out))
    from mw_common import make, data, labels
    with strategy.scope():
        model = make()
    np.savez(os.path.join(out, f"weights{rank}.npz"), *model.get_weights())
    report = eg.diagnose(model, (data(rank), labels(rank)), batch_size=8, shuffle=False, progress=False).to_dict()
    with strategy.scope():  # inside the scope too (Keras 2's fit runs its callbacks there): the same numbers
        inside = eg.diagnose(model, (data(rank), labels(rank)), batch_size=8, shuffle=False, progress=False).to_dict()
    inside = {k: v["values"] for k, v in inside["metrics"].items()}
    r = eg.recalibrate(model, data(rank), batch_size=8, shuffle=False, progress=False)
    bns = [bn for _, bn in eg.find_batchnorms(model)]
    json.dump({"stats": [[bn.moving_mean.numpy().tolist(), bn.moving_variance.numpy().tolist()] for bn in bns],
               "samples": r.samples, "batches": r.batches, "inside": inside, "modes": {k: v["values"] for k, v in report["metrics"].items()}},
              open(os.path.join(out, f"w{rank}.json"), "w"))
    """
)

COMMON = textwrap.dedent(
    """
    import tf_keras as keras, numpy as np

    def make():
        keras.utils.set_random_seed(0)
        inp = keras.Input((6, 6, 3))
        h = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3)(inp))
        h = keras.layers.BatchNormalization()(keras.layers.Dense(5)(keras.layers.Flatten()(h)))
        m = keras.Model(inp, keras.layers.Dense(2)(h))
        m.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy", keras.metrics.MeanIoU(num_classes=2, sparse_y_pred=False)])  # IoU: not a mean over workers
        return m

    def data(rank):  # different data and an uneven number of batches per worker
        g = np.random.default_rng(100 + rank)
        return (g.normal(0, 20, (24 if rank == 0 else 40, 6, 6, 3)) + (200 if rank == 0 else -50)).astype("float32")

    def labels(rank):  # class mixes that differ between the workers
        g = np.random.default_rng(200 + rank)
        return (g.random(24 if rank == 0 else 40) < (0.3 if rank == 0 else 0.7)).astype("int64")
    """
)


def _ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_two_workers_equal_one_process_over_the_union(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "mw_common.py").write_text(COMMON)
    ports = ",".join(map(str, _ports(2)))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_USE_LEGACY_KERAS="1", PYTHONPATH=str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), ports, str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for p in procs:
        try:
            _, err = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("multi-worker recalibration did not finish in 240 s")
        assert p.returncode == 0, err[-3000:]
    w0, w1 = (json.loads((out / f"w{r}.json").read_text()) for r in (0, 1))
    assert w0 == w1 and w0["samples"] == 64 and w0["batches"] == 8  # identical on both workers, all data counted
    assert w0["inside"] == w0["modes"]

    import importlib.util

    spec = importlib.util.spec_from_file_location("mw_common", tmp_path / "mw_common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    import evalgap.tf_keras as eg

    single = common.make()
    weights = np.load(out / "weights0.npz")
    single.set_weights([weights[f"arr_{i}"] for i in range(len(weights.files))])
    x, y = np.concatenate([common.data(0), common.data(1)]), np.concatenate([common.labels(0), common.labels(1)])
    # diagnose: every worker's metrics over the union of the data, E as one process's evaluate gives it (the workers'
    # batches, in order: 3 from worker 0, 5 from worker 1), every mode as one process's diagnosis
    evaluated = single.evaluate(x, y, batch_size=8, verbose=0, return_dict=True)
    by_one = eg.diagnose(single, (x, y), batch_size=8, shuffle=False, progress=False).to_dict()["metrics"]
    assert set(w0["modes"]) == set(evaluated)
    for key, value in evaluated.items():
        assert w0["modes"][key]["E"] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        for mode, mine in by_one[key]["values"].items():
            assert w0["modes"][key][mode] == pytest.approx(mine, rel=1e-5, abs=1e-6), (key, mode)
    eg.recalibrate(single, np.concatenate([common.data(0), common.data(1)]), batch_size=8, shuffle=False, progress=False)
    for (mean, var), (_, bn) in zip(w0["stats"], eg.find_batchnorms(single)):
        np.testing.assert_allclose(var, bn.moving_variance.numpy(), rtol=1e-5)
        np.testing.assert_allclose(mean, bn.moving_mean.numpy(), rtol=1e-5, atol=1e-5 * np.sqrt(np.max(var)))
