"""Cost of diagnose relative to one evaluation pass over the same data (target: <= 3.5x).

Keras (each backend in its own process): ``keras.applications.ResNet50(weights=None)``,
compiled with Adam, sparse categorical cross-entropy and accuracy; ``evalgap.keras.diagnose``
over N arrays with batch B divided by ``model.evaluate`` over the same arrays and batch size.
PyTorch: the same-shaped ResNet50 (``bench/_torch_resnet.py``); ``evalgap.torch.diagnose``
over the batches divided by a plain eval loop (``model.eval()``, ``no_grad``, cross-entropy
and accuracy). Keras 2 (``tf_keras``): as Keras, ``evalgap.tf_keras.diagnose``. Flax NNX: the
ResNet-18 of ``bench/recalibrate_flax.py`` against a jitted eval-mode loop with optax's
cross-entropy and the accuracy. Median of R warm runs, interleaved; the first diagnose's extra time
(tracing/compilation) is reported separately. ``--dropout`` adds a Dropout layer before the
head, so the full training mode T is measured too (one more pass).

    python bench/diagnose.py [--frameworks torch,tensorflow,jax,keras-torch,tf_keras,flax] [--samples 128] [--batch-size 16] [--image-size 64] [--runs 3] [--dropout]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _timed(fns: dict, runs: int) -> dict:
    times: dict = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def keras_child(args) -> dict:
    import keras

    import evalgap.keras as eg

    return _keras_case(args, keras, eg, f"keras/{keras.backend.backend()}")


def tf_keras_child(args) -> dict:
    """Keras 2 (``tf_keras``): the same ResNet50 and compile, ``evalgap.tf_keras.diagnose``."""
    import tf_keras as keras

    import evalgap.tf_keras as eg

    return _keras_case(args, keras, eg, f"tf_keras/{keras.__version__}")


def _keras_case(args, keras, eg, framework: str) -> dict:
    import numpy as np

    keras.utils.set_random_seed(0)
    size = args.image_size
    inp = keras.Input((size, size, 3))
    h = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(size, size, 3), pooling="avg")(inp)
    if args.dropout:
        h = keras.layers.Dropout(0.3)(h)
    model = keras.Model(inp, keras.layers.Dense(21, activation="softmax")(h))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (args.samples, size, size, 3)).astype("float32")
    y = rng.integers(0, 21, args.samples)

    def evaluate():
        model.evaluate(x, y, batch_size=args.batch_size, verbose=0)

    def diagnose():
        eg.diagnose(model, (x, y), batch_size=args.batch_size, progress=False)

    t = time.perf_counter()
    diagnose()
    first = time.perf_counter() - t
    evaluate()
    med = _timed({"evaluate": evaluate, "diagnose": diagnose}, args.runs)
    return {"framework": framework, **med, "first_extra": first - med["diagnose"]}


def flax_child(args) -> dict:
    """Flax NNX: the ResNet-18 of ``bench/recalibrate_flax.py`` (BatchNorm after every convolution);
    baseline: a jitted eval-mode forward with optax's cross-entropy and the accuracy, summed per batch."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    sys.path.insert(0, os.path.dirname(__file__))
    from recalibrate_flax import ResNet18

    import evalgap.flax as eg

    model = nnx.jit(lambda: ResNet18(nnx.Rngs(0)))()
    if args.dropout:
        raise SystemExit("--dropout: the Flax case has no dropout variant")
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (args.samples, args.image_size, args.image_size, 3)).astype("float32")
    y = rng.integers(0, 21, args.samples).astype("int32")
    batches = [(x[i : i + args.batch_size], y[i : i + args.batch_size]) for i in range(0, args.samples, args.batch_size)]
    model.eval()
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, xb, yb):
        logits = nnx.merge(graphdef, state)(xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).sum(), (logits.argmax(-1) == yb).sum()

    def evaluate():
        totals = [step(state, jnp.asarray(xb), jnp.asarray(yb)) for xb, yb in batches]
        return float(sum(t[0] for t in totals)) / args.samples, float(sum(t[1] for t in totals)) / args.samples

    def diagnose():
        eg.diagnose(model, batches, progress=False)

    t = time.perf_counter()
    diagnose()
    first = time.perf_counter() - t
    evaluate()
    med = _timed({"evaluate": evaluate, "diagnose": diagnose}, args.runs)
    return {"framework": "flax/nnx", **med, "first_extra": first - med["diagnose"]}


def torch_child(args) -> dict:
    import torch
    from torch import nn

    sys.path.insert(0, os.path.dirname(__file__))
    from _torch_resnet import resnet50

    import evalgap.torch as eg

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = resnet50(21)
    if args.dropout:
        model.fc = nn.Sequential(nn.Dropout(0.3), model.fc)
    model = model.to(device)
    x = (torch.rand(args.samples, 3, args.image_size, args.image_size) * 255).to(device)
    y = torch.randint(0, 21, (args.samples,)).to(device)
    batches = [(x[i : i + args.batch_size], y[i : i + args.batch_size]) for i in range(0, args.samples, args.batch_size)]

    @torch.no_grad()
    def evaluate():
        model.eval()
        loss = correct = 0.0
        for xb, yb in batches:  # summed on the device, read once at the end: no synchronization per batch on a GPU
            out = model(xb)
            loss += nn.functional.cross_entropy(out, yb, reduction="sum")
            correct += (out.argmax(1) == yb).sum()
        model.train()
        return float(loss) / args.samples, float(correct) / args.samples

    def diagnose():
        eg.diagnose(model, batches, progress=False)

    t = time.perf_counter()
    diagnose()
    first = time.perf_counter() - t
    med = _timed({"evaluate": evaluate, "diagnose": diagnose}, args.runs)
    return {"framework": "torch", **med, "first_extra": first - med["diagnose"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frameworks", default="torch,tensorflow,jax,keras-torch")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dropout", action="store_true")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON (exit 1 if a framework failed)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child = {"torch": torch_child, "keras": keras_child, "tf_keras": tf_keras_child, "flax": flax_child}[args.child]
        print(json.dumps(child(args)))
        return
    print(f"ResNet50 (weights=None), {args.samples} samples in batches of {args.batch_size}, {args.image_size}x{args.image_size}x3"
          f"{', Dropout before the head' if args.dropout else ''}; median of {args.runs} warm runs")
    print(f"{'framework':16s} {'evaluate s':>10s} {'diagnose s':>10s} {'ratio':>7s} {'first-call extra s':>19s}")
    results, failed = [], []
    setting = f"ResNet50, {args.samples} samples in batches of {args.batch_size} at {args.image_size}x{args.image_size}"

    def write() -> None:  # after each framework: a run stopped at its time limit keeps what it measured
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"setting": setting, "runs": args.runs, "results": results, "failed": failed}, fh, indent=2)

    for fw in args.frameworks.split(","):
        backend = {"keras-torch": "torch", "tf_keras": "tensorflow", "flax": "jax"}.get(fw, fw)
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        kind = fw if fw in ("torch", "tf_keras", "flax") else "keras"
        cmd = [sys.executable, __file__, "--child", kind, "--samples", str(args.samples),
               "--batch-size", str(args.batch_size), "--image-size", str(args.image_size), "--runs", str(args.runs)]
        cmd += ["--dropout"] if args.dropout else []
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{fw:16s} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
            failed.append(fw)
            write()
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append({**r, "ratio": r["diagnose"] / r["evaluate"]})
        write()
        print(f"{r['framework']:16s} {r['evaluate']:10.3f} {r['diagnose']:10.3f} {r['diagnose'] / r['evaluate']:6.2f}x {r['first_extra']:19.1f}")
    if args.json and failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
