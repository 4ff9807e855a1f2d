"""Where ours from scribbles loses to ours from dense labels, and how much a class-prior correction could give back.

For each seed it trains ours on the quality benchmark's pool (``bench/quality.py``'s ``make_pool`` / ``run``: same
cases, steps and settings) once from dense labels and once from scribbles, then on the 12 test cases (their fused
logits on the working grid):

* voxel accuracy on the voxels that touch another class (a 6-neighbour differs: the partial-volume boundary) and
  inside the classes, and each class's predicted / true volume;
* the scribble model's Dice again with per-class offsets added to its logits, searched on the test cases
  themselves (coordinate search, -1.5..1.5 in 0.1 steps, background fixed at 0): an upper bound for any correction
  of its class priors, since a real one could not look at the test labels.

It prints a table and writes ``scribble_gap.json`` to ``RESULTS_DIR`` (default ``bench/results``).

    python bench/scribble_gap.py [--seeds 0,1] [--dataset brain]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import binary_erosion

REPO = Path(__file__).resolve().parents[1]

import quality  # noqa: E402
from benchutil import results_dir  # noqa: E402
from crossmodal.config import CrossModalConfig, atomic_write_text, load_config  # noqa: E402
from crossmodal.inference import NetworkInferer  # noqa: E402
from crossmodal.nets import build_network  # noqa: E402
from crossmodal.serving.offline import dice_per_class  # noqa: E402
from crossmodal.transforms import preprocessing  # noqa: E402

REGIMES = ("dense", "scribbles")


def logits_of_test_cases(cfg: CrossModalConfig, model: Path, test: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fused logits (C, H, W, D), truth (H, W, D)) of every test case, on the working grid."""
    net = build_network(cfg)
    ckpt = torch.load(model, map_location="cpu", weights_only=True)
    net.load_state_dict(ckpt.get("model", ckpt) if isinstance(ckpt, dict) else ckpt)
    net.eval()
    infer = NetworkInferer(cfg.infer, fused_only=True)
    load = preprocessing(cfg, "val")
    out = []
    for image in sorted(test.glob("*.nii.gz")):
        d = load({"image": str(image), "label": str(test / "truth" / image.name), "label_kind": "dense",
                  "case_id": image.name})
        with torch.no_grad():
            logits = infer(d["image"][None].float(), net)[0]
        out.append((np.asarray(logits), np.rint(np.asarray(d["label"][0])).astype(np.int64)))
    return out


def boundary(truth: np.ndarray) -> np.ndarray:
    """Voxels (H, W, D) with a 6-neighbour of another class."""
    inside = np.zeros(truth.shape, dtype=bool)
    for c in np.unique(truth):
        inside |= binary_erosion(truth == c, border_value=1)
    return ~inside


def mean_dice(cases: list[tuple[np.ndarray, np.ndarray]], offsets: np.ndarray) -> float:
    """Mean over the cases of the mean foreground Dice of argmax(logits + offsets), as ``crossmodal evaluate``."""
    return float(np.mean([np.nanmean(dice_per_class((logits + offsets[:, None, None, None]).argmax(0), truth,
                                                    len(offsets))) for logits, truth in cases]))


def analyse(cases: list[tuple[np.ndarray, np.ndarray]], names: list[str]) -> dict:
    """Accuracy on / off the class boundaries and predicted / true volume per class."""
    right_b = right_i = n_b = n_i = 0
    pred_vol, true_vol = np.zeros(len(names)), np.zeros(len(names))
    for logits, truth in cases:
        pred, edge = logits.argmax(0), boundary(truth)
        right_b += int(np.sum((pred == truth) & edge))
        right_i += int(np.sum((pred == truth) & ~edge))
        n_b, n_i = n_b + int(edge.sum()), n_i + int((~edge).sum())
        pred_vol += np.bincount(pred.ravel(), minlength=len(names))
        true_vol += np.bincount(truth.ravel(), minlength=len(names))
    return {"dice_mean": round(mean_dice(cases, np.zeros(len(names))), 4),
            "boundary_fraction": round(n_b / (n_b + n_i), 4),
            "accuracy_boundary": round(right_b / n_b, 4), "accuracy_inside": round(right_i / n_i, 4),
            "volume_ratio": {n: round(float(p / t), 3) for n, p, t in zip(names, pred_vol, true_vol, strict=True)}}


def best_offsets(cases: list[tuple[np.ndarray, np.ndarray]], classes: int) -> tuple[np.ndarray, float]:
    """Per-class logit offsets (background 0) that maximise the cases' mean Dice: three coordinate sweeps."""
    offsets = np.zeros(classes)
    grid = np.round(np.arange(-1.5, 1.51, 0.1), 2)
    for _ in range(3):
        for c in range(1, classes):
            scores = []
            for v in grid:
                trial = offsets.copy()
                trial[c] = v
                scores.append(mean_dice(cases, trial))
            offsets[c] = grid[int(np.argmax(scores))]
    return offsets, mean_dice(cases, offsets)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    ap.add_argument("--dataset", default="brain", choices=sorted(quality.DATASETS))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    spec = quality.DATASETS[args.dataset]
    cfg = load_config(spec["preset"])
    names = ["background", *cfg.labels.foreground]
    rows = []
    with tempfile.TemporaryDirectory(prefix="scribble-gap-") as tmp:
        root = Path(tmp)
        for seed in seeds:
            pool, test = quality.make_pool(root / f"pool_s{seed}", args.dataset, cfg, spec, seed, 0.0)
            row: dict = {"dataset": args.dataset, "seed": seed}
            for regime in REGIMES:
                quality.run(root, args.dataset, spec, "ours", regime, 0.0, seed, pool, test)
                tag = f"{args.dataset}_ours_{regime}_0mm_s{seed}"
                run_cfg = load_config(str(root / "configs" / f"{tag}.yaml"))
                cases = logits_of_test_cases(run_cfg, root / "models" / tag / f"{run_cfg.name}_crossmodal.pt", test)
                row[regime] = analyse(cases, names)
                if regime == "scribbles":
                    offsets, dice = best_offsets(cases, len(names))
                    row[regime]["oracle_offsets"] = dict(zip(names, offsets.round(2).tolist(), strict=True))
                    row[regime]["oracle_dice_mean"] = round(dice, 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = results_dir() / "scribble_gap.json"
    atomic_write_text(out, json.dumps(rows, indent=1) + "\n")
    print(f"\n{'seed':>4} {'labels':10} {'Dice':>7} {'acc edge':>9} {'acc inside':>11} {'edge voxels':>12}  "
          f"predicted / true volume ({', '.join(names)})")
    for row in rows:
        for regime in REGIMES:
            r = row[regime]
            vol = " / ".join(f"{v:.2f}" for v in r["volume_ratio"].values())
            print(f"{row['seed']:>4} {regime:10} {r['dice_mean']:7.4f} {r['accuracy_boundary']:9.3f} "
                  f"{r['accuracy_inside']:11.3f} {r['boundary_fraction']:12.3f}  {vol}")
        s = row["scribbles"]
        print(f"{row['seed']:>4} scribbles + best logit offsets on the test cases {s['oracle_dice_mean']:.4f} "
              f"({s['oracle_dice_mean'] - s['dice_mean']:+.4f}; {s['oracle_offsets']})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
