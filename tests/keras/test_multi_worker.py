"""recalibrate and diagnose under MultiWorkerMirroredStrategy: 2 local workers over 127.0.0.1 (TF_CONFIG)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.distribute needs the TensorFlow backend")

WORKER = textwrap.dedent(
    """
    import json, os, sys
    rank, ports, out = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3]
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": rank}})
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import tensorflow as tf
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import numpy as np, keras
    import evalgap, evalgap.keras as eg
    sys.path.insert(0, os.path.dirname(out))
    from mw_common import make, data, labels
    with strategy.scope():
        model = make()
    np.savez(os.path.join(out, f"weights{rank}.npz"), *model.get_weights())
    report = eg.diagnose(model, (data(rank), labels(rank)), batch_size=8, shuffle=False, progress=False).to_dict()
    try:  # inside the scope Keras scales every loss by 1 / replicas: refused on every worker, no one left waiting
        with strategy.scope():
            eg.diagnose(model, (data(rank), labels(rank)), batch_size=8, shuffle=False, progress=False)
        inside = "ran"
    except evalgap.DataError as exc:
        inside = str(exc)
    r = eg.recalibrate(model, data(rank), batch_size=8, shuffle=False, progress=False)
    bns = [bn for _, bn in eg.find_batchnorms(model)]
    json.dump({"stats": [[bn.moving_mean.numpy().tolist(), bn.moving_variance.numpy().tolist()] for bn in bns],
               "samples": r.samples, "batches": r.batches, "inside": inside, "modes": {k: v["values"] for k, v in report["metrics"].items()}},
              open(os.path.join(out, f"w{rank}.json"), "w"))
    """
)

COMMON = textwrap.dedent(
    """
    import keras, numpy as np

    def make():
        keras.utils.set_random_seed(0)
        inp = keras.Input((6, 6, 3))
        h = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3)(inp))
        h = keras.layers.BatchNormalization()(keras.layers.Dense(5)(keras.layers.Flatten()(h)))
        m = keras.Model(inp, keras.layers.Dense(2)(h))
        m.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy", keras.metrics.MeanIoU(num_classes=2, sparse_y_pred=False)])  # IoU: not a mean over workers
        return m

    def data(rank):  # different classes and an uneven number of batches per worker
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
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
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
    assert "outside the scope" in w0["inside"]

    import importlib.util

    spec = importlib.util.spec_from_file_location("mw_common", tmp_path / "mw_common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    import evalgap.keras as eg

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
    eg.recalibrate(single, np.concatenate([common.data(0), common.data(1)]), batch_size=8, shuffle=False, progress=False)  # the workers' batches
    for (mean, var), (_, bn) in zip(w0["stats"], eg.find_batchnorms(single)):
        np.testing.assert_allclose(var, bn.moving_variance.numpy(), rtol=1e-5)
        np.testing.assert_allclose(mean, bn.moving_mean.numpy(), rtol=1e-5, atol=1e-5 * np.sqrt(np.max(var)))
