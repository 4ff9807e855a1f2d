"""Test-time mirroring: what averaging the 8 mirrored passes (``infer.mirror_axes: [0, 1, 2]``) gives and costs.

For the phantom and the brain data, the quality benchmark's pools, training recipe and test split (12 cases):
ours and ``baseline_unet`` trained on dense labels and on scribbles, each model evaluated on the test split with
one pass (the baseline, what the presets do) and with mirroring along all three axes, in the same run. Prints per
row the mean Dice over seeds both ways, the paired gain (95 % CI over seeds) and the infer seconds per case both
ways (their ratio), and the scribble / dense ratio of ours both ways; writes ``mirror.json`` (one record per model
and setting, with every test case's Dice and seconds) to ``RESULTS_DIR`` (default ``bench/results``).

    python bench/mirror.py [--datasets phantom,brain] [--seeds 5] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import quality as q  # noqa: E402
from benchutil import results_dir, seed_spread  # noqa: E402
from crossmodal.config import atomic_write_text, load_config  # noqa: E402
from crossmodal.serving.offline import evaluate  # noqa: E402

METHODS = ("ours", "baseline_unet")
REGIMES = ("dense", "scribbles")
MIRROR = (0, 1, 2)


def measure(root: Path, dataset: str, seed: int, methods: tuple[str, ...], regimes: tuple[str, ...]) -> list[dict]:
    """Train each method on each regime (seed ``seed``), evaluate each model with one pass and mirrored."""
    spec = q.DATASETS[dataset]
    cfg = load_config(spec["preset"])
    pool, test = q.make_pool(root / f"{dataset}_s{seed}", dataset, cfg, spec, seed, 0.0)
    out = []
    for method in methods:
        for regime in regimes:
            trained = q.run(root, dataset, spec, method, regime, 0.0, seed, pool, test)[0]
            tag = f"{dataset}_{method}_{regime}_0mm_s{seed}"
            preset = root / "configs" / f"{tag}.yaml"
            model = next((root / "models" / tag).glob("*.pt"))
            network = load_config(str(preset)).model.name
            for axes in ((), MIRROR):
                ev = evaluate(str(test), str(preset), str(model), "auto", network=network, mirror_axes=axes)
                if not axes and abs(ev["dice_mean"] - trained["dice_mean"]) > 1e-3:
                    raise RuntimeError(f"{tag}: one pass gave {ev['dice_mean']:.4f}, training's evaluation "
                                       f"{trained['dice_mean']:.4f}")
                out.append({"dataset": dataset, "method": method, "regime": regime, "seed": seed,
                            "mirror_axes": list(axes), "dice_mean": round(ev["dice_mean"], 4),
                            "hd95_mean": round(ev["hd95_mean"], 2),
                            "dice_per_class": {k: round(v, 4) for k, v in ev["dice_per_class"].items()},
                            "seconds_per_case": round(ev["seconds_mean"], 4),
                            "dice_per_case": {r["case"]: round(r["dice_mean"], 4) for r in ev["per_case"]},
                            "seconds_per_case_all": {r["case"]: r["seconds"] for r in ev["per_case"]}})
                print(json.dumps({k: v for k, v in out[-1].items() if not k.endswith(("_all", "per_case"))}),
                      flush=True)
    return out


def summarize(records: list[dict]) -> list[dict]:
    """One row per (dataset, method, regime): Dice and seconds per case, one pass vs mirrored, paired by seed."""
    rows = []
    keys = sorted({(r["dataset"], r["method"], r["regime"]) for r in records}, key=str)
    for ds, method, regime in keys:
        plain = {r["seed"]: r for r in records if (r["dataset"], r["method"], r["regime"]) == (ds, method, regime)
                 and not r["mirror_axes"]}
        mirrored = {r["seed"]: r for r in records if (r["dataset"], r["method"], r["regime"]) == (ds, method, regime)
                    and r["mirror_axes"]}
        seeds = sorted(set(plain) & set(mirrored))
        gains = [100 * (mirrored[s]["dice_mean"] - plain[s]["dice_mean"]) for s in seeds]
        one = statistics.mean(plain[s]["seconds_per_case"] for s in seeds)
        eight = statistics.mean(mirrored[s]["seconds_per_case"] for s in seeds)
        rows.append({"dataset": ds, "method": method, "regime": regime, "seeds": len(seeds),
                     "dice_one_pass": round(statistics.mean(plain[s]["dice_mean"] for s in seeds), 4),
                     "dice_mirrored": round(statistics.mean(mirrored[s]["dice_mean"] for s in seeds), 4),
                     "gain_points": round(statistics.mean(gains), 2), "gain_spread": seed_spread(gains),
                     "seconds_one_pass": round(one, 4), "seconds_mirrored": round(eight, 4),
                     "seconds_ratio": round(eight / one, 2)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="phantom,brain")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="phantom, one seed, ours on dense labels (a few minutes)")
    args = ap.parse_args()
    datasets = ["phantom"] if args.quick else args.datasets.split(",")
    seeds = 1 if args.quick else args.seeds
    methods, regimes = (("ours",), ("dense",)) if args.quick else (METHODS, REGIMES)
    results = results_dir(args.quick)
    t = time.perf_counter()
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="crossmodal-mirror-") as tmp:
        for ds in datasets:
            for seed in range(seeds):
                records += measure(Path(tmp), ds, seed, methods, regimes)
    rows = summarize(records)
    ratios: dict[str, dict[bool, float]] = {}
    for ds in datasets:
        get: dict[tuple[str, bool], list[float]] = {(r["regime"], bool(r["mirror_axes"])): [] for r in records}
        for r in records:
            if r["dataset"] == ds and r["method"] == "ours":
                get[(r["regime"], bool(r["mirror_axes"]))].append(r["dice_mean"])
        if get.get(("scribbles", False)) and get.get(("dense", False)):
            ratios[ds] = {m: round(statistics.mean(get[("scribbles", m)]) / statistics.mean(get[("dense", m)]), 4)
                          for m in (False, True)}
    summary: dict[str, Any] = {
        "rows": rows, "ours_scribbles_over_dense": {ds: {"one_pass": v[False], "mirrored": v[True]}
                                                    for ds, v in ratios.items()},
        "seconds": round(time.perf_counter() - t, 1), "records": records}
    atomic_write_text(results / "mirror.json", json.dumps(summary, indent=1))
    print(f"\n{'dataset':8} {'method':14} {'regime':10} {'n':>2} {'Dice 1 pass':>11} {'mirrored':>9} "
          f"{'gain (points, 95% CI)':>26} {'s/case 1':>8} {'mirrored':>8} {'ratio':>6}")
    for r in rows:
        ci = r["gain_spread"]["ci95"]
        ci_text = f"[{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else ""
        print(f"{r['dataset']:8} {r['method']:14} {r['regime']:10} {r['seeds']:2d} {r['dice_one_pass']:11.4f} "
              f"{r['dice_mirrored']:9.4f} {r['gain_points']:+8.2f} {ci_text:>17} {r['seconds_one_pass']:8.3f} "
              f"{r['seconds_mirrored']:8.3f} {r['seconds_ratio']:6.2f}")
    for ds, v in summary["ours_scribbles_over_dense"].items():
        print(f"{ds}: ours scribbles / dense {v['one_pass']:.4f} one pass, {v['mirrored']:.4f} mirrored")
    print(f"{len(records)} evaluations in {summary['seconds']:.0f} s -> {results / 'mirror.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
