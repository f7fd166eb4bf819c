"""Helpers of ``bench/gpu.sh``: the environment, the Keras backends present, and the summary.

    python bench/gpu_summary.py --environment FILE      GPU, CPU and package versions as JSON
    python bench/gpu_summary.py --keras-backends        the Keras backends importable here, comma-separated
    python bench/gpu_summary.py --collect WORK --out OUT

``--collect`` reads what the steps wrote under WORK and writes under OUT: ``summary.md`` (one
table per part, the device named in each), ``results.json`` (everything), ``ratios.csv`` and
``ratios.png`` (every recalibration ratio to a training-mode forward), and copies the seed job's
``reproduce.json``/``.csv``/``.png``.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

PACKAGES = ("torch", "keras", "tensorflow", "jax", "flax", "fvcore", "numpy")


def environment() -> dict:
    info: dict = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}
    info["packages"] = {}
    for name in PACKAGES:
        try:
            info["packages"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        info["gpu"] = out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        info["gpu"] = None
    return info


def keras_backends() -> str:
    return ",".join(b for b in ("tensorflow", "jax", "torch") if importlib.util.find_spec(b) is not None)


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def collect(work: Path, out: Path) -> int:
    env = _load(work / "environment.json") or {}
    device = env.get("gpu") or f"no GPU ({env.get('cpu', '?')}, {env.get('cpus', '?')} CPUs)"
    steps = [json.loads(line) for line in (work / "steps.jsonl").read_text().splitlines()] if (work / "steps.jsonl").exists() else []
    results: dict = {"environment": env, "steps": steps, "recalibration": [], "fit_vs_reproduce": None, "seed_job": None, "checks": None}
    md = [f"# evalgap on {device}", "", f"Packages: {', '.join(f'{k} {v}' for k, v in env.get('packages', {}).items())}", ""]
    failed = [s for s in steps if s["exit"] != 0]
    if failed:
        md += ["Steps that did not finish: " + ", ".join(f"{s['step']} (exit {s['exit']} after {s['seconds']} s)" for s in failed), ""]

    rep = _load(work / "reproduce" / "reproduce.json")
    if rep:
        results["seed_job"] = rep
        md += [f"## The seed's job ({device}; {rep['images']} images at {rep['image_size']}x{rep['image_size']}, {rep['backend']})", "",
               "| variant | epoch | s | loss | accuracy | val_loss | val_accuracy | precise_val_accuracy | train_mode_accuracy |",
               "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, v in rep["variants"].items():
            for r in v["epochs"]:
                md.append(f"| {name} | {r['epoch']} | {r['seconds']:.1f} | {r['loss']:.4f} | {r['accuracy']:.4f} | {r['val_loss']:.4f} | "
                          f"{r['val_accuracy']:.4f} | {r.get('precise_val_accuracy', float('nan')):.4f} | {r.get('train_mode_accuracy', float('nan')):.4f} |")
        md.append("")
        for name in ("reproduce.json", "reproduce.csv", "reproduce.png"):
            if (work / "reproduce" / name).exists():
                shutil.copyfile(work / "reproduce" / name, out / name)

    fit = _load(work / "fit_vs_reproduce.json")
    if fit:
        results["fit_vs_reproduce"] = fit
        md += [f"## Plain model.fit vs evalgap reproduce ({device}; {fit['framework']}; {fit['setting']})", "",
               "| run | epoch s | images/s | ratio | one measurement s | ratio projected to the 50-epoch job |", "|---|---:|---:|---:|---:|---:|"]
        md += [f"| {r['run']} | {r['epoch_seconds']:.2f} | {r['images_per_second']:.0f} | {r['ratio']:.3f}x | "
               + (f"{r['measurement_seconds']:.2f} | {r['projected_ratio']:.3f}x ({r['projected_measurements']} of {r['projected_epochs']}) |"
                  if "projected_ratio" in r else "- | - |") for r in fit["results"]]
        md.append("")

    rows = []
    for path in sorted(work.glob("torch_*.json")):
        data = _load(path)
        for r in (data or {}).get("results", []):
            rows.append({"framework": "torch", "setting": data["setting"], "method": r["method"], "seconds": r["seconds"], "ratio": r["ratio"],
                         **{k: r[k] for k in ("ratio_min", "ratio_paired") if k in r}})
    for path in sorted(work.glob("keras*.json")):  # keras.json, keras_long.json (the seed job's backend over 32 batches)
        keras = _load(path)
        for r in (keras or {}).get("results", []):
            if "ratio" in r:
                rows.append({"framework": f"keras/{r['backend']}", "setting": keras["setting"], "method": "evalgap.keras.recalibrate",
                             "seconds": r["recalibrate_s"], "ratio": r["ratio"]})
    flax = _load(work / "flax.json")
    for r in (flax or {}).get("results", []):
        rows.append({"framework": f"flax/{r['kind']}", "setting": flax["setting"], "method": "evalgap.flax.recalibrate",
                     "seconds": r["recalibrate_s"], "ratio": r["ratio"]})
    checks = _load(work / "checks.json")
    if checks:
        results["checks"] = checks
        md += [f"## The PyTorch pass's fast paths ({checks['device']}, torch {checks['torch']})", "", "| check | result | detail |", "|---|---|---|"]
        md += [f"| {c['check']} | {'ok' if c['ok'] else '**FAILED**'} | {c['detail']} |" for c in checks["checks"]]
        md.append("")
    diag = _load(work / "diagnose.json")
    if diag:
        results["diagnose"] = diag
        md += [f"## diagnose / one evaluation pass ({device}; {diag['setting']}; median of {diag['runs']}; target 3.5x)", "",
               "| framework | evaluate s | diagnose s | ratio | first call extra s |", "|---|---:|---:|---:|---:|"]
        md += [f"| {r['framework']} | {r['evaluate']:.3f} | {r['diagnose']:.3f} | {r['ratio']:.2f}x | {r['first_extra']:.1f} |" for r in diag["results"]]
        md += ([f"Failed: {', '.join(diag['failed'])}"] if diag.get("failed") else []) + [""]
    profile = _load(work / "profile.json")
    if profile:
        results["profile"] = profile
        md += [f"## Where PyTorch recalibrate's extra time goes ({profile['setting']}, host clock, median of {profile['runs']})", "",
               "| phase | ms |", "|---|---:|"]
        md += [f"| forward: {k} | {v} |" for k, v in profile["ms"]["forward"].items()]
        md += [f"| evalgap: {k} | {v} |" for k, v in profile["ms"]["evalgap"].items()]
        md += [f"| extra over the forward | {profile['extra_ms']} |", "",
               "Synchronizations of one call: " + (", ".join(f"{k} x{v}" for k, v in profile["syncs"].items()) or "none seen"), ""]
    results["recalibration"] = rows
    if rows:
        md += [f"## Recalibration / training-mode forward ({device}, side by side in one process, median)", "",
               "| framework | setting | method | seconds | ratio |", "|---|---|---|---:|---:|"]
        md += [f"| {r['framework']} | {r['setting']} | {r['method']} | {r['seconds']:.4f} | {r['ratio']:.3f}x |" for r in rows]
        md.append("")
        with open(out / "ratios.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["framework", "setting", "method", "seconds", "ratio", "ratio_min", "ratio_paired"])
            w.writeheader()
            w.writerows(rows)
        _plot(rows, device, out / "ratios.png")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "summary.md").write_text("\n".join(md) + "\n")
    return 0 if rep and rows else 1


def _plot(rows: list[dict], device: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['framework']} {r['setting']}: {r['method']}" for r in rows]  # the whole setting: rows differ by batches, layout, dtype
    fig, ax = plt.subplots(figsize=(11, 0.28 * len(rows) + 1.2))
    ax.barh(range(len(rows)), [r["ratio"] for r in rows], color=["#4477aa" if "evalgap" in r["method"] else "#bbbbbb" for r in rows])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.axvline(1.02, color="#cc6677", lw=0.8, ls="--", label="target 1.02x")
    ax.set_yticks(range(len(rows)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("time / training-mode forward")
    ax.set_title(f"Recalibration cost on {device}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--environment", metavar="FILE")
    p.add_argument("--keras-backends", action="store_true")
    p.add_argument("--collect", metavar="WORK")
    p.add_argument("--out", metavar="OUT")
    args = p.parse_args()
    if args.environment:
        Path(args.environment).write_text(json.dumps(environment(), indent=2))
    elif args.keras_backends:
        print(keras_backends())
    elif args.collect:
        raise SystemExit(collect(Path(args.collect), Path(args.out)))
    else:
        p.error("one of --environment, --keras-backends, --collect")


if __name__ == "__main__":
    main()
