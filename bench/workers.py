"""Loader worker processes (``train.num_workers``) against loading in the trainer, side by side in one run.

`crossmodal train` on the brain demo (`make data`: 12 cases, 2 dense, 2 scribbled, 8 unlabelled) from scratch,
``--dataset Dataset`` (every case read and registered as it comes: the server's default, where workers have the
most to do), the preset's other settings, once per worker count and repeat, interleaved (0, 2, 0, 2, ...) so a
machine's drift falls on both. The demo's 8 unlabelled cases are its held-out ones (they have truth), which
`crossmodal train` leaves out of training since 2026-12-07: ``--train-on-test-images`` keeps them in, as the runs
recorded before that trained them (the workers' load is reading and registering them). Records each run's wall
seconds, the peak RSS of its largest process (the trainer or a worker) and the held-out Dice the run prints; prints
a table (mean seconds, ratio to 0 workers) and writes ``workers.json`` to ``RESULTS_DIR`` (default
``bench/results``).

    python bench/workers.py [--workers 0,2] [--repeats 2] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchutil import REPO, results_dir  # noqa: E402
from crossmodal.config import load_config, save_config  # noqa: E402


def run_once(studies: Path, config: Path, model_dir: Path, epochs: int) -> dict:
    """One `crossmodal train` in a subprocess: wall seconds, peak RSS (GB) of its largest process, held-out Dice."""
    cmd = [str(Path(sys.executable).with_name("crossmodal")), "train", "--studies", str(studies), "--config",
           str(config), "--model-dir", str(model_dir), "--epochs", str(epochs), "--device", "cpu", "--dataset",
           "Dataset", "--from-scratch", "--train-on-test-images"]  # the 8 unlabelled cases load too, as they did
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this run's rusage: its largest process, workers included
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{stderr[-2000:]}")
    dice = re.search(r"mean Dice ([0-9.]+)", stdout)
    return {"seconds": round(seconds, 1), "peak_rss_gb": round(usage.ru_maxrss / 1024**2, 2),
            "dice_mean": float(dice.group(1)) if dice else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="0,2", help="worker counts to compare; the first is the baseline")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--studies", default=str(REPO / "data" / "brain"))
    args = ap.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]
    if not (Path(args.studies) / ".done").is_file() and not any(Path(args.studies).glob("*.nii.gz")):
        raise SystemExit(f"{args.studies}: no studies; run `make data` first")
    records = []
    with tempfile.TemporaryDirectory(prefix="crossmodal-workers-") as tmp:
        for repeat in range(args.repeats):
            for workers in counts:
                config = Path(tmp) / f"brain_w{workers}.yaml"
                save_config(load_config("brain", overrides={"train": {"num_workers": workers}}), config)
                rec = {"workers": workers, "repeat": repeat,
                       **run_once(Path(args.studies), config, Path(tmp) / f"m{workers}_{repeat}", args.epochs)}
                print(json.dumps(rec), flush=True)
                records.append(rec)
    base = statistics.mean(r["seconds"] for r in records if r["workers"] == counts[0])
    summary = []
    print(f"\n{'workers':>8} {'seconds (each run)':>22} {'mean s':>8} {'ratio':>6} {'peak GB':>12} "
          f"{'Dice (each run)':>16}")
    for workers in counts:
        runs = [r for r in records if r["workers"] == workers]
        mean = statistics.mean(r["seconds"] for r in runs)
        summary.append({"workers": workers, "mean_seconds": round(mean, 1), "ratio_to_first": round(mean / base, 3)})
        each = {k: " / ".join(str(r[k]) for r in runs) for k in ("seconds", "peak_rss_gb", "dice_mean")}
        print(f"{workers:>8} {each['seconds']:>22} {mean:>8.1f} {mean / base:>6.2f} {each['peak_rss_gb']:>12} "
              f"{each['dice_mean']:>16}")
    out = results_dir() / "workers.json"
    out.write_text(json.dumps({"epochs": args.epochs, "studies": args.studies, "dataset": "Dataset",
                               "records": records, "summary": summary}, indent=1))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
