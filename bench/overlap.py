"""Sliding-window overlap and windows per pass on the brain demo: Dice and request seconds, through the server.

Starts `monailabel start_server` with the app on a copy of the demo data (`make data`), the committed brain weights,
and segments the 8 unlabelled demo cases (72-80 x 80-96 x 64-72 voxels on the working grid, larger than the 64^3
window) once per setting with ``POST /infer/crossmodal``: overlap 0.25 and one window a pass (the baseline, the
presets' setting until 2026-12-04), then other ``overlap`` / ``sw_batch_size`` request params. Dice (mean
foreground, against the cases' truth), the voxels whose label differs from the baseline's, the median request
seconds per setting and their ratio to the baseline's, the server's peak RSS while it ran that setting, the windows
each case takes; writes ``overlap.json`` to RESULTS_DIR (default bench/results).

    python bench/overlap.py [--repeats 3]
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
import torch  # noqa: E402
from benchutil import results_dir  # noqa: E402
from conftest import start_server, stop_server  # noqa: E402
from crossmodal.config import atomic_write_text, load_config  # noqa: E402
from crossmodal.io import load_volume  # noqa: E402
from crossmodal.serving.offline import dice_per_class  # noqa: E402
from crossmodal.transforms import preprocessing  # noqa: E402
from monai.inferers import sliding_window_inference  # noqa: E402
from monailabel.client import MONAILabelClient  # noqa: E402

SETTINGS: tuple[dict[str, float], ...] = (
    {"overlap": 0.25, "sw_batch_size": 1}, {"overlap": 0.25, "sw_batch_size": 2}, {"overlap": 0.25, "sw_batch_size": 4},
    {"overlap": 0.25, "sw_batch_size": 8}, {"overlap": 0.5, "sw_batch_size": 2}, {"overlap": 0.75, "sw_batch_size": 2},
    {"overlap": 0.75, "sw_batch_size": 4})
"""Request params per setting; the first (one window a pass, the presets' default until 2026-12-04) is the baseline."""


def peak_rss_gb(pid: int) -> float:
    """The process's peak resident memory (VmHWM, GB) since its last ``clear_refs`` reset."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2
    return 0.0


def windows(shape: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> int:
    """Windows MONAI's sliding window runs over a working grid of ``shape`` (H, W, D): counted as it runs them on an
    empty grid (its public API; no private scan-interval helper)."""
    seen: list[int] = []

    def count(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return x[:, :1]

    sliding_window_inference(torch.zeros((1, 1, *shape)), roi, 1, count, overlap=overlap)
    return sum(seen)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="passes over the cases per setting, interleaved")
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
        changed: dict[int, int] = {i: 0 for i in range(len(SETTINGS))}  # voxels labelled unlike the baseline
        peak: dict[int, float] = {i: 0.0 for i in range(len(SETTINGS))}
        first: dict[str, np.ndarray] = {}
        try:
            client = MONAILabelClient(server.url, tmpdir=tmp)
            client.infer("crossmodal", cases[0], {})  # warm-up: the model loads on the first request
            for _ in range(args.repeats):
                for i, params in enumerate(SETTINGS):  # interleaved, so a slow spell hits every setting alike
                    Path(f"/proc/{server.proc.pid}/clear_refs").write_text("5")  # peak RSS from here
                    for case in cases:
                        t = time.perf_counter()
                        out, _ = client.infer("crossmodal", case, dict(params))
                        seconds[i].append(time.perf_counter() - t)
                        label = load_volume(out)[0].numpy().astype(np.int64)
                        dice[i][case] = float(np.nanmean(dice_per_class(label, truth[case], cfg.labels.num_classes)))
                        first.setdefault(case, label)
                        changed[i] += int(np.sum(label != first[case]))
                    peak[i] = max(peak[i], peak_rss_gb(server.proc.pid))
        finally:
            stop_server(server)
    base_s = statistics.median(seconds[0])
    rows: list[dict[str, Any]] = []
    for i, params in enumerate(SETTINGS):
        overlap = float(params.get("overlap", cfg.infer.overlap))
        rows.append({"params": params, "overlap": overlap,
                     "sw_batch_size": params.get("sw_batch_size", cfg.infer.sw_batch_size),
                     "windows_per_case": {c: windows(grids[c], cfg.infer.roi_size, overlap) for c in cases},
                     "dice_mean": round(float(np.mean(list(dice[i].values()))), 4), "dice_per_case": dice[i],
                     "request_s_median": round(statistics.median(seconds[i]), 3),
                     "voxels_unlike_baseline": changed[i] // args.repeats, "server_peak_rss_gb": round(peak[i], 3),
                     "ratio_to_baseline": round(statistics.median(seconds[i]) / base_s, 2)})
    out = results_dir() / "overlap.json"
    atomic_write_text(out, json.dumps({"cases": cases, "grids": grids, "roi_size": list(cfg.infer.roi_size),
                                       "repeats": args.repeats, "rows": rows}, indent=1) + "\n")
    print(f"{'request params':50} {'windows/case':>12} {'Dice':>7} {'voxels unlike':>14} {'request s':>10} "
          f"{'vs baseline':>12} {'peak GB':>8}")
    for r in rows:
        w = statistics.mean(r["windows_per_case"].values())
        name = json.dumps(r["params"]) + ("  (baseline)" if r is rows[0] else "")
        print(f"{name:50} {w:12.1f} {r['dice_mean']:7.4f} {r['voxels_unlike_baseline']:14d} "
              f"{r['request_s_median']:10.3f} {r['ratio_to_baseline']:11.2f}x {r['server_peak_rss_gb']:8.2f}")
    print(f"{len(cases)} cases x {args.repeats} repeats per setting -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
