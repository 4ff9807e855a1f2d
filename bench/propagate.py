"""Scribble propagation against the case size: seconds, peak memory and label quality, full grid vs coarse grid.

Phantom cases (CT + PET + MR, the same 96 mm anatomy at finer and finer primary grids: 48^3 at 2 mm up to 160^3 at
0.6 mm) get skeleton scribbles on every axial slice, as `crossmodal data phantom --sparse` draws them. Each one is
loaded as training loads it (`LoadCased`: the modalities co-registered and resampled to the primary grid) and its
scribbles are grown by `propagate_labels` twice, in fresh processes (peak RSS is the process's): on the full grid
(`max_voxels` unlimited, the baseline) and with the default `max_voxels` (2M: cases above it on a grid coarsened by
a whole factor per axis). The default run then reads the grown label back through `PropagationCache` (what every
later epoch and retrain of an unchanged label costs; `kB`: its compressed file). Label quality against the truth:
the fraction of voxels labelled, the fraction of those right, and per class the fraction of its voxels labelled with
it.

    python bench/propagate.py [--quick]     # RESULTS_DIR=... to write elsewhere than bench/results (--quick: .../quick)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from benchutil import results_dir
from crossmodal.config import atomic_write_text, load_config
from crossmodal.data.phantom import make_phantom
from crossmodal.data.sparse import scribbles
from crossmodal.data.studies import FINAL_LABELS, TRUTH_DIR, write_case
from crossmodal.io import save_volume
from crossmodal.labels import IGNORE_INDEX
from crossmodal.propagate import PropagationCache, propagate_labels
from crossmodal.transforms import LoadCased

DEFAULT_MAX_VOXELS = 2_000_000
EXTENT_MM = 96.0


def make_case(studies: Path, size: int, seed: int) -> str:
    """Write one phantom case with a ``size``^3 primary grid, its truth and scribbles; returns its id."""
    cfg = load_config("phantom")
    rng = np.random.default_rng([seed, size])
    case = make_phantom(cfg, rng, size=size, spacing=EXTENT_MM / size)
    case_id = f"phantom{size}"
    write_case(studies, case_id, case, cfg)
    save_volume(studies / FINAL_LABELS / f"{case_id}.nii.gz", scribbles(case.label.array, cfg.labels, rng),
                case.label.affine)
    return case_id


def measure(studies: str, case_id: str, max_voxels: int, cache_dir: str | None) -> dict:
    """In a fresh process: load the case, grow its scribbles, score them; peak RSS of this process."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cfg = load_config("phantom", overrides={"data": {"spacing": None}})  # each size on its own grid
    load = LoadCased(cfg)
    t0 = time.perf_counter()
    item = load({"image": f"{studies}/{case_id}.nii.gz", "label_kind": "sparse",
                 "label": f"{studies}/{FINAL_LABELS}/{case_id}.nii.gz"})
    load_s = time.perf_counter() - t0
    truth = load({"image": f"{studies}/{case_id}.nii.gz", "label": f"{studies}/{TRUTH_DIR}/{case_id}.nii.gz"})
    image, target = item["image"].as_tensor(), item["label"].as_tensor()
    t0 = time.perf_counter()
    grown = propagate_labels(image, target, max_voxels=max_voxels)
    walk_s = time.perf_counter() - t0
    out = {"case": case_id, "shape": list(target.shape[1:]), "voxels": int(target[0].numel()),
           "max_voxels": max_voxels, "load_s": round(load_s, 2), "walk_s": round(walk_s, 2)}
    if cache_dir is not None:
        cache = PropagationCache(cache_dir)
        cache.propagate(case_id, image, target, max_voxels=max_voxels)  # stores it
        t0 = time.perf_counter()
        cached, hit = cache.propagate(case_id, image, target, max_voxels=max_voxels)
        out["cache_hit_s"] = round(time.perf_counter() - t0, 3)
        out["cache_kb"] = round(sum(f.stat().st_size for f in Path(cache_dir).glob(f"{case_id}.*.npz")) / 1024, 1)
        assert hit and torch.equal(cached, grown)
    truth_t, g, drawn = truth["label"][0].long(), grown[0].long(), target[0] != IGNORE_INDEX
    labelled = g != IGNORE_INDEX
    out.update({"drawn_fraction": round(float(drawn.float().mean()), 4),
                "labelled_fraction": round(float(labelled.float().mean()), 4),
                "accuracy": round(float((g[labelled] == truth_t[labelled]).float().mean()), 4),
                "class_coverage": {name: round(float((g[truth_t == v] == v).float().mean()), 3)
                                   for name, v in cfg.labels.classes.items() if v and bool((truth_t == v).any())},
                "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)})
    return out


def run_fresh(*args) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(measure, *args).result()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="48^3 and 96^3 only")
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    args = ap.parse_args()
    sizes = args.sizes or ([48, 96] if args.quick else [48, 96, 128, 160])
    results = results_dir(args.quick)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        studies = Path(tmp) / "studies"
        for size in sizes:
            case_id = make_case(studies, size, seed=0)
            full = run_fresh(str(studies), case_id, 10**12, None)
            default = run_fresh(str(studies), case_id, DEFAULT_MAX_VOXELS, str(Path(tmp) / "cache"))
            row = {"size": size, "spacing_mm": round(EXTENT_MM / size, 3), "full": full, "default": default,
                   "walk_ratio_default_vs_full": round(default["walk_s"] / full["walk_s"], 3),
                   "cache_hit_ratio_vs_walk": round(default["cache_hit_s"] / default["walk_s"], 4)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    header = (f"{'grid':>6} {'voxels':>9} {'run':>12} {'load s':>7} {'walk s':>7} {'hit s':>6} {'kB':>5} {'GB':>5} "
              f"{'labelled':>8} {'right':>6}  per-class coverage")
    print("\n" + header)
    for r in rows:
        for name in ("full", "default"):
            m = r[name]
            label = "full grid" if name == "full" else f"max {DEFAULT_MAX_VOXELS // 10**6}M vox"
            hit = f"{m['cache_hit_s']:6.3f} {m['cache_kb']:5.0f}" if "cache_hit_s" in m else f"{'-':>6} {'-':>5}"
            cov = " ".join(f"{k}={v:.3f}" for k, v in m["class_coverage"].items())
            print(f"{r['size']:>5}^3 {m['voxels']:>9} {label:>12} {m['load_s']:7.2f} {m['walk_s']:7.2f} {hit} "
                  f"{m['peak_rss_gb']:5.2f} {m['labelled_fraction']:8.3f} {m['accuracy']:6.3f}  {cov}")
        print(f"{'':>6} walk default / full grid = {r['walk_ratio_default_vs_full']:.3f}; cache hit / walk = "
              f"{r['cache_hit_ratio_vs_walk']:.4f}")
    atomic_write_text(results / "propagate.json", json.dumps(
        {"sizes": sizes, "default_max_voxels": DEFAULT_MAX_VOXELS, "cpu_count": os.cpu_count(), "rows": rows},
        indent=1) + "\n")
    print(f"wrote {results / 'propagate.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
