"""Registrations before training (stroke transfer, atlas pseudo-labels): one at a time vs side by side, one run.

The brain cases of the quality benchmark (SPM12 T1 / T2 / PD at 3 mm, seed 0's 10 training cases) as the train
task reads them. Stroke transfer as the brain preset runs it (scribbles on all 10 cases, each given the strokes of
the next 6: 60 registrations) and atlas pseudo-labels (1 dense case, 9 unlabelled ones: 9 registrations), each
made three ways:

- ``threaded ITK, one at a time``: every SimpleITK filter on its default threads (the behaviour until
  2026-12-02: its warped labels changed from run to run, so this row also says whether they matched the others);
- ``one thread, one at a time`` (the baseline: 2026-12-02, every registration on one thread so that it repeats,
  ``train.consistency.atlas_workers: 1``);
- ``one thread each, side by side`` (``atlas_workers: 0``: as many at once as the process has cores), as the train
  task runs them: each registration also written to a fresh :class:`crossmodal.atlas.WarpCache`;
- ``read back from the cache``: the same again over that cache (what the next run from scratch on the same labels
  pays, ``<model_dir>/registrations``).

Seconds, the ratio to the baseline, and whether the labels are the baseline's to the last voxel.

    python bench/transfer.py [--quick]      # RESULTS_DIR=... to write elsewhere than bench/results (--quick: .../quick)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import REPO, results_dir  # noqa: E402
from crossmodal import atlas as atlas_module  # noqa: E402
from crossmodal.atlas import usable_cores  # noqa: E402
from crossmodal.config import atomic_write_text, load_config  # noqa: E402
from crossmodal.data.brain import load_templates, make_brain_case  # noqa: E402
from crossmodal.data.sparse import sparsify  # noqa: E402
from crossmodal.data.studies import FINAL_LABELS, write_case  # noqa: E402
from crossmodal.io import save_volume  # noqa: E402
from crossmodal.serving.train import atlas_labels, stroke_transfer  # noqa: E402

WAYS = ("threaded ITK, one at a time", "one thread, one at a time", "one thread each, side by side",
        "read back from the cache")
BASELINE = WAYS[1]


def make_cases(root: Path, n: int, seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    """``n`` brain cases (the quality benchmark's seed-``seed`` training cases) -> datalists: all scribbled, and one
    dense + the rest unlabelled."""
    cfg = load_config("brain")
    templates = load_templates(REPO / "data" / "spm12")
    scribbled, dense, unlabelled = [], [], []
    for i in range(n):
        case = make_brain_case(cfg, templates, np.random.default_rng([seed, i]), spacing=3.0)
        cid = f"case{i:03d}"
        write_case(root / "scribbles", cid, case, cfg)
        write_case(root / "dense", cid, case, cfg)
        truth = np.rint(case.label.array).astype(np.int64)
        drawn = sparsify(truth, cfg.labels, "scribbles", np.random.default_rng([seed, 99, i]))
        save_volume(root / "scribbles" / FINAL_LABELS / f"{cid}.nii.gz", drawn, case.label.affine)
        scribbled.append({"image": str(root / "scribbles" / f"{cid}.nii.gz"), "label_kind": "sparse",
                          "label": str(root / "scribbles" / FINAL_LABELS / f"{cid}.nii.gz")})
        if i == 0:
            save_volume(root / "dense" / FINAL_LABELS / f"{cid}.nii.gz", truth, case.label.affine)
            dense.append({"image": str(root / "dense" / f"{cid}.nii.gz"), "label_kind": "dense",
                          "label": str(root / "dense" / FINAL_LABELS / f"{cid}.nii.gz")})
        else:
            unlabelled.append({"image": str(root / "dense" / f"{cid}.nii.gz"), "label_kind": "unlabeled"})
    return scribbled, dense, unlabelled


def measure(work: Callable[[object, dict, Path | None], None], others: int, way: str, cache: Path
            ) -> tuple[float, dict]:
    """Seconds of ``work(cfg, store, cache_dir)`` made ``way``, and the labels it stored."""
    workers = 0 if way in WAYS[2:] else 1
    cfg = load_config("brain", overrides={"data": {"spacing": None},  # the quality benchmark's 3 mm, as it is
                                          "train": {"consistency": {"atlas_sparse": others,
                                                                    "atlas_workers": workers}}})
    store: dict = {}
    threaded = way == WAYS[0]
    with contextlib.ExitStack() as stack:
        if threaded:  # the registrations' own SimpleITK default threads, as before 2026-12-02
            original = atlas_module.single_threaded
            atlas_module.single_threaded = contextlib.nullcontext  # type: ignore[assignment]
            stack.callback(setattr, atlas_module, "single_threaded", original)
        start = time.perf_counter()
        work(cfg, store, cache if way in WAYS[2:] else None)
        return time.perf_counter() - start, store


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 cases, 2 others each")
    args = ap.parse_args()
    n, others = (4, 2) if args.quick else (10, 6)
    cores = usable_cores()
    torch.set_num_threads(cores)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as tmp:
        scribbled, dense, unlabelled = make_cases(Path(tmp), n)
        tasks = {
            f"stroke transfer ({n} cases x {others} others)":
                (lambda cfg, store, cache: stroke_transfer(cfg, scribbled, store, cache), n * others),
            f"atlas pseudo-labels ({len(unlabelled)} cases x 1 atlas)":
                (lambda cfg, store, cache: atlas_labels(cfg, unlabelled, dense, store, cache), len(unlabelled)),
        }
        for i, (task, (work, registrations)) in enumerate(tasks.items()):
            cache = Path(tmp) / f"registrations{i}"
            measure(work, others, BASELINE, cache)  # warm: the cases' reading and co-registration are remembered
            done = {way: measure(work, others, way, cache) for way in (WAYS[1], WAYS[2], WAYS[3], WAYS[0])}
            base_s, base_labels = done[BASELINE]
            for way in WAYS:
                seconds, labels = done[way]
                same = list(labels) == list(base_labels) and all(torch.equal(labels[c], base_labels[c])
                                                                 for c in labels)
                rows.append({"task": task, "way": way, "registrations": registrations, "cores": cores,
                             "cached_files": len(list(cache.glob("*.npz"))) if way in WAYS[2:] else None,
                             "seconds": round(seconds, 1),
                             "seconds_per_registration": round(seconds / registrations, 2),
                             "ratio_to_baseline": round(seconds / base_s, 3), "labels_as_baseline": same})
    print(f"\n{'task':<40} {'way':<31} {'regs':>5} {'s':>7} {'s/reg':>6} {'x base':>7}  labels as baseline")
    for r in rows:
        print(f"{r['task']:<40} {r['way']:<31} {r['registrations']:>5} {r['seconds']:>7.1f} "
              f"{r['seconds_per_registration']:>6.2f} {r['ratio_to_baseline']:>7.3f}  {r['labels_as_baseline']}")
    out = results_dir(args.quick) / "transfer.json"
    atomic_write_text(out, json.dumps({"cores": cores, "baseline": BASELINE, "rows": rows}, indent=2))
    print(f"\n{cores} cores; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
