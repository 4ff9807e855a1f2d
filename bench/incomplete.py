"""Training on cases that lack a secondary modality's file (``missing_modality: zero_fill``), in one run.

The quality benchmark's pool and settings (10 training cases with dense labels, 12 complete test cases, 300 steps,
ours), with the file of one secondary modality (phantom: PET, brain: PD) gone from 4 of the 10 training cases.
Three ways to train on that data set, each on the same steps and seeds:

* ``left_out`` (this app since 2026-12-02): the incomplete cases train with the absent modality left out of their
  fusion, heads and consistency terms;
* ``zeros_as_image`` (the baseline: the app before, and any pipeline that zero-fills): their zero-filled channel
  is read as an image of that modality;
* ``complete_only`` (what a user does without either): the incomplete cases are left out of training.

Each model is evaluated on the test cases with every modality and with that modality left out (missing at test
time, ``dice_missing``). Prints a table (mean +- sd over seeds, the paired difference to ``zeros_as_image``
with its 95 % CI) and
writes ``incomplete.json`` to ``RESULTS_DIR`` (default ``bench/results``; ``--quick``: phantom, 1 seed, 60 steps,
``bench/results/quick``).

    python bench/incomplete.py [--quick] [--seeds 5] [--datasets phantom,brain]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Hashable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import crossmodal.transforms as transforms  # noqa: E402
from benchutil import results_dir, seed_spread  # noqa: E402
from crossmodal.config import atomic_write_text, save_config  # noqa: E402
from crossmodal.data.studies import FINAL_LABELS  # noqa: E402
from crossmodal.io import load_volume, save_volume  # noqa: E402
from crossmodal.serving.offline import epoch_length, evaluate, train_offline  # noqa: E402
from quality import DATASETS, MISSING, make_pool, run_config  # noqa: E402

WAYS = ("left_out", "zeros_as_image", "complete_only")
BASELINE = "zeros_as_image"
INCOMPLETE = 4  # training cases without the modality's file


def studies_for(pool: Path, out: Path, way: str, lacking: set[str]) -> int:
    """A studies folder over the pool (symlinks), every case dense (its truth); ``complete_only`` leaves the
    ``lacking`` cases out. Returns the number of training cases."""
    (out / "modalities").mkdir(parents=True)
    cases = sorted(p.name[: -len(".nii.gz")] for p in pool.glob("*.nii.gz"))
    kept = [c for c in cases if not (way == "complete_only" and c in lacking)]
    for cid in kept:
        (out / f"{cid}.nii.gz").symlink_to(pool / f"{cid}.nii.gz")
        (out / "modalities" / cid).symlink_to(pool / "modalities" / cid, target_is_directory=True)
        truth = load_volume(pool / "truth" / f"{cid}.nii.gz")
        save_volume(out / FINAL_LABELS / f"{cid}.nii.gz", np.rint(truth[0].numpy()).astype(np.int64),
                    truth.affine.numpy())
    return len(kept)


@contextlib.contextmanager
def zeros_read_as_image(active: bool) -> Iterator[None]:
    """While active, every loaded case claims all its modalities (the app before 2026-12-02)."""
    if not active:
        yield
        return
    original = transforms.LoadCased.__call__

    def claim_all(self: transforms.LoadCased, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = original(self, data)
        d["present"] = torch.ones_like(d["present"])
        return d

    transforms.LoadCased.__call__ = claim_all  # type: ignore[method-assign]
    try:
        yield
    finally:
        transforms.LoadCased.__call__ = original  # type: ignore[method-assign]


def run(root: Path, dataset: str, spec: dict, way: str, seed: int, pool: Path, test: Path,
        lacking: set[str]) -> dict:
    cfg, _ = run_config(spec, "ours", seed)
    tag = f"{dataset}_{way}_s{seed}"
    preset = root / "configs" / f"{tag}.yaml"
    save_config(cfg, preset)
    studies = root / "studies" / tag
    n = studies_for(pool, studies, way, lacking)
    per_epoch = epoch_length({"dense": n, "sparse": 0, "unlabeled": 0}, False, cfg.train.batch_size, 1)
    epochs = max(1, round(spec["steps"] / per_epoch))
    t = time.perf_counter()
    with zeros_read_as_image(way == "zeros_as_image"):
        stats = train_offline(str(studies), str(preset), str(root / "models" / tag), epochs=epochs, device="auto",
                              network="crossmodal", missing_modality="zero_fill")
    train_s = time.perf_counter() - t
    missing = MISSING[dataset]
    full = evaluate(str(test), str(preset), stats["published"], "auto", network="crossmodal")
    without = evaluate(str(test), str(preset), stats["published"], "auto", network="crossmodal", drop=(missing,))
    record = {"dataset": dataset, "way": way, "seed": seed, "missing_modality": missing, "training_cases": n,
              "lacking_cases": len(lacking) if way != "complete_only" else 0, "steps": epochs * per_epoch,
              "dice_all_modalities": round(full["dice_mean"], 4), "dice_missing": round(without["dice_mean"], 4),
              "dice_per_class": {k: round(v, 4) for k, v in full["dice_per_class"].items()},
              "dice_per_class_missing": {k: round(v, 4) for k, v in without["dice_per_class"].items()},
              "train_seconds": round(train_s, 1)}
    print(json.dumps({k: v for k, v in record.items() if not k.startswith("dice_per_class")}), flush=True)
    return record


def summarize(records: list[dict]) -> list[dict]:
    rows = []
    for dataset in dict.fromkeys(r["dataset"] for r in records):
        for key in ("dice_all_modalities", "dice_missing"):
            base = {r["seed"]: r[key] for r in records if r["dataset"] == dataset and r["way"] == BASELINE}
            for way in WAYS:
                rs = [r for r in records if r["dataset"] == dataset and r["way"] == way]
                values = [r[key] for r in rs]
                diff = [100 * (r[key] - base[r["seed"]]) for r in rs if r["seed"] in base]
                rows.append({"dataset": dataset, "test": key, "way": way, "n": len(values),
                             "mean": round(statistics.fmean(values), 4),
                             "sd": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
                             "points_vs_baseline": round(statistics.fmean(diff), 2) if diff else None,
                             "spread": seed_spread(diff) if way != BASELINE and len(diff) > 1 else None})
    return rows


def report(rows: list[dict]) -> None:
    print(f"\n{'dataset':8} {'test':26} {'way':15} {'n':>2} {'Dice':>8} {'sd':>7} {'vs zeros (points, 95% CI)':>30}")
    for r in rows:
        ci = r["spread"]["ci95"] if r["spread"] and r["spread"]["ci95"] else None
        vs = "" if r["way"] == BASELINE else f"{r['points_vs_baseline']:+.2f}" + (
            f"  [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")
        print(f"{r['dataset']:8} {r['test']:26} {r['way']:15} {r['n']:>2} {r['mean']:8.4f} {r['sd']:7.4f} {vs:>30}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="phantom, one seed, 60 steps")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--datasets", default="phantom,brain")
    args = ap.parse_args()
    datasets = ["phantom"] if args.quick else [d.strip() for d in args.datasets.split(",") if d.strip()]
    seeds = 1 if args.quick else args.seeds
    scratch = tempfile.TemporaryDirectory(prefix="crossmodal-incomplete-")  # removed when the run ends
    root = Path(scratch.name)
    records: list[dict] = []
    start = time.perf_counter()
    for dataset in datasets:
        spec = dict(DATASETS[dataset], **({"steps": 60} if args.quick else {}))
        for seed in range(seeds):
            cfg, _ = run_config(spec, "ours", seed)
            pool, test = make_pool(root / f"{dataset}_s{seed}", dataset, cfg, spec, seed, 0.0)
            cases = sorted(p.name[: -len(".nii.gz")] for p in pool.glob("*.nii.gz"))
            lacking = {cases[i] for i in np.random.default_rng([seed, 7]).permutation(len(cases))[:INCOMPLETE]}
            for cid in lacking:
                for f in (pool / "modalities" / cid).glob(f"{MISSING[dataset]}.*"):
                    f.unlink()
            for way in WAYS:
                records.append(run(root, dataset, spec, way, seed, pool, test, lacking))
    rows = summarize(records)
    report(rows)
    out = results_dir(args.quick) / "incomplete.json"
    atomic_write_text(out, json.dumps({"records": records, "summary": rows,
                                       "seconds": round(time.perf_counter() - start, 1)}, indent=1))
    print(f"{len(records)} runs in {time.perf_counter() - start:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
