"""Scoring a pool of hundreds of cases: the datastore writes, per case (before) vs batched (now), in one run.

The app's scoring (``CrossModalScoring``, the committed phantom weights, CPU) scores every unlabelled case of pools
of 100 .. 800 generated phantom cases (sub-pools of one generated set) with the preprocessed inputs cached, as when
re-scoring after a training run, twice per pool: storing each case's scores as it comes (``flush_s=0``: one rewrite
of the datastore JSON, which holds every case, per case - the behaviour until 2026-12-01) and batched (the default,
at most every 5 s). It checks that every case's scores landed in the datastore either way, times a viewer's Next
Sample on the scored pool (``CrossModalStrategy``) and the scoring MONAI Label runs after it (nothing left to
score), prints a table, writes ``pool.json`` and ``pool.png`` (ms per case vs pool size) to ``RESULTS_DIR``
(default ``bench/results``; ``--quick``: 20 and 40 cases, ``bench/results/quick``).

    python bench/pool.py [--quick] [--sizes 100,200,400,800]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from benchutil import results_dir  # noqa: E402
from crossmodal.config import atomic_write_text, load_config  # noqa: E402
from crossmodal.data.phantom import make_phantom  # noqa: E402
from crossmodal.data.studies import generate  # noqa: E402
from crossmodal.serving.activelearning import SCORES_KEY  # noqa: E402
from crossmodal.serving.app import AppParts  # noqa: E402

WEIGHTS = REPO / "apps" / "crossmodal" / "pretrained" / "phantom_crossmodal.pt"


def sub_pool(src: Path, dest: Path, cases: list[str]) -> Path:
    """A studies folder over the first cases of ``src`` (symlinks: the same files, so the same scoring cache)."""
    (dest / "modalities").mkdir(parents=True)
    for cid in cases:
        (dest / f"{cid}.nii.gz").symlink_to(src / f"{cid}.nii.gz")
        (dest / "modalities" / cid).symlink_to(src / "modalities" / cid, target_is_directory=True)
    return dest


def score_pool(pool: Path, work: Path, cache: Path, flush_s: float, weights: Path) -> dict:
    """Score every case of ``pool`` (a new datastore: none scored yet) with ``weights``, the preprocessed inputs
    cached in ``cache`` as after a training run; seconds, cases scored and cases whose scores the datastore holds."""
    parts = AppParts.from_conf(str(work / "app"), {"preset": "phantom", "pretrained": str(weights),
                                                   "model_dir": str(work / "model")})
    store = parts.datastore(str(pool))
    scoring = parts.scoring(parts.infer())
    scoring.cache_dir, scoring.flush_s = cache, flush_s
    model = Path(scoring.infer_task.get_path())
    t = time.perf_counter()
    out = scoring({}, store)
    seconds = time.perf_counter() - t
    infos = json.loads((pool / "datastore_v2.json").read_text())["objects"]
    fresh = sum((v["image"]["info"].get(SCORES_KEY) or {}).get("model_ts") == os.path.getmtime(model)
                for v in infos.values())
    t = time.perf_counter()
    again = scoring({}, store)  # as MONAI Label does after each Next Sample: nothing new to score
    recheck_s = time.perf_counter() - t
    if again["scored"]:
        raise SystemExit(f"pool of {len(infos)}: scored {again['scored']} cases again with the same model")
    strategy = parts.strategy()
    t = time.perf_counter()
    pick = strategy({"client_id": "bench"}, store)  # a viewer's Next Sample on the scored pool
    next_s = time.perf_counter() - t
    if not pick or pick["id"] not in infos:
        raise SystemExit(f"pool of {len(infos)}: the strategy picked {pick!r}")
    return {"scored": out["scored"], "stored": fresh, "seconds": round(seconds, 3),
            "forward_seconds_per_case": out["seconds_per_case"], "next_sample_seconds": round(next_s, 3),
            "recheck_seconds": round(recheck_s, 3),
            "datastore_kb": (pool / "datastore_v2.json").stat().st_size // 1024}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, label in (("per_case", "scores written per case (before)"), ("batched", "batched (now)")):
        xs = [r["cases"] for r in rows]
        ax.plot(xs, [r[mode]["seconds"] / r["cases"] * 1000 for r in rows], "o-", label=label)
    ax.plot(xs, [r["batched"]["forward_seconds_per_case"] * 1000 for r in rows], "k:", label="forward alone")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("unlabelled cases in the pool")
    ax.set_ylabel("ms per case, re-scoring the pool")
    ax.set_title("Scoring a pool (phantom, CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="pools of 20 and 40 cases")
    ap.add_argument("--sizes", help="comma-separated pool sizes (default 100,200,400,800)")
    args = ap.parse_args()
    sizes = sorted(int(s) for s in (args.sizes or ("20,40" if args.quick else "100,200,400,800")).split(","))
    if sizes[0] < 1:
        ap.error(f"--sizes: pool sizes must be positive, got {sizes}")
    results = results_dir(args.quick)
    cfg = load_config("phantom")
    work = Path(tempfile.mkdtemp(prefix="bench-pool-"))
    try:
        src = work / "cases"
        t = time.perf_counter()
        generate(src, cfg, lambda rng: make_phantom(cfg, rng, size=48), sizes[-1], seed=7, prefix="pool")
        print(f"{sizes[-1]} phantom cases generated in {time.perf_counter() - t:.0f} s", flush=True)
        cases = sorted(p.name[: -len(".nii.gz")] for p in src.glob("*.nii.gz"))
        cache, weights = work / "cache", work / WEIGHTS.name
        shutil.copy(WEIGHTS, weights)
        warm = score_pool(sub_pool(src, work / "warm", cases), work / "warm_app", cache, 5.0, weights)  # the cache
        print(f"first sight (read + preprocess + score) {warm['seconds']:.0f} s for {warm['scored']} cases", flush=True)
        rows = []
        for n in sizes:
            row: dict = {"cases": n}
            for mode, flush_s in (("per_case", 0.0), ("batched", 5.0)):
                pool = sub_pool(src, work / f"{mode}_{n}", cases[:n])
                row[mode] = score_pool(pool, work / f"{mode}_{n}_app", cache, flush_s, weights)
                if row[mode]["scored"] != n or row[mode]["stored"] != n:
                    raise SystemExit(f"pool of {n}, {mode}: scored {row[mode]['scored']}, stored "
                                     f"{row[mode]['stored']} of {n} cases")
            row["speedup"] = round(row["per_case"]["seconds"] / row["batched"]["seconds"], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'cases':>6} {'JSON kB':>8} {'before s':>11} {'now s':>10} {'before ms':>9} {'now ms':>8} "
          f"{'forward ms':>11} {'before/now':>11} {'next sample s':>14} {'re-check s':>11}")
    for r in rows:
        p, b = r["per_case"], r["batched"]
        print(f"{r['cases']:6d} {b['datastore_kb']:8d} {p['seconds']:11.2f} {b['seconds']:10.2f} "
              f"{p['seconds'] / r['cases'] * 1000:9.1f} {b['seconds'] / r['cases'] * 1000:8.1f} "
              f"{b['forward_seconds_per_case'] * 1000:11.1f} {r['speedup']:10.2f}x {b['next_sample_seconds']:14.3f} "
              f"{b['recheck_seconds']:11.3f}")
    atomic_write_text(results / "pool.json", json.dumps({"weights": str(WEIGHTS.relative_to(REPO)), "rows": rows},
                                                        indent=2))
    plot(rows, results / "pool.png")
    print(f"\nwrote {results / 'pool.json'}, {results / 'pool.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
