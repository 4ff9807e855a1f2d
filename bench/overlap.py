"""Sliding-window overlap and windows per pass on the brain demo: Dice and request seconds, through the server.

Starts `monailabel start_server` with the app on a copy of the demo data (`make data`), the committed brain weights,
and segments the 8 unlabelled demo cases (72-80 x 80-96 x 64-72 voxels on the working grid, larger than the 64^3
window) once per setting with ``POST /infer/crossmodal``: the preset's overlap 0.25 and one window a pass (the
baseline, every benchmark's setting), then other ``overlap`` / ``sw_batch_size`` request params. Dice (mean
foreground, against the cases' truth) and the median request seconds per setting, their ratio to the baseline's,
the windows each case takes; writes ``overlap.json`` to RESULTS_DIR (default bench/results).

    python bench/overlap.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import numpy as np  # noqa: E402
from benchutil import results_dir  # noqa: E402
from conftest import start_server, stop_server  # noqa: E402
from crossmodal.config import atomic_write_text, load_config  # noqa: E402
from crossmodal.io import load_volume  # noqa: E402
from crossmodal.serving.offline import dice_per_class  # noqa: E402
from crossmodal.transforms import preprocessing  # noqa: E402
from monai.data.utils import dense_patch_slices  # noqa: E402
from monai.inferers.utils import _get_scan_interval  # noqa: E402
from monailabel.client import MONAILabelClient  # noqa: E402

SETTINGS: tuple[dict[str, float], ...] = ({}, {"overlap": 0.5}, {"overlap": 0.75},
                                          {"overlap": 0.75, "sw_batch_size": 4})
"""Request params per setting; the first (the preset's) is the baseline."""


def windows(shape: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> int:
    """Windows MONAI's sliding window runs over a working grid of ``shape`` (H, W, D)."""
    interval = _get_scan_interval(shape, roi, 3, (overlap,) * 3)
    return len(dense_patch_slices(shape, roi, interval))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="passes over the cases per setting, interleaved")
    args = ap.parse_args()
    demo = REPO / "data" / "brain"
    if not (demo / "truth").is_dir():
        print(f"{demo} is missing: run `make data` first", file=sys.stderr)
        return 2
    cfg = load_config("brain")
    load = preprocessing(cfg, "infer")
    with tempfile.TemporaryDirectory(prefix="bench-overlap-") as tmp:
        studies = Path(tmp) / "brain"
        shutil.copytree(demo, studies, ignore=shutil.ignore_patterns("datastore_v2.json", ".lock"))
        cases = sorted(p.name.removesuffix(".nii.gz") for p in (studies / "truth").glob("*.nii.gz")
                       if not (studies / "labels" / "final" / p.name).exists())
        grids = {c: tuple(load({"image": str(studies / f"{c}.nii.gz"), "case_id": c})["image"].shape[1:])
                 for c in cases}
        truth = {c: load_volume(studies / "truth" / f"{c}.nii.gz")[0].numpy().astype(np.int64) for c in cases}
        server = start_server(studies, Path(tmp) / "model", Path(tmp) / "server.log",
                              {"preset": "brain", "models": "crossmodal"})
        seconds: dict[int, list[float]] = {i: [] for i in range(len(SETTINGS))}
        dice: dict[int, dict[str, float]] = {i: {} for i in range(len(SETTINGS))}
        try:
            client = MONAILabelClient(server.url, tmpdir=tmp)
            client.infer("crossmodal", cases[0], {})  # warm-up: the model loads on the first request
            for _ in range(args.repeats):
                for i, params in enumerate(SETTINGS):  # interleaved, so a slow spell hits every setting alike
                    for case in cases:
                        t = time.perf_counter()
                        out, _ = client.infer("crossmodal", case, dict(params))
                        seconds[i].append(time.perf_counter() - t)
                        label = load_volume(out)[0].numpy().astype(np.int64)
                        dice[i][case] = float(np.nanmean(dice_per_class(label, truth[case], cfg.labels.num_classes)))
        finally:
            stop_server(server)
    base_s = statistics.median(seconds[0])
    rows: list[dict[str, Any]] = []
    for i, params in enumerate(SETTINGS):
        overlap = float(params.get("overlap", cfg.infer.overlap))
        rows.append({"params": params, "overlap": overlap, "sw_batch_size": params.get("sw_batch_size", 1),
                     "windows_per_case": {c: windows(grids[c], cfg.infer.roi_size, overlap) for c in cases},
                     "dice_mean": round(float(np.mean(list(dice[i].values()))), 4), "dice_per_case": dice[i],
                     "request_s_median": round(statistics.median(seconds[i]), 3),
                     "ratio_to_baseline": round(statistics.median(seconds[i]) / base_s, 2)})
    out = results_dir() / "overlap.json"
    atomic_write_text(out, json.dumps({"cases": cases, "grids": grids, "roi_size": list(cfg.infer.roi_size),
                                       "repeats": args.repeats, "rows": rows}, indent=1) + "\n")
    print(f"{'request params':40} {'windows/case':>12} {'Dice':>7} {'request s':>10} {'vs baseline':>12}")
    for r in rows:
        w = statistics.mean(r["windows_per_case"].values())
        name = json.dumps(r["params"]) + ("  (baseline)" if not r["params"] else "")
        print(f"{name:40} {w:12.1f} {r['dice_mean']:7.4f} {r['request_s_median']:10.3f} "
              f"{r['ratio_to_baseline']:11.2f}x")
    print(f"{len(cases)} cases x {args.repeats} repeats per setting -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
