"""recalibrate and diagnose under keras.distribution.DataParallel on 2 forced host devices (JAX)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import pytest

pytestmark = pytest.mark.skipif(keras.backend.backend() != "jax", reason="keras.distribution.DataParallel is JAX's")

SCRIPT = textwrap.dedent(
    """
    import json, os
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, keras, numpy as np
    import evalgap.keras as eg

    def make():
        keras.utils.set_random_seed(0)
        inp = keras.Input((6, 6, 3))
        h = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3)(inp))
        m = keras.Model(inp, keras.layers.Dense(2)(keras.layers.Flatten()(h)))
        m.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        return m

    x = np.random.default_rng(0).normal(100, 20, (64, 6, 6, 3)).astype("float32")
    y = np.arange(64) % 2
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
    m = make()
    m.fit(x, y, batch_size=16, epochs=1, verbose=0)
    sharded = str(m.layers[2].moving_variance.value.sharding)
    eg.recalibrate(m, x, batch_size=16, progress=False)
    report = eg.diagnose(m, (x, y), batch_size=16, progress=False).to_dict()
    keras.distribution.set_distribution(None)
    plain = make()
    plain.set_weights(m.get_weights())
    eg.recalibrate(plain, x, batch_size=16, progress=False)
    print(json.dumps({
        "devices": len(jax.devices()), "sharding": sharded,
        "rel": float(np.max(np.abs(m.layers[2].moving_variance.numpy() / plain.layers[2].moving_variance.numpy() - 1))),
        "stale": report["metrics"]["accuracy"]["terms"]["stale_moving_statistics"],
    }))
    """
)


def test_data_parallel_gives_the_statistics_of_one_device():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["devices"] == 2 and "batch" in r["sharding"]
    assert r["rel"] < 1e-6
    assert abs(r["stale"]) < 1e-9  # after recalibration the moving statistics are the population's
