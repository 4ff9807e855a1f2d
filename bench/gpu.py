"""The CUDA path against the CPU, side by side on one machine (needs a GPU; `make bench-gpu`).

On the quality benchmark's phantom pool (10 training + 12 test cases, seed 0, its 32^3 patches and 300 optimiser
steps), ours is trained under the dense and the 10 % dense + unlabeled regimes on the GPU and on the CPU (the
baseline) from the same seed; each model is evaluated on the test split on the device it was trained on, and the
GPU's model on the CPU too (the same weights must segment alike on both). Prints a table and writes `gpu.json`
(train seconds and the CPU / GPU ratio, peak GPU memory, peak RSS, Dice of each model on each device).

    python bench/gpu.py [--steps 300] [--regimes dense,dense10_unlabeled] [--devices cuda,cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import results_dir  # noqa: E402
from crossmodal.config import atomic_write_text, load_config, save_config  # noqa: E402
from crossmodal.serving.offline import evaluate, train_offline  # noqa: E402
from quality import (  # noqa: E402
    DATASETS,
    git_commit,
    make_pool,
    peak_rss_gb,
    regime_studies,
    reset_peak_rss,
    run_config,
    run_length,
)


def train_and_evaluate(root: Path, pool: Path, test: Path, regime: str, device: str, steps: int, seed: int,
                       eval_devices: tuple[str, ...]) -> dict:
    """Train ours on ``regime`` on ``device``; Dice on the test split on each of ``eval_devices``."""
    spec = {**DATASETS["phantom"], "steps": steps}
    cfg, _ = run_config(spec, "ours", seed)
    tag = f"{regime}_{device}"
    preset = root / "configs" / f"{tag}.yaml"
    save_config(cfg, preset)
    counts = regime_studies(pool, root / "studies" / tag, regime, cfg, seed)
    hybrid = regime.endswith("_unlabeled")
    epochs, per_epoch = run_length(cfg, counts, hybrid, steps)
    reset_peak_rss()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    stats = train_offline(str(root / "studies" / tag), str(preset), str(root / "models" / tag), epochs=epochs,
                          device=device, use_unlabeled=hybrid)
    seconds = time.perf_counter() - t
    row: dict[str, Any] = {
        "regime": regime, "device": device, "steps": epochs * per_epoch, "train_seconds": round(seconds, 2),
        "peak_rss_gb": round(peak_rss_gb(), 3),
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1024**3, 3) if device.startswith("cuda") else None,
        "dice": {}}
    for ev_device in eval_devices:
        t = time.perf_counter()
        ev = evaluate(str(test), str(preset), stats["published"], ev_device)
        row["dice"][ev_device] = {"mean": round(ev["dice_mean"], 4), "seconds": round(time.perf_counter() - t, 2),
                                  "per_class": {k: round(v, 4) for k, v in ev["dice_per_class"].items()}}
    print(json.dumps({k: v for k, v in row.items() if k != "dice"} |
                     {"dice": {d: v["mean"] for d, v in row["dice"].items()}}), flush=True)
    return row


def summary(rows: list[dict], devices: list[str], steps: int) -> dict:
    """The JSON of the runs so far: each run's train seconds over the first device's on its regime, and the largest
    Dice gap of one model evaluated on several devices."""
    ratios = []
    for row in rows:
        ref = next((r for r in rows if r["regime"] == row["regime"] and r["device"] == devices[0]), row)
        ratios.append({"regime": row["regime"], "device": row["device"], "against": devices[0],
                       "train_seconds_ratio": round(row["train_seconds"] / ref["train_seconds"], 3)})
    gaps = [abs(r["dice"][a]["mean"] - r["dice"][b]["mean"]) for r in rows for a in r["dice"] for b in r["dice"]]
    return {"commit": git_commit(), "machine": platform.node(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cpu_threads": torch.get_num_threads(), "steps": steps, "rows": rows, "ratios": ratios,
            "max_dice_gap_same_model": round(max(gaps, default=0.0), 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--regimes", default="dense,dense10_unlabeled")
    ap.add_argument("--devices", default="cuda,cpu", help="the first is the one under test, the others baselines")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    regimes = [r.strip() for r in args.regimes.split(",") if r.strip()]
    if not devices or not regimes:
        ap.error("--devices and --regimes each need at least one name")
    if any(d.startswith("cuda") for d in devices) and not torch.cuda.is_available():
        ap.error("no CUDA device is visible here: run it on a GPU machine (or --devices cpu to check the script)")
    results = results_dir()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        root = Path(tmp)
        cfg = load_config("phantom")
        pool, test = make_pool(root / "data", "phantom", cfg, DATASETS["phantom"], args.seed, 0.0)
        for regime in regimes:
            for i, device in enumerate(devices):
                # the device under test's model is evaluated on every device: the same weights, the same masks
                rows.append(train_and_evaluate(root, pool, test, regime, device, args.steps, args.seed,
                                               tuple(devices) if i == 0 else (device,)))
                out = summary(rows, devices, args.steps)  # after each run: a run cut short keeps the rows it has
                atomic_write_text(results / "gpu.json", json.dumps(out, indent=1) + "\n")
    first = devices[0]
    print(f"\n{'regime':<20} {'device':<7} {'steps':>5} {'train s':>8} {'x ' + first:>9} {'GPU GB':>7} {'RSS GB':>7}  "
          "Dice (evaluated on)")
    for row, ratio in zip(rows, out["ratios"], strict=True):
        dice = ", ".join(f"{v['mean']:.4f} ({d})" for d, v in row["dice"].items())
        gpu = f"{row['peak_gpu_gb']:.3f}" if row["peak_gpu_gb"] is not None else "-"
        print(f"{row['regime']:<20} {row['device']:<7} {row['steps']:>5} {row['train_seconds']:>8.1f} "
              f"{ratio['train_seconds_ratio']:>9.2f} {gpu:>7} {row['peak_rss_gb']:>7.3f}  {dice}")
    print(f"\nsame model, Dice on {' vs '.join(devices)}: largest gap {out['max_dice_gap_same_model']:.4f}; "
          f"wrote {results / 'gpu.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
