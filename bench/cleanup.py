"""Largest-component clean-up (``infer.largest_component``): what it gives each network, in the same run.

The quality benchmark's pools, training recipe and test split (12 cases), brain scribbles by default: ours and
``baseline_unet`` trained per seed, each model evaluated on the test split without the clean-up (the presets'
default: the benchmark's figure, checked) and with each setting of ``SETTINGS`` (the shipped path: the infer task's
post-transform, MONAI's ``KeepLargestConnectedComponent``). Prints per setting and method the mean Dice and HD95 over
seeds, the paired change and ours' lead over ``baseline_unet`` (95 % CI over seeds); writes ``cleanup.json`` to
``RESULTS_DIR`` (default ``bench/results``; ``--quick``: ``bench/results/quick``).

    python bench/cleanup.py [--dataset brain] [--regime scribbles] [--seeds 5] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import quality as q  # noqa: E402
from benchutil import results_dir, seed_spread  # noqa: E402
from crossmodal.config import FOREGROUND, atomic_write_text, load_config, save_config  # noqa: E402
from crossmodal.serving.offline import evaluate  # noqa: E402

METHODS = ("ours", "baseline_unet")


def settings(dataset: str) -> dict[str, tuple[str, ...]]:
    """Name -> ``infer.largest_component``: none, the foreground as one, the first two classes, every class."""
    classes = list(load_config(q.DATASETS[dataset]["preset"]).labels.foreground)
    return {"none": (), FOREGROUND: (FOREGROUND,), "+".join(classes[:2]): tuple(classes[:2]),
            "every class": tuple(classes)}


def measure(root: Path, dataset: str, regime: str, seed: int) -> list[dict]:
    """Train each method (seed ``seed``), evaluate its model under every setting."""
    spec = q.DATASETS[dataset]
    pool, test = q.make_pool(root / f"{dataset}_s{seed}", dataset, load_config(spec["preset"]), spec, seed, 0.0)
    out: list[dict] = []
    for method in METHODS:
        trained = q.run(root, dataset, spec, method, regime, 0.0, seed, pool, test)[0]
        tag = f"{dataset}_{method}_{regime}_0mm_s{seed}"
        model = next((root / "models" / tag).glob("*.pt"))
        cfg = load_config(str(root / "configs" / f"{tag}.yaml"))
        for i, (name, keep) in enumerate(settings(dataset).items()):
            cfg.infer.largest_component = keep
            preset = root / "configs" / f"{tag}_cleanup{i}.yaml"
            save_config(cfg, preset)
            ev = evaluate(str(test), str(preset), str(model), "auto", network=cfg.model.name)
            if not keep and abs(ev["dice_mean"] - trained["dice_mean"]) > 1e-3:
                raise RuntimeError(f"{tag}: without clean-up {ev['dice_mean']:.4f}, training's evaluation "
                                   f"{trained['dice_mean']:.4f}")
            out.append({"dataset": dataset, "regime": regime, "method": method, "seed": seed, "setting": name,
                        "largest_component": list(keep), "dice_mean": round(ev["dice_mean"], 4),
                        "hd95_mean": round(ev["hd95_mean"], 2),
                        "dice_per_class": {k: round(v, 4) for k, v in ev["dice_per_class"].items()},
                        "hd95_per_class": {k: round(v, 2) for k, v in ev["hd95_per_class"].items()}})
            print(json.dumps({k: v for k, v in out[-1].items() if not k.endswith("per_class")}), flush=True)
    return out


def summarize(records: list[dict]) -> list[dict]:
    """One row per setting: each method's mean Dice / HD95 and change against none, and ours' lead, paired by seed."""
    get = {(r["setting"], r["method"], r["seed"]): r for r in records}
    seeds = sorted({r["seed"] for r in records})
    rows = []
    for name in dict.fromkeys(r["setting"] for r in records):
        row: dict = {"setting": name, "seeds": len(seeds)}
        for m in METHODS:
            row[m] = {"dice": round(statistics.mean(get[name, m, s]["dice_mean"] for s in seeds), 4),
                      "hd95": round(statistics.mean(get[name, m, s]["hd95_mean"] for s in seeds), 2),
                      "change_points": seed_spread([100 * (get[name, m, s]["dice_mean"]
                                                           - get["none", m, s]["dice_mean"]) for s in seeds])}
        row["lead_points"] = seed_spread([100 * (get[name, "ours", s]["dice_mean"]
                                                 - get[name, "baseline_unet", s]["dice_mean"]) for s in seeds])
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="brain", choices=sorted(q.DATASETS))
    ap.add_argument("--regime", default="scribbles", choices=q.REGIMES)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="one seed")
    args = ap.parse_args()
    seeds = 1 if args.quick else args.seeds
    results = results_dir(args.quick)
    t = time.perf_counter()
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="crossmodal-cleanup-") as tmp:
        for seed in range(seeds):
            records += measure(Path(tmp), args.dataset, args.regime, seed)
    rows = summarize(records)
    atomic_write_text(results / "cleanup.json", json.dumps(
        {"rows": rows, "seconds": round(time.perf_counter() - t, 1), "records": records}, indent=1) + "\n")

    def mean_ci(s: dict) -> str:
        mean = statistics.mean(s["per_seed"])
        return f"{mean:+.2f}" + (f" [{s['ci95'][0]:+.2f}, {s['ci95'][1]:+.2f}]" if s["ci95"] else "")
    print(f"\n{args.dataset} {args.regime}, {seeds} seed(s)")
    print(f"{'largest_component':28} {'ours Dice':>9} {'HD95':>6} {'change':>22} {'baseline':>9} {'HD95':>6} "
          f"{'change':>22} {'lead (points)':>22}")
    for r in rows:
        o, b = r["ours"], r["baseline_unet"]
        print(f"{r['setting']:28} {o['dice']:9.4f} {o['hd95']:6.2f} {mean_ci(o['change_points']):>22} "
              f"{b['dice']:9.4f} {b['hd95']:6.2f} {mean_ci(b['change_points']):>22} {mean_ci(r['lead_points']):>22}")
    print(f"{len(records)} evaluations in {time.perf_counter() - t:.0f} s -> {results / 'cleanup.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
