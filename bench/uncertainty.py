"""Does ``crossmodal predict``'s per-case uncertainty order cases for review? (the demo's brain cases).

Every case of the demo's studies folder (``make data``: 12 brain cases with truth) is segmented by the shipped
brain weights three ways: with every modality, without T2, without PD (a degraded input, as a missing or failed
series gives), through :func:`crossmodal.serving.offline.predict`. Per case and way: the foreground uncertainty
``predict`` records (mean normalised entropy over the voxels predicted foreground) and the mean foreground Dice of
the written map against the truth. Prints the table and the Spearman rank correlation between the two (the more
negative, the better the uncertainty orders the cases worst-first; a baseline that orders at random has 0), and
the Dice of the cases ``review_order`` puts in its first third against the rest, and the correlation within each
way (the cases alone, the input the same); writes ``uncertainty.json`` and
``uncertainty.png`` to ``RESULTS_DIR`` (default ``bench/results``).

    python bench/uncertainty.py [--quick]   # --quick: 4 cases, to bench/results/quick
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from benchutil import results_dir  # noqa: E402
from crossmodal.config import atomic_write_text  # noqa: E402
from crossmodal.data.studies import primary_images, truth_files  # noqa: E402
from crossmodal.io import load_volume  # noqa: E402
from crossmodal.serving.offline import dice_per_class, predict  # noqa: E402

DEMO = REPO / "data" / "brain"
WEIGHTS = REPO / "apps" / "crossmodal" / "pretrained" / "brain_crossmodal.pt"
WAYS = {"all": (), "no_t2": ("t2",), "no_pd": ("pd",)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if not (DEMO / ".done").is_file():
        raise SystemExit(f"{DEMO}: the demo's cases are made by `make data`")
    cases = list(primary_images(DEMO))[: 4 if args.quick else None]
    truths = truth_files(DEMO)
    rows = []
    with tempfile.TemporaryDirectory(prefix="uncertainty-") as work:
        for way, drop in WAYS.items():
            summary = predict(str(DEMO), "brain", str(WEIGHTS), f"{work}/{way}", cases, "cpu", "crossmodal", drop)
            for r in summary["per_case"]:
                pred = np.rint(load_volume(r["file"], r["case"])[0].numpy())
                truth = np.rint(load_volume(truths[r["case"]], r["case"])[0].numpy())
                dice = float(np.nanmean(dice_per_class(pred, truth, 4)))
                rows.append({"case": r["case"], "way": way, "uncertainty": r["uncertainty"], "dice_mean": dice})
    rho = spearmanr([r["uncertainty"] for r in rows], [r["dice_mean"] for r in rows])
    ordered = sorted(rows, key=lambda r: -r["uncertainty"])
    third = max(1, len(ordered) // 3)
    first, rest = ordered[:third], ordered[third:]
    def mean_dice(rs: list[dict]) -> float:
        return round(float(np.mean([r["dice_mean"] for r in rs])), 4)

    result = {"cases": len(cases), "weights": str(WEIGHTS.relative_to(REPO)),
              "spearman": round(float(rho.statistic), 4), "spearman_p": float(rho.pvalue),
              "first_third_dice": mean_dice(first), "rest_dice": mean_dice(rest),
              "first_third_ways": {w: sum(r["way"] == w for r in first) for w in WAYS},
              "spearman_within_way": {w: round(float(spearmanr([r["uncertainty"] for r in rows if r["way"] == w],
                                                                [r["dice_mean"] for r in rows if r["way"] == w]
                                                                ).statistic), 4) for w in WAYS},
              "rows": rows}
    print(f"{'case':10} {'way':6} {'uncertainty':>11} {'Dice':>7}")
    for r in ordered:
        print(f"{r['case']:10} {r['way']:6} {r['uncertainty']:11.4f} {r['dice_mean']:7.4f}")
    print(f"Spearman(uncertainty, Dice) {result['spearman']:+.3f} (p {result['spearman_p']:.1e}, {len(rows)} "
          f"segmentations); the most uncertain third: Dice {result['first_third_dice']:.4f} against "
          f"{result['rest_dice']:.4f} for the rest (its ways: {result['first_third_ways']}); within each way: "
          f"{result['spearman_within_way']}")
    out = results_dir(args.quick)
    atomic_write_text(out / "uncertainty.json", json.dumps(result, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for way, colour in zip(WAYS, ("tab:blue", "tab:orange", "tab:green"), strict=True):
        pts = [(r["uncertainty"], r["dice_mean"]) for r in rows if r["way"] == way]
        ax.scatter(*zip(*pts, strict=True), label=way, color=colour)
    ax.set_xlabel("foreground uncertainty (predict)")
    ax.set_ylabel("mean foreground Dice")
    ax.set_title(f"brain demo cases: Spearman {result['spearman']:+.2f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "uncertainty.png", dpi=110)
    plt.close(fig)
    print(f"-> {out / 'uncertainty.json'}, {out / 'uncertainty.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
