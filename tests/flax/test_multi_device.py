"""Batches sharded over 2 (forced host) devices give the statistics of the whole global batch, as on one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("flax")

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.getcwd())
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from flax import nnx
    import evalgap.flax as eg
    from tests.flax._reference import far_batches, linen_model, nnx_model

    mesh = Mesh(np.array(jax.devices()), ("data",))
    data_sharding, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    batches = far_batches(4)
    sharded = [(jax.device_put(x, data_sharding), jax.device_put(y, data_sharding)) for x, y in batches]
    halves = [(x[i : i + 8], y[i : i + 8]) for x, y in batches for i in (0, 8)]   # each device on its own

    def rel(a, b):
        return float(np.max(np.abs(np.asarray(a, np.float64) / np.asarray(b, np.float64) - 1)))

    model = nnx_model()
    nnx.update(model, jax.device_put(nnx.state(model), replicated))   # state replicated, as a data-parallel step keeps it
    one, per_device = nnx_model(), nnx_model()
    eg.recalibrate(model, sharded, progress=False)
    eg.recalibrate(one, batches, progress=False)
    eg.recalibrate(per_device, halves, progress=False)
    report = eg.diagnose(model, sharded, progress=False).to_dict()

    module, variables = linen_model()
    _, new = eg.recalibrate((module, jax.device_put(variables, replicated)), sharded, progress=False)
    _, new_one = eg.recalibrate((module, variables), batches, progress=False)
    print(json.dumps({
        "devices": len(jax.devices()),
        "input_sharding": str(sharded[0][0].sharding.spec),
        "written_sharding": str(model.bn3.var[...].sharding.spec), "written_devices": len(model.bn3.var[...].sharding.device_set),
        "rel": max(rel(getattr(model, n).var[...], getattr(one, n).var[...]) for n in ("bn1", "bn3")),
        "rel_mean": max(float(np.max(np.abs(np.asarray(getattr(model, n).mean[...]) - np.asarray(getattr(one, n).mean[...]))
                                     / np.sqrt(np.asarray(getattr(one, n).var[...])))) for n in ("bn1", "bn3")),
        "rel_per_device": rel(per_device.bn3.var[...], one.bn3.var[...]),
        "rel_linen": max(rel(new["batch_stats"][n]["var"], new_one["batch_stats"][n]["var"]) for n in ("bn1", "bn3")),
        "replicas": report["findings"] and [f for f in report["findings"] if f["kind"] == "replicas"],
    }))
    """
)


def test_sharded_global_batches_give_the_statistics_of_one_device():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.join(root, "src"), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, cwd=root, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["devices"] == 2 and "data" in r["input_sharding"]
    assert r["rel"] < 1e-5 and r["rel_mean"] < 1e-5 and r["rel_linen"] < 1e-5
    assert r["rel_per_device"] > 1e-3  # per-device batches would give other statistics: the pass saw the global batch
    assert r["written_devices"] == 2  # the written statistics stay replicated like the rest of the state
    assert r["replicas"] and r["replicas"][0]["numbers"]["replicas"] == 2 and r["replicas"][0]["numbers"]["synchronized"]


def test_process_collective_carries_float64_bit_for_bit():
    """Between JAX processes the shifted sums travel as uint32 pairs: float64 survives without x64 (here, 1 process)."""
    import numpy as np

    from evalgap.flax import distributed

    vector = np.array([1e300, -3.141592653589793, 1 / 3, 2.0**-1074, 123456789.123456789])
    c = distributed.ProcessCollective()
    assert c.world == 1 and c.rank == 0
    assert c.sum(vector).tobytes() == vector.tobytes()
    assert c.broadcast(vector).tobytes() == vector.tobytes()
    assert distributed.collective(np.ones((4, 2))) is None  # one process: nothing to combine
