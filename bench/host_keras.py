"""Host work of evalgap.keras.recalibrate against a compiled training-mode forward, on JAX.

On a GPU, a JAX forward over host-resident batches waits on the host (the H200 run of 2026-11-28:
Keras on JAX recalibrated at 1.86x a forward), so every millisecond of host work per call or per
batch is wall time there. This measures the host work alone on any machine: this thread's CPU
time (``time.thread_time``; XLA's own threads and the wait for them are not counted), minimum of
15 runs, for K batches; K=1 gives the fixed cost per call, a larger K adds the cost per batch.

    S=32 B=2 K=8 PYTHONPATH=<checkout>/src python bench/host_keras.py
"""
import os
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import evalgap.keras as eg  # noqa: E402

keras.utils.set_random_seed(0)
S, B, K = (int(os.environ.get(k, d)) for k, d in (("S", "32"), ("B", "2"), ("K", "8")))
model = keras.applications.ResNet50(weights=None, input_shape=(S, S, 3), classes=21)
rng = np.random.default_rng(0)
xs = [rng.uniform(0, 255, (B, S, S, 3)).astype("float32") for _ in range(K)]
fwd = jax.jit(lambda tv, ntv, x: model.stateless_call(tv, ntv, x, training=True)[0])


def base():
    tv = [v.value for v in model.trainable_variables]
    ntv = [v.value for v in model.non_trainable_variables]
    jax.block_until_ready([fwd(tv, ntv, x) for x in xs])


def ours():
    eg.recalibrate(model, xs, progress=False)


ours()
base()
# thread CPU time: host work only (waiting for XLA's threads costs none of this thread's time)
res = {}
for name, f in (("base", base), ("ours", ours)):
    ts = []
    for _ in range(15):
        t = time.thread_time()
        f()
        ts.append(time.thread_time() - t)
    res[name] = min(ts)
print(f"host ms per call: base {1e3 * res['base']:.1f}  ours {1e3 * res['ours']:.1f}  extra {1e3 * (res['ours'] - res['base']):.1f} ({K} batches)")
