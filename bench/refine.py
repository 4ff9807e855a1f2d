"""Pseudo-labels of unlabelled cases: a network's segmentation as it is vs refined by the random walker.

What the self-training rounds (``train.consistency.refine_pseudo``) start from, measured against the truth: for each
seed, the quality benchmark's phantom pool (10 training cases) and its 10%-dense split (one dense case); ours is
trained on that case alone (300 steps, as ``bench/quality.py`` trains it), then segments each of the 9 other cases
whole. Per case: the Dice per class of the network's segmentation (the baseline) and of
``refine_segmentation`` (the band of ``refine_erode`` voxels around every boundary re-decided by the walker; voxels
it leaves unlabelled count as wrong), the share of voxels refined labels cover, and the seconds a refinement takes.

    python bench/refine.py [--seeds 3]     # RESULTS_DIR=... to write elsewhere than bench/results
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import results_dir  # noqa: E402
from crossmodal.config import atomic_write_text, load_config, save_config  # noqa: E402
from crossmodal.inference import NetworkInferer  # noqa: E402
from crossmodal.nets import build_network  # noqa: E402
from crossmodal.propagate import refine_segmentation  # noqa: E402
from crossmodal.serving.offline import dice_per_class, method_config, train_offline  # noqa: E402
from crossmodal.transforms import LoadCased  # noqa: E402
from quality import DATASETS, make_pool, regime_studies  # noqa: E402

KEEP_CONFIDENT = (1.0, 0.99, 0.9)  # 1.0: the walker re-decides the whole band; below: only its unsure voxels


def measure(seed: int, root: Path) -> list[dict]:
    spec = DATASETS["phantom"]
    pool, _ = make_pool(root / "pool", "phantom", load_config(spec["preset"]), spec, seed, 0.0)
    patch = [spec["patch"]] * 3
    cfg = method_config(spec["preset"], "ours", {"train": {"patch_size": patch, "patches_per_case": 1,
                                                           "batch_size": 2, "val_fraction": 0.0, "seed": seed},
                                                 "infer": {"roi_size": patch}})
    preset = root / "ours.yaml"
    save_config(cfg, preset)
    studies = root / "studies"
    regime_studies(pool, studies, "dense10", cfg, seed)
    stats = train_offline(str(studies), str(preset), str(root / "model"), epochs=spec["steps"], device="cpu",
                          network="crossmodal", use_unlabeled=False)  # one dense case: one step an epoch
    net = build_network(cfg)
    net.load_state_dict(torch.load(stats["published"], map_location="cpu"))
    net.eval()
    inferer = NetworkInferer(cfg.infer, fused_only=True)
    labelled = {p.name.split(".")[0] for p in (studies / "labels" / "final").glob("*.nii.gz")}
    load, names, n = LoadCased(cfg), list(cfg.labels.foreground), cfg.labels.num_classes
    cc, p = cfg.train.consistency, cfg.train.propagate
    rows = []
    for image_path in sorted(pool.glob("*.nii.gz")):
        cid = image_path.name[: -len(".nii.gz")]
        if cid in labelled:
            continue
        d = load({"image": str(image_path), "label": str(pool / "truth" / f"{cid}.nii.gz")})
        image, truth = d["image"].as_tensor(), d["label"][0].long().numpy()
        with torch.no_grad():
            conf, seg = torch.softmax(inferer(image[None], net), 1).max(1)
        raw_d = dice_per_class(seg[0].numpy(), truth, n)
        for keep in KEEP_CONFIDENT:
            t = time.perf_counter()
            refined = refine_segmentation(image, seg, n, cc.refine_erode, p.beta, p.threshold, p.max_voxels,
                                          conf[0], keep)[0]
            seconds = time.perf_counter() - t
            ref_d = dice_per_class(refined.long().numpy(), truth, n)
            rows.append({"seed": seed, "case": cid, "keep_confident": keep,
                         "network": dict(zip(names, raw_d, strict=True)),
                         "refined": dict(zip(names, ref_d, strict=True)),
                         "network_mean": float(np.mean(raw_d)), "refined_mean": float(np.mean(ref_d)),
                         "labelled": float((refined >= 0).float().mean()), "seconds": seconds})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    results = results_dir()
    rows: list[dict] = []
    for seed in range(args.seeds):
        with tempfile.TemporaryDirectory(prefix="bench-refine-") as tmp:
            rows += measure(seed, Path(tmp))
    names = list(rows[0]["network"])
    print(f"\n{'keep':>5} {'seed':>4} {'cases':>5} {'network':>8} {'refined':>8} {'ratio':>6} {'labelled':>8} "
          f"{'s/case':>6}  per-class Dice network -> refined")
    summary = []
    for keep, seed in [(k, s) for k in KEEP_CONFIDENT for s in [*sorted({r["seed"] for r in rows}), None]]:
        rs = [r for r in rows if (seed is None or r["seed"] == seed) and r["keep_confident"] == keep]
        net, ref = statistics.mean(r["network_mean"] for r in rs), statistics.mean(r["refined_mean"] for r in rs)
        per = {c: (statistics.mean(r["network"][c] for r in rs), statistics.mean(r["refined"][c] for r in rs))
               for c in names}
        row = {"keep_confident": keep, "seed": seed, "cases": len(rs), "network": net, "refined": ref,
               "ratio": ref / net,
               "labelled": statistics.mean(r["labelled"] for r in rs),
               "seconds": statistics.mean(r["seconds"] for r in rs), "per_class": per}
        summary.append(row)
        print(f"{keep:5.2f} {'all' if seed is None else seed:>4} {len(rs):5d} {net:8.4f} {ref:8.4f} {ref / net:6.3f} "
              f"{row['labelled']:8.4f} {row['seconds']:6.2f}  "
              + " ".join(f"{c}={a:.3f}->{b:.3f}" for c, (a, b) in per.items()))
    atomic_write_text(results / "refine.json", json.dumps({"cases": rows, "summary": summary}, indent=2))
    print(f"\nwrote {results / 'refine.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
