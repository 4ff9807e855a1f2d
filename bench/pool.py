"""Scoring a pool of hundreds of cases: the datastore writes, per case (before) vs batched (now), in one run.

The app's scoring (``CrossModalScoring``, the committed phantom weights, CPU) scores every unlabelled case of pools
of 100 .. 800 generated phantom cases (sub-pools of one generated set) with the preprocessed inputs cached, as when
re-scoring after a training run (each pool and way its own cache of its cases' inputs; the run exits if any is
read and preprocessed again), twice per pool: storing each case's scores as it comes (``flush_s=0``: one rewrite
of the datastore JSON, which holds every case, per case - the behaviour until 2026-12-01) and batched (the default,
at most every 5 s). It checks that every case's scores landed in the datastore either way, times a viewer's Next
Sample on the scored pool (``CrossModalStrategy``) and the scoring MONAI Label runs after it (nothing left to
score), prints a table (with each way's forward per case and its seconds in Python's garbage collector, which the
per-case JSON rewrites' allocations wake). Then training: one epoch of the app's train task (phantom preset, ours,
CPU, a fresh process each) on 2 dense labels + 100 and 400 unlabelled cases, every unlabelled case in the epoch
(before, ``train.consistency.max_unlabeled_per_epoch`` unbounded) vs the default 32 (the rest walked in turn over
the epochs): steps, seconds, peak RSS. Writes ``pool.json`` and ``pool.png`` (ms per case vs pool size) to
``RESULTS_DIR`` (default ``bench/results``; ``--quick``: 20 and 40 cases, ``bench/results/quick``).

    python bench/pool.py [--quick] [--sizes 100,200,400,800] [--train-sizes 100,400] [--parts scoring,training]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

from benchutil import results_dir  # noqa: E402
from crossmodal.config import CrossModalConfig, atomic_write_text, load_config  # noqa: E402
from crossmodal.data.phantom import make_phantom  # noqa: E402
from crossmodal.data.studies import generate  # noqa: E402
from crossmodal.serving.activelearning import SCORES_KEY, model_key  # noqa: E402
from crossmodal.serving.app import AppParts  # noqa: E402

WEIGHTS = REPO / "apps" / "crossmodal" / "pretrained" / "phantom_crossmodal.pt"


def sub_pool(src: Path, dest: Path, cases: list[str]) -> Path:
    """A studies folder over the first cases of ``src`` (symlinks: the same files, so the same scoring cache)."""
    (dest / "modalities").mkdir(parents=True)
    for cid in cases:
        (dest / f"{cid}.nii.gz").symlink_to(src / f"{cid}.nii.gz")
        (dest / "modalities" / cid).symlink_to(src / "modalities" / cid, target_is_directory=True)
    return dest


def pool_cache(cache: Path, dest: Path, cases: list[str]) -> Path:
    """A scoring cache for one pool: hard links to ``cache``'s inputs of its ``cases``. Each scoring prunes the
    cached inputs of cases not in its datastore, so one cache shared by the pools (until 2026-12-05) lost the larger
    pools' cases to a smaller pool's prune, and the next larger pool read and preprocessed them again inside its
    timing (the per-case rows from 200 cases on)."""
    dest.mkdir(parents=True)
    for cid in cases:
        os.link(cache / f"{cid}.pt", dest / f"{cid}.pt")
    return dest


def cache_state(cache: Path) -> dict[str, int]:
    """Inode of every cached input in ``cache`` (a case preprocessed again is written to a new file)."""
    return {f.name: f.stat().st_ino for f in cache.glob("*.pt")}


@contextmanager
def gc_clock() -> Iterator[dict]:
    """Seconds spent in Python's garbage collector inside the block, and its collections: ``{"seconds", "runs"}``
    (filled in when the block ends)."""
    out, start = {"seconds": 0.0, "runs": 0}, [0.0]

    def clock(phase: str, info: dict) -> None:
        if phase == "start":
            start[0] = time.perf_counter()
        else:
            out["seconds"] += time.perf_counter() - start[0]
            out["runs"] += 1

    gc.callbacks.append(clock)
    try:
        yield out
    finally:
        gc.callbacks.remove(clock)


def score_pool(pool: Path, work: Path, cache: Path, flush_s: float, weights: Path, rescoring: bool = True) -> dict:
    """Score every case of ``pool`` (a new datastore: none scored yet) with ``weights``, the preprocessed inputs
    cached in ``cache`` as after a training run; seconds, cases scored and cases whose scores the datastore holds.
    ``rescoring``: exits if any case's input was not in ``cache`` (read and preprocessed inside the timing)."""
    parts = AppParts.from_conf(str(work / "app"), {"preset": "phantom", "pretrained": str(weights),
                                                   "model_dir": str(work / "model")})
    store = parts.datastore(str(pool))
    scoring = parts.scoring(parts.infer())
    scoring.cache_dir, scoring.flush_s = cache, flush_s
    model = Path(scoring.infer_task.get_path())
    before = cache_state(cache)
    with gc_clock() as collected:
        t = time.perf_counter()
        out = scoring({}, store)
        seconds = time.perf_counter() - t
    redone = sorted(k for k, v in cache_state(cache).items() if before.get(k) != v)
    if rescoring and redone:
        raise SystemExit(f"pool of {out['scored']} (flush_s {flush_s}): {len(redone)} cases were read and preprocessed "
                         f"again (e.g. {redone[0]}), so the timing is not a re-scoring's")
    infos = json.loads((pool / "datastore_v2.json").read_text())["objects"]
    key = model_key(parts.cfg, str(model))  # what the scoring stores with a current score
    fresh = sum((v["image"]["info"].get(SCORES_KEY) or {}).get("model_key") == key for v in infos.values())
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
            "recheck_seconds": round(recheck_s, 3), "gc_seconds": round(collected["seconds"], 3),
            "gc_runs": collected["runs"],
            "datastore_kb": (pool / "datastore_v2.json").stat().st_size // 1024}


TRAIN_CHILD = """
import json, sys, time
from crossmodal.serving.offline import train_offline
from crossmodal.serving.train import run_folders
t = time.perf_counter()
train_offline(sys.argv[1], sys.argv[2], sys.argv[3], epochs=1, device="cpu", network="crossmodal")
seconds = time.perf_counter() - t
rss = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:")) / 1024**2
curve = json.loads((run_folders(sys.argv[3])[-1] / "learning_curve.json").read_text())
print("RESULT " + json.dumps({"seconds": round(seconds, 1), "steps": curve[-1]["iteration"],
                              "peak_rss_gb": round(rss, 2)}))
"""


def train_epoch(studies: Path, work: Path, cap: int) -> dict:
    """One epoch of the app's train task (phantom preset, ours, CPU) on ``studies``, in a fresh process, with
    ``train.consistency.max_unlabeled_per_epoch`` = ``cap``: seconds, steps, peak RSS."""
    from crossmodal.config import save_config
    from crossmodal.serving.offline import method_config

    preset = work / f"cap{cap}.yaml"
    save_config(method_config("phantom", "ours", {"train": {"consistency": {"max_unlabeled_per_epoch": cap}}}),
                preset)
    model_dir = work / f"model_{studies.name}_cap{cap}"  # a new one per run: nothing to fine-tune from
    out = subprocess.run([sys.executable, "-c", TRAIN_CHILD, str(studies), str(preset), str(model_dir)],
                         capture_output=True, text=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if out.returncode or line is None:
        raise SystemExit(f"training with max_unlabeled_per_epoch {cap} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


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


def scoring_part(sizes: list[int], work: Path, cfg: CrossModalConfig) -> list[dict]:
    src = work / "cases"
    t = time.perf_counter()
    generate(src, cfg, lambda rng: make_phantom(cfg, rng, size=48), sizes[-1], seed=7, prefix="pool")
    print(f"{sizes[-1]} phantom cases generated in {time.perf_counter() - t:.0f} s", flush=True)
    cases = sorted(p.name[: -len(".nii.gz")] for p in src.glob("*.nii.gz"))
    cache, weights = work / "cache", work / WEIGHTS.name
    shutil.copy(WEIGHTS, weights)
    warm = score_pool(sub_pool(src, work / "warm", cases), work / "warm_app", cache, 5.0, weights,
                      rescoring=False)  # the cache
    print(f"first sight (read + preprocess + score) {warm['seconds']:.0f} s for {warm['scored']} cases", flush=True)
    rows = []
    for n in sizes:
        row: dict = {"cases": n}
        for mode, flush_s in (("per_case", 0.0), ("batched", 5.0)):
            pool = sub_pool(src, work / f"{mode}_{n}", cases[:n])
            own = pool_cache(cache, work / f"{mode}_{n}_cache", cases[:n])
            row[mode] = score_pool(pool, work / f"{mode}_{n}_app", own, flush_s, weights)
            if row[mode]["scored"] != n or row[mode]["stored"] != n:
                raise SystemExit(f"pool of {n}, {mode}: scored {row[mode]['scored']}, stored "
                                 f"{row[mode]['stored']} of {n} cases")
        row["speedup"] = round(row["per_case"]["seconds"] / row["batched"]["seconds"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'cases':>6} {'JSON kB':>8} {'before s':>11} {'now s':>10} {'before ms':>9} {'now ms':>8} "
          f"{'fwd ms before':>13} {'fwd ms now':>10} {'gc s before':>11} {'gc s now':>8} {'before/now':>11} "
          f"{'next sample s':>14} {'re-check s':>11}")
    for r in rows:
        p, b = r["per_case"], r["batched"]
        print(f"{r['cases']:6d} {b['datastore_kb']:8d} {p['seconds']:11.2f} {b['seconds']:10.2f} "
              f"{p['seconds'] / r['cases'] * 1000:9.1f} {b['seconds'] / r['cases'] * 1000:8.1f} "
              f"{p['forward_seconds_per_case'] * 1000:13.1f} {b['forward_seconds_per_case'] * 1000:10.1f} "
              f"{p['gc_seconds']:11.2f} {b['gc_seconds']:8.2f} {r['speedup']:10.2f}x {b['next_sample_seconds']:14.3f} "
              f"{b['recheck_seconds']:11.3f}")
    return rows


def training_part(sizes: list[int], work: Path, cfg: CrossModalConfig) -> list[dict]:
    """One training epoch on 2 dense labels + each pool of unlabelled cases: every unlabelled case an epoch (before,
    ``max_unlabeled_per_epoch`` unbounded) vs the default 32."""
    default = cfg.train.consistency.max_unlabeled_per_epoch
    rows: list[dict[str, Any]] = []
    for n in sizes:
        studies = work / f"train_{n}"
        generate(studies, cfg, lambda rng: make_phantom(cfg, rng, size=48), n + 2, seed=8, prefix="pool", dense=2)
        row: dict[str, Any] = {"unlabeled": n, "dense": 2, "every_case": train_epoch(studies, work, 10**9),
               "capped": train_epoch(studies, work, default), "cap": default}
        row["speedup"] = round(row["every_case"]["seconds"] / row["capped"]["seconds"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\none training epoch, 2 dense labels + unlabelled cases (phantom preset, CPU)\n{'unlabelled':>10} "
          f"{'steps before':>13} {'s before':>9} {'GB before':>10} {'steps now':>10} {'s now':>7} {'GB now':>7} "
          f"{'before/now':>11}")
    for r in rows:
        e, c = r["every_case"], r["capped"]
        print(f"{r['unlabeled']:10d} {e['steps']:13d} {e['seconds']:9.1f} {e['peak_rss_gb']:10.2f} {c['steps']:10d} "
              f"{c['seconds']:7.1f} {c['peak_rss_gb']:7.2f} {r['speedup']:10.2f}x")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="pools of 20 and 40 cases; training on 40")
    ap.add_argument("--sizes", help="comma-separated pool sizes to score (default 100,200,400,800)")
    ap.add_argument("--train-sizes", help="comma-separated unlabelled pool sizes to train on (default 100,400)")
    ap.add_argument("--parts", default="scoring,training",
                    help="scoring, training or both (default); a part not run keeps its rows of RESULTS_DIR/pool.json")
    args = ap.parse_args()
    parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    if not parts or parts - {"scoring", "training"}:
        ap.error(f"--parts: scoring and/or training, got {args.parts!r}")
    sizes = sorted(int(s) for s in (args.sizes or ("20,40" if args.quick else "100,200,400,800")).split(","))
    train_sizes = sorted(int(s) for s in (args.train_sizes or ("40" if args.quick else "100,400")).split(","))
    if min(sizes + train_sizes) < 1:
        ap.error(f"pool sizes must be positive, got {sizes} and {train_sizes}")
    results = results_dir(args.quick)
    previous = json.loads((results / "pool.json").read_text()) if (results / "pool.json").is_file() else {}
    out = {"weights": str(WEIGHTS.relative_to(REPO)), "rows": previous.get("rows", []),
           "training": previous.get("training", [])}
    cfg = load_config("phantom")
    work = Path(tempfile.mkdtemp(prefix="bench-pool-"))
    try:
        if "scoring" in parts:
            out["rows"] = scoring_part(sizes, work, cfg)
        if "training" in parts:
            out["training"] = training_part(train_sizes, work, cfg)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    atomic_write_text(results / "pool.json", json.dumps(out, indent=2))
    if out["rows"]:
        plot(out["rows"], results / "pool.png")
    print(f"\nwrote {results / 'pool.json'}, {results / 'pool.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
