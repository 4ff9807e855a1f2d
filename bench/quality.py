"""Segmentation quality under annotation regimes, misregistration and a missing modality, in one run.

For the phantom (CT + PET + MR) and the real brain data (SPM12 T1 / T2 / PD), with a fixed held-out test split of
dense truth, for several seeds, it trains through the app's own train task (``train_offline``) and evaluates
(``evaluate``: Dice and HD95 per class):

* methods: ``ours`` (CrossModalNet + hybrid losses), ``baseline_unet`` (early-fusion UNet with the partial loss,
  the nnU-Net ignore-label recipe) and ``single_<modality>`` (that UNet on one modality; every modality under
  dense labels, the best of them under the other regimes); for comparison only, ``baseline_unet+registration``
  (given our co-registration; dense, 0 and 4 mm), ``baseline_unet+propagation`` (given our random-walker
  propagation of scribbles; the scribble regimes) and ``baseline_unet+transfer`` (given our stroke transfer, where
  the preset has it: the brain's scribble regimes): how much of our gains those parts explain;
* regimes: ``dense`` (all training cases), ``scribbles`` (all), ``dense10`` (10 % dense, nothing else),
  ``dense10_unlabeled`` (the same + the rest unlabelled), ``scribbles30_unlabeled`` (30 % scribbles + the rest
  unlabelled);
* robustness: secondary modalities misregistered by 0 / 2 / 4 / 8 mm in training and test data (dense; ours and
  baseline_unet), and one secondary modality missing at test time (ours, dense) against the single-modality
  models of the remaining modalities. The cases are the same at every misregistration (same generator seeds; only
  the secondary modalities' motion differs), so a misregistration's cost is a paired difference.

Every run gets the same number of optimiser steps. It prints a table (mean +- sd over seeds of Dice and HD95 per
class) and writes ``quality.json`` (one record per run) and ``quality.png`` to ``RESULTS_DIR`` (default
``bench/results``; ``--quick``: ``bench/results/quick``, so a quick check leaves the full run's figures alone).

    python bench/quality.py [--quick] [--seeds 5] [--datasets phantom,brain] [--only ours:dense10_unlabeled | ours]
    python bench/quality.py --first-seed 3     # seeds 3 and 4 added to an earlier 3-seed quality.json
    python bench/quality.py --summarize        # tables, goals (with their seeds' 95 % CI) and PNG of quality.json again
    python bench/quality.py --summarize --markdown  # the README's results and goal tables (Markdown)
    python bench/quality.py --resume           # go on with an interrupted run (same options, code unchanged)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]

from benchutil import code_changes, git_commit, results_dir, seed_spread  # noqa: E402
from crossmodal.config import CrossModalConfig, atomic_write_text, load_config, save_config  # noqa: E402
from crossmodal.data.brain import load_templates, make_brain_case  # noqa: E402
from crossmodal.data.phantom import SyntheticCase, make_phantom  # noqa: E402
from crossmodal.data.sparse import annotated_fraction, sparsify  # noqa: E402
from crossmodal.data.studies import FINAL_LABELS, write_case  # noqa: E402
from crossmodal.io import load_volume, save_volume  # noqa: E402
from crossmodal.serving.offline import dice_per_case, epoch_length, evaluate, method_config, train_offline  # noqa: E402

REGIMES = ("dense", "scribbles", "dense10", "dense10_unlabeled", "scribbles30_unlabeled")
MISREGISTRATION = (0.0, 2.0, 4.0, 8.0)
# the one secondary modality left out at test time
MISSING = {"phantom": "pet", "brain": "pd"}
DATASETS: dict[str, dict] = {
    # train / test cases, training patch, optimiser steps per run (the same for every method and regime); 12 test
    # cases (4 until 2026-11-30: a run's 4-case mean lay 0.8 points from its 12-case mean on average, up to 3.6); the
    # training cases and so the trained models are the same as with 4, whose cases are the first 4 of the 12
    "phantom": {"preset": "phantom", "train": 10, "test": 12, "patch": 32, "steps": 300},
    "brain": {"preset": "brain", "train": 10, "test": 12, "patch": 32, "steps": 300},
}


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def case_maker(dataset: str, cfg: CrossModalConfig, misregistration_mm: float
               ) -> Callable[[np.random.Generator], SyntheticCase]:
    if dataset == "phantom":
        return lambda rng: make_phantom(cfg, rng, size=48, misregistration_mm=misregistration_mm)
    templates = load_templates(REPO / "data" / "spm12")
    return lambda rng: make_brain_case(cfg, templates, rng, spacing=3.0, misregistration_mm=misregistration_mm)


def make_pool(root: Path, dataset: str, cfg: CrossModalConfig, spec: dict, seed: int, mm: float) -> tuple[Path, Path]:
    """Training images with their truth (``<pool>/truth``) and a test studies folder (truth, no labels)."""
    make = case_maker(dataset, cfg, mm)
    pool, test = root / "pool", root / "test"
    for i in range(spec["train"] + spec["test"]):
        case = make(np.random.default_rng([seed, i]))  # the same cases at every misregistration: paired
        if i < spec["train"]:
            write_case(pool, f"case{i:03d}", case, cfg)
        else:
            write_case(test, f"test{i:03d}", case, cfg)
    return pool, test


def regime_studies(pool: Path, out: Path, regime: str, cfg: CrossModalConfig, seed: int) -> dict:
    """A studies folder over the pool's images (symlinks) with the regime's labels; returns its label counts."""
    cases = sorted(p.name[: -len(".nii.gz")] for p in pool.glob("*.nii.gz"))
    n = len(cases)
    n_dense = {"dense": n, "dense10": math.ceil(0.1 * n), "dense10_unlabeled": math.ceil(0.1 * n)}.get(regime, 0)
    n_sparse = {"scribbles": n, "scribbles30_unlabeled": math.ceil(0.3 * n)}.get(regime, 0)
    out.mkdir(parents=True)
    (out / "modalities").mkdir()
    rng = np.random.default_rng([seed, 99])
    order = [cases[i] for i in rng.permutation(n)]
    voxels = 0
    for cid in cases:
        (out / f"{cid}.nii.gz").symlink_to(pool / f"{cid}.nii.gz")
        (out / "modalities" / cid).symlink_to(pool / "modalities" / cid, target_is_directory=True)
    for j, cid in enumerate(order[: n_dense + n_sparse]):
        truth = load_volume(pool / "truth" / f"{cid}.nii.gz")
        lab = np.rint(truth[0].numpy()).astype(np.int64)
        if j >= n_dense:
            lab = sparsify(lab, cfg.labels, "scribbles", rng)
        voxels += int(round(annotated_fraction(lab) * lab.size)) if j >= n_dense else lab.size
        save_volume(out / FINAL_LABELS / f"{cid}.nii.gz", lab, truth.affine.numpy())
    return {"dense": n_dense, "sparse": n_sparse, "unlabeled": n - n_dense - n_sparse, "annotated_voxels": voxels}


REGISTERED = "+registration"  # suffix of a baseline run given our co-registration (for comparison only)
PROPAGATED = "+propagation"  # suffix of a baseline run given our scribble propagation (for comparison only)
TRANSFERRED = "+transfer"  # suffix of a baseline run given our stroke transfer (for comparison only)
VARIANTS = {REGISTERED: "_reg", PROPAGATED: "_prop", TRANSFERRED: "_xfer"}  # suffix -> its runs' folder tag


def run_config(spec: dict, method: str, seed: int) -> tuple[CrossModalConfig, str]:
    """The config of one run of ``method`` (a comparison suffix included) and its folder tag's method part.

    Ours co-registers the modalities (``data.register``, the preset's default); the baselines follow the nnU-Net
    recipe, which takes the modalities as they are, unless ``method`` ends with ``+registration``; ``+propagation``
    and ``+transfer`` give them our scribble propagation / ours' stroke transfer."""
    overrides: dict[str, Any] = {"train": {"patch_size": [spec["patch"]] * 3, "patches_per_case": 1, "batch_size": 2,
                           "val_fraction": 0.0, "seed": seed},
                 "infer": {"roi_size": [spec["patch"]] * 3},  # windows = training patches (instance norm)
                 "data": {"spacing": None}}  # each data set at its own voxel size (brain 3 mm), as measured
    variant = next((v for v in VARIANTS if method.endswith(v)), "")
    base_method = method.removesuffix(variant)
    if base_method != "ours" and variant != REGISTERED:
        overrides["data"]["register"] = "none"
    if variant == PROPAGATED:
        overrides["train"]["propagate"] = {"method": "random_walker"}
    if variant == TRANSFERRED:  # as many other cases' strokes as ours gets
        overrides["train"]["consistency"] = {"atlas_sparse": load_config(spec["preset"]).train.consistency.atlas_sparse}
    return method_config(spec["preset"], base_method, overrides), base_method + VARIANTS.get(variant, "")


def run_length(cfg: CrossModalConfig, counts: dict, unlabeled: bool, steps: int) -> tuple[int, int]:
    """(epochs, optimiser steps per epoch) of a run of about ``steps`` steps on a regime's label ``counts``
    (:func:`regime_studies`), its unlabeled cases trained on when ``unlabeled`` (a cross-modal network only)."""
    hybrid = unlabeled and cfg.model.name == "crossmodal"
    per_epoch = epoch_length(counts, hybrid, 2, cfg.train.consistency.unlabeled_per_step(hybrid and counts["dense"] > 0,
                                                                                        False),
                             cfg.train.consistency.max_unlabeled_per_epoch)
    return max(1, round(steps / per_epoch)), per_epoch


def run(root: Path, dataset: str, spec: dict, method: str, regime: str, mm: float, seed: int, pool: Path, test: Path,
        drops: tuple[str | None, ...] = (None,)) -> list[dict]:
    """Train one method on one regime (:func:`run_config`), evaluate it on the test split (once per entry of
    ``drops``)."""
    cfg, name = run_config(spec, method, seed)
    tag = f"{dataset}_{name}_{regime}_{mm:g}mm_s{seed}"
    preset = root / "configs" / f"{tag}.yaml"
    save_config(cfg, preset)
    studies = root / "studies" / tag
    counts = regime_studies(pool, studies, regime, cfg, seed)
    unlabeled = regime.endswith("_unlabeled")
    epochs, steps_per_epoch = run_length(cfg, counts, unlabeled, spec["steps"])
    reset_peak_rss()
    t = time.perf_counter()
    stats = train_offline(str(studies), str(preset), str(root / "models" / tag), epochs=epochs, device="auto",
                          network=cfg.model.name, use_unlabeled=unlabeled)
    train_s = time.perf_counter() - t
    rss = peak_rss_gb()
    records = []
    for drop in drops:
        ev = evaluate(str(test), str(preset), stats["published"], "auto", network=cfg.model.name,
                      drop=(drop,) if drop else ())
        records.append({
            "dataset": dataset, "method": method, "regime": regime, "misregistration_mm": mm,
            "missing_modality": drop, "seed": seed, "dice_mean": round(ev["dice_mean"], 4),
            "hd95_mean": round(ev["hd95_mean"], 2),
            "dice_per_class": {k: round(v, 4) for k, v in ev["dice_per_class"].items()},
            "hd95_per_class": {k: round(v, 2) for k, v in ev["hd95_per_class"].items()},
            "train_seconds": round(train_s, 1), "peak_rss_gb": round(rss, 3), "steps": epochs * steps_per_epoch,
            "labels": counts, "test_cases": ev["cases"],
            "dice_per_case": dice_per_case(ev),
        })
        brief = {k: v for k, v in records[-1].items() if not k.endswith(("per_class", "per_case"))}
        print(json.dumps(brief), flush=True)
    return records


def experiments(dataset: str, quick: bool) -> list[tuple[str, str, float, tuple]]:
    """(method, regime, misregistration, drops) to run, except the best single-modality ones (chosen later)."""
    cfg = load_config(DATASETS[dataset]["preset"])
    regimes = REGIMES[:4] if quick else REGIMES
    out = [("ours", r, 0.0, (None, MISSING[dataset]) if r == "dense" else (None,)) for r in regimes]
    out += [("baseline_unet", r, 0.0, (None,)) for r in regimes]
    # every modality alone under dense labels (quick: only those that remain when MISSING is left out)
    singles = [m for m in cfg.modality_names if not (quick and m == MISSING[dataset])]
    out += [(f"single_{m}", "dense", 0.0, (None,)) for m in singles]
    for mm in (MISREGISTRATION[2:3] if quick else MISREGISTRATION[1:]):
        out += [("ours", "dense", mm, (None,)), ("baseline_unet", "dense", mm, (None,))]
    # the baseline given our co-registration, at 0 and 4 mm: how much of the robustness is the registration
    out += [(f"baseline_unet{REGISTERED}", "dense", mm, (None,)) for mm in (0.0, 4.0)]
    # the baseline given our scribble propagation: how much of the gain from scribbles is the propagation
    out += [(f"baseline_unet{PROPAGATED}", r, 0.0, (None,)) for r in regimes if r.startswith("scribbles")]
    # the baseline given our stroke transfer (presets that have it): how much of the scribbles' lead is the transfer
    if cfg.train.consistency.atlas_sparse:
        out += [(f"baseline_unet{TRANSFERRED}", r, 0.0, (None,)) for r in regimes if r.startswith("scribbles")]
    return out


def summarize(records: list[dict]) -> dict:
    """Mean +- sd over seeds per (dataset, method, regime, misregistration, missing) and the goal checks."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["method"], r["regime"], r["misregistration_mm"], r["missing_modality"]),
                          []).append(r)

    def stat(rs: list[dict], key: str) -> tuple[float, float]:
        v = [r[key] for r in rs if r[key] == r[key]]
        return (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0) if v else (float("nan"), 0.0)

    rows = []
    for (ds, method, regime, mm, missing), rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        d, dsd = stat(rs, "dice_mean")
        h, hsd = stat(rs, "hd95_mean")
        classes = list(rs[0]["dice_per_class"])
        rows.append({"dataset": ds, "method": method, "regime": regime, "misregistration_mm": mm,
                     "missing_modality": missing, "seeds": len(rs), "dice": d, "dice_sd": dsd, "hd95": h,
                     "hd95_sd": hsd, "train_seconds": statistics.mean(r["train_seconds"] for r in rs),
                     "peak_rss_gb": max(r["peak_rss_gb"] for r in rs),
                     "dice_per_class": {c: statistics.mean(r["dice_per_class"][c] for r in rs) for c in classes},
                     "hd95_per_class": {c: statistics.mean(r["hd95_per_class"][c] for r in rs) for c in classes}})
    return {"rows": rows, "goals": goals(rows, records)}


def goals(rows: list[dict], records: list[dict]) -> list[dict]:
    """The issue's goals, measured: value (from the means over seeds), threshold, met, and each goal's per-seed
    values (paired by seed, from ``records``) with their spread (:func:`seed_spread`)."""
    def get(ds: str, method: str, regime: str, mm: float = 0.0, missing: str | None = None) -> float | None:
        for r in rows:
            if (r["dataset"], r["method"], r["regime"], r["misregistration_mm"], r["missing_modality"]) == \
                    (ds, method, regime, mm, missing):
                return r["dice"]
        return None

    def by_seed(ds: str, method: str, regime: str, mm: float = 0.0, missing: str | None = None) -> dict[int, float]:
        return {r["seed"]: r["dice_mean"] for r in records
                if (r["dataset"], r["method"], r["regime"], r["misregistration_mm"], r["missing_modality"])
                == (ds, method, regime, mm, missing)}

    def paired(f: Callable[..., float], *runs: tuple) -> list[float]:
        """``f`` of the runs' Dice, seed by seed, over the seeds every run has."""
        per = [by_seed(ds, *run) for run in runs]
        common = sorted(set.intersection(*(set(p) for p in per))) if per else []
        return [f(*(p[s] for p in per)) for s in common]

    def points(a: float, b: float) -> float:
        return 100 * (a - b)

    out = []
    for ds in sorted({r["dataset"] for r in rows}):
        def add(name: str, value: float | None, threshold: str, met: bool | None, per_seed: list[float],
                ds: str = ds, ceiling: tuple[float, list[float]] | None = None) -> None:
            out.append({"dataset": ds, "goal": name, "value": None if value is None else round(value, 4),
                        "threshold": threshold, "met": met, **seed_spread(per_seed)})
            if ceiling is not None:  # the same goal with ours' unlabeled cases densely labelled: ours dense
                out[-1]["ceiling"] = {"value": round(ceiling[0], 4), **seed_spread(ceiling[1])}

        def dense_ceiling(other: tuple, ds: str = ds) -> tuple[float, list[float]] | None:
            """Ours from dense labels on every training case - ``other``: what the unlabeled cases could add."""
            o, b = get(ds, "ours", "dense"), get(ds, *other)
            return None if o is None or b is None else (points(o, b), paired(points, ("ours", "dense"), other))

        dense, scrib = get(ds, "ours", "dense"), get(ds, "ours", "scribbles")
        if dense and scrib is not None:
            add("ours scribbles / ours dense", scrib / dense, ">= 0.95", scrib / dense >= 0.95,
                paired(lambda s, d: s / d, ("ours", "scribbles"), ("ours", "dense")))
        for regime in ("scribbles", "dense10_unlabeled"):
            o, b = get(ds, "ours", regime), get(ds, "baseline_unet", regime)
            if o is not None and b is not None:
                add(f"ours - baseline_unet, {regime} (Dice points)", points(o, b), ">= 3", points(o, b) >= 3,
                    paired(points, ("ours", regime), ("baseline_unet", regime)),
                    ceiling=dense_ceiling(("baseline_unet", regime)) if regime == "dense10_unlabeled" else None)
        a, b = get(ds, "ours", "dense10_unlabeled"), get(ds, "ours", "dense10")
        if a is not None and b is not None:
            add("ours dense10_unlabeled - dense10 (points)", points(a, b), ">= 3", points(a, b) >= 3,
                paired(points, ("ours", "dense10_unlabeled"), ("ours", "dense10")),
                ceiling=dense_ceiling(("ours", "dense10")))
        o0, o4 = get(ds, "ours", "dense"), get(ds, "ours", "dense", 4.0)
        b0, b4 = get(ds, "baseline_unet", "dense"), get(ds, "baseline_unet", "dense", 4.0)
        if o0 is not None and o4 is not None and b0 is not None and b4 is not None:
            cost_o, cost_b = points(o0, o4), points(b0, b4)
            add("4 mm misregistration cost, ours (points)", cost_o, "<= 2 and < baseline's "
                f"{cost_b:.2f}", cost_o <= 2 and cost_o < cost_b,
                paired(points, ("ours", "dense"), ("ours", "dense", 4.0)))
        missing = next((r for r in rows if r["dataset"] == ds and r["missing_modality"]), None)
        if missing:
            singles = [r for r in rows if r["dataset"] == ds and r["method"].startswith("single_")
                       and r["regime"] == "dense" and r["method"] != f"single_{missing['missing_modality']}"]
            if singles:
                best = max(singles, key=lambda r: r["dice"])
                gap = points(missing["dice"], best["dice"])
                add(f"ours without {missing['missing_modality']} - {best['method']} (points)", gap, ">= -2",
                    gap >= -2, paired(points, ("ours", "dense", 0.0, missing["missing_modality"]),
                                      (best["method"], "dense")))
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(len(datasets), 2, figsize=(14, 4.2 * len(datasets)), squeeze=False)
    colors = {"ours": "#d62728", "baseline_unet": "#1f77b4", f"baseline_unet{REGISTERED}": "#2ca02c",
              f"baseline_unet{PROPAGATED}": "#9467bd", f"baseline_unet{TRANSFERRED}": "#8c564b"}
    for i, ds in enumerate(datasets):
        ax = axes[i][0]
        regimes = [g for g in REGIMES if any(r["regime"] == g and r["dataset"] == ds for r in rows)]
        methods = ["ours", "baseline_unet", f"baseline_unet{PROPAGATED}", f"baseline_unet{TRANSFERRED}", "single"]
        methods = [m for m in methods if m == "single" or any(r["method"] == m and r["dataset"] == ds for r in rows)]
        width = 0.8 / len(methods)
        for j, m in enumerate(methods):
            vals, errs, names = [], [], []
            for g in regimes:
                cand = [r for r in rows if r["dataset"] == ds and r["regime"] == g and r["misregistration_mm"] == 0
                        and r["missing_modality"] is None and (r["method"] == m or
                                                               (m == "single" and r["method"].startswith("single_")))]
                best = max(cand, key=lambda r: r["dice"]) if cand else None
                vals.append(best["dice"] if best else float("nan"))  # not run under this regime: no bar
                errs.append(best["dice_sd"] if best else 0)
                names.append(best["method"] if best else m)
            label = m if m != "single" else "best single modality"
            ax.bar(np.arange(len(regimes)) + j * width, vals, width, yerr=errs, label=label,
                   color=colors.get(m, "#7f7f7f"), capsize=3)
        ax.set_xticks(np.arange(len(regimes)) + width * (len(methods) - 1) / 2)
        ax.set_xticklabels(regimes, rotation=15)
        ax.set_ylim(0, 1)
        ax.set_ylabel("mean foreground Dice (test split)")
        ax.set_title(f"{ds}: annotation regimes")
        ax.legend(fontsize=8)
        ax = axes[i][1]
        for m in ("ours", "baseline_unet", f"baseline_unet{REGISTERED}"):
            pts = sorted((r["misregistration_mm"], r["dice"], r["dice_sd"]) for r in rows if r["dataset"] == ds
                         and r["method"] == m and r["regime"] == "dense" and r["missing_modality"] is None)
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", label=m,
                            color=colors[m], capsize=3)
        miss = [r for r in rows if r["dataset"] == ds and r["missing_modality"]]
        for r in miss:
            ax.scatter([0], [r["dice"]], marker="x", color="k", zorder=5,
                       label=f"ours, {r['missing_modality']} missing")
        ax.set_xlabel("secondary modalities misregistered by (mm)")
        ax.set_ylabel("mean foreground Dice")
        ax.set_ylim(0, 1)
        ax.set_title(f"{ds}: robustness (dense labels)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_key(r: dict) -> tuple:
    return r["dataset"], r["method"], r["regime"], r["misregistration_mm"], r["missing_modality"], r["seed"]


# what a run's figures follow (not the benchmark's own output or its documentation)
def resumed(partial: Path, plan: dict, repo: Path = REPO) -> list[dict]:
    """The records that an interrupted run of the same ``plan`` saved to ``partial`` (after each of its runs), if
    the code that made them is the code of now (:func:`code_changes`); else a ``SystemExit`` that says why."""
    if not partial.is_file():
        raise SystemExit(f"--resume: {partial} does not exist: no interrupted run to resume")
    saved = json.loads(partial.read_text())
    if saved.get("plan") != plan:
        raise SystemExit(f"--resume: {partial} is a run of {saved.get('plan')}, not of {plan}: give the same options "
                         "or run without --resume")
    changed = code_changes(saved.get("commit") or "", repo)
    if changed is None:
        raise SystemExit(f"--resume: {partial} was written by {saved.get('commit')!r}, which cannot be compared with "
                         "the code of now (uncommitted changes or no such commit): run without --resume")
    if changed:
        raise SystemExit(f"--resume: the code changed since {partial} was written ({saved['commit']}): "
                         f"{', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}; run without --resume")
    return list(saved["records"])


REGIME_NAMES = {"dense": "dense", "scribbles": "scribbles", "dense10": "10% dense",
                "dense10_unlabeled": "10% dense + unlabeled", "scribbles30_unlabeled": "30% scribbles + unlabeled"}
GOAL_NAMES = {  # the goals of summarize(), as the README's table names them
    "ours scribbles / ours dense": "ours from scribbles >= 95% of ours from dense",
    "ours - baseline_unet, scribbles (Dice points)": "ours beats `baseline_unet` by >= 3 points under scribbles",
    "ours - baseline_unet, dense10_unlabeled (Dice points)": "... under 10% dense + unlabeled",
    "ours dense10_unlabeled - dense10 (points)": "10% dense + unlabeled beats 10% dense alone by >= 3 points",
    "4 mm misregistration cost, ours (points)":
        "4 mm misregistration costs ours <= 2 points and less than the baseline",
    "ours without": "one modality missing: within 2 points of the remaining modality alone"}


def markdown(summary: dict) -> str:
    """The README's tables of a :func:`summarize` result: mean +- sd Dice (HD95 mm) of ours, ``baseline_unet`` and
    the best single modality per data set and annotation regime (0 mm, every modality; the better of ours and the
    baseline in bold), then the goals (value [95 % CI of the per-seed values]: met / missed) per data set."""
    rows = summary["rows"]

    def row(ds: str, method: str, regime: str) -> dict | None:
        return next((r for r in rows if (r["dataset"], r["method"], r["regime"], r["misregistration_mm"],
                                         r["missing_modality"]) == (ds, method, regime, 0.0, None)), None)

    def cell(r: dict | None, bold: bool) -> str:
        if r is None:
            return "-"
        return (f"**{r['dice']:.3f}**" if bold else f"{r['dice']:.3f}") + f" +- {r['dice_sd']:.3f} ({r['hd95']:.1f})"

    out = ["| data | regime | ours | `baseline_unet` | best single modality |", "|---|---|---|---|---|"]
    datasets = [d for d in DATASETS if any(r["dataset"] == d for r in rows)]
    for ds in datasets:
        for regime, name in REGIME_NAMES.items():
            ours = row(ds, "ours", regime)
            if ours is None:
                continue
            # the baseline and the single models have no unlabeled-data path: 10% dense + unlabeled is 10% dense
            theirs = regime if regime != "dense10_unlabeled" else "dense10"
            base = row(ds, "baseline_unet", regime) or row(ds, "baseline_unet", theirs)
            singles = [r for r in rows if r["dataset"] == ds and r["method"].startswith("single_")
                       and r["regime"] == theirs and r["misregistration_mm"] == 0 and r["missing_modality"] is None]
            best = max(singles, key=lambda r: r["dice"]) if singles else None
            lead = base is None or ours["dice"] >= base["dice"]
            single = "-" if best is None else \
                f"{best['dice']:.3f} {best['method'].removeprefix('single_').upper()} ({best['hd95']:.1f})"
            out.append(f"| {ds} | {name} | {cell(ours, lead)} | {cell(base, not lead)} | {single} |")
    out += ["", f"| goal | {' | '.join(datasets)} |", "|---|" + "---|" * len(datasets)]
    for key, name in GOAL_NAMES.items():
        cells = []
        for ds in datasets:
            g = next((g for g in summary["goals"] if g["dataset"] == ds and g["goal"].startswith(key)), None)
            if g is None or g["value"] is None:
                cells.append("-")
                continue
            fmt = (lambda v: f"{v:+.1f}") if "points" in g["goal"] else (lambda v: f"{v:.3f}")
            ci = f" [{fmt(g['ci95'][0])}, {fmt(g['ci95'][1])}]" if g.get("ci95") else ""
            if key == "ours without":  # "ours without pet - single_ct (points)": against which model
                ci += f" vs {g['goal'].split(' - single_')[1].split(' ')[0].upper()}"
            elif key.startswith("4 mm"):
                ci += f" vs the baseline's {float(g['threshold'].rsplit(' ', 1)[1]):.1f}"
            cells.append(f"{fmt(g['value'])}{ci}: {'met' if g['met'] else 'missed'}")
        out.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(out)


def report(records: list[dict], results: Path) -> None:
    """Write ``quality_summary.json`` and ``quality.png`` of ``records`` to ``results``; print the tables."""
    summary = summarize(records)
    atomic_write_text(results / "quality_summary.json", json.dumps(summary, indent=2))
    plot(summary["rows"], results / "quality.png")
    print(f"\n{'dataset':8} {'method':27} {'regime':22} {'mm':>3} {'missing':>7} {'n':>2} {'Dice':>13} "
          f"{'HD95 mm':>13} {'train s':>7} {'GB':>5}  per-class Dice")
    for r in summary["rows"]:
        per = " ".join(f"{k}={v:.3f}" for k, v in r["dice_per_class"].items())
        print(f"{r['dataset']:8} {r['method']:27} {r['regime']:22} {r['misregistration_mm']:3.0f} "
              f"{r['missing_modality'] or '-':>7} {r['seeds']:2d} {r['dice']:6.3f}+-{r['dice_sd']:.3f} "
              f"{r['hd95']:6.2f}+-{r['hd95_sd']:5.2f} {r['train_seconds']:7.1f} {r['peak_rss_gb']:5.2f}  {per}")
    print("\ngoals (value from the means over seeds; 95 % CI of the per-seed values, paired by seed):")
    for g in summary["goals"]:
        ci = "" if g.get("ci95") is None else f"[{g['ci95'][0]:.3f}, {g['ci95'][1]:.3f}]"
        print(f"  {g['dataset']:8} {g['goal']:55} {g['value']!s:>9} {ci:>18}  {g['threshold']:28} "
              f"{'MET' if g['met'] else 'MISSED'}")
        if "ceiling" in g:
            c = g["ceiling"]
            ci = "" if c.get("ci95") is None else f"[{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]"
            print(f"  {'':8} {'  ... were they all dense (ours dense)':55} {c['value']!s:>9} "
                  f"{ci:>18}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="phantom only, one seed, fewer regimes and steps")
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0 .. SEEDS-1 (default 5)")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="run only seeds FIRST_SEED .. SEEDS-1 and keep the other seeds' records of "
                         "RESULTS_DIR/quality.json (seeds added to an earlier run; training is deterministic)")
    ap.add_argument("--datasets", help="comma-separated (default: phantom,brain; with --quick: phantom); the other "
                                       "datasets' records in RESULTS_DIR/quality.json are kept")
    ap.add_argument("--only", help="comma-separated method:regime runs (0 mm, every modality), or methods (all of "
                                   "that method's runs: regimes, misregistrations, missing modality), to re-measure; "
                                   "their records replace the same runs in RESULTS_DIR/quality.json and the rest are "
                                   "kept (after a change that only those runs go through)")
    ap.add_argument("--resume", action="store_true",
                    help="go on with an interrupted run of the same options: its runs, saved after each one to "
                         "RESULTS_DIR/quality.partial.json, are kept if lib / configs / apps / bench are unchanged "
                         "since (a run of every data set takes about 3 h on 2 cores)")
    ap.add_argument("--summarize", action="store_true",
                    help="train nothing: summarise RESULTS_DIR/quality.json again (tables, goals, PNG)")
    ap.add_argument("--markdown", action="store_true",
                    help="with --summarize: print the README's Markdown tables (results and goals) instead")
    args = ap.parse_args()
    results = results_dir(args.quick)
    if args.markdown and not args.summarize:
        ap.error("--markdown goes with --summarize")
    if args.summarize:
        if not (results / "quality.json").is_file():
            ap.error(f"--summarize reads {results / 'quality.json'}, which does not exist; run the benchmark first")
        saved = json.loads((results / "quality.json").read_text())
        if args.markdown:
            print(markdown(summarize(saved)))
        else:
            report(saved, results)
        return 0
    names = args.datasets or ("phantom" if args.quick else "phantom,brain")
    datasets = [d.strip() for d in names.split(",") if d.strip()]
    unknown = sorted(set(datasets) - set(DATASETS))
    if unknown:
        ap.error(f"unknown datasets {unknown}; choose from {sorted(DATASETS)}")
    seeds = 1 if args.quick else args.seeds
    if not 0 <= args.first_seed < seeds:
        ap.error(f"--first-seed {args.first_seed} must lie in 0 .. {seeds - 1} (--seeds {seeds})")
    only = [tuple(x.strip().split(":")) for x in args.only.split(",")] if args.only else []
    if any(len(x) > 2 or (len(x) == 2 and x[1] not in REGIMES) for x in only):
        ap.error(f"--only takes methods or method:regime pairs, regime one of {REGIMES}; got {args.only!r}")
    previous = results / "quality.json"
    merge = bool(only) or args.first_seed > 0
    if merge and not previous.is_file():
        ap.error(f"--only / --first-seed add to an earlier full run, but {previous} does not exist")
    commit = git_commit()  # the code that runs: taken before the first run
    partial = results / "quality.partial.json"  # every run's records as they come: an interrupted run resumes
    plan = {"datasets": datasets, "seeds": seeds, "first_seed": args.first_seed, "only": args.only or None,
            "quick": args.quick}
    records: list[dict] = resumed(partial, plan) if args.resume else []
    done = {run_key(r)[:4] + (r["seed"],) for r in records}
    if records:
        print(f"resumed: {len(done)} runs of {partial} ({records[0].get('commit')}) kept", flush=True)

    def measure(*run_args: Any, **kw: Any) -> None:
        """One run; its records stamped and saved at once."""
        new = run(*run_args, **kw)
        for r in new:
            r["commit"] = commit
        records.extend(new)
        atomic_write_text(partial, json.dumps({"plan": plan, "commit": commit, "records": records}))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        for ds in datasets:
            spec = dict(DATASETS[ds], **({"steps": 60} if args.quick else {}))
            cfg = load_config(spec["preset"])
            for seed in range(args.first_seed, seeds):
                pools: dict[float, tuple[Path, Path]] = {}
                todo = experiments(ds, args.quick)
                if only:
                    whole = {x[0] for x in only if len(x) == 1}
                    if whole - {e[0] for e in todo}:
                        ap.error(f"--only: no {ds} runs of {sorted(whole - {e[0] for e in todo})}; methods: "
                                 f"{sorted({e[0] for e in todo})}")
                    todo = [e for e in todo if e[0] in whole] + [(x[0], x[1], 0.0, (None,)) for x in only
                                                                 if len(x) == 2 and x[0] not in whole]
                for method, regime, mm, drops in todo:
                    if (ds, method, regime, mm, seed) in done:
                        continue
                    if mm not in pools:
                        pools[mm] = make_pool(Path(tmp) / f"{ds}_s{seed}_{mm:g}mm", ds, cfg, spec, seed, mm)
                    measure(Path(tmp), ds, spec, method, regime, mm, seed, *pools[mm], drops=drops)
                if only:
                    continue
                singles = [r for r in records if r["dataset"] == ds and r["seed"] == seed
                           and r["method"].startswith("single_") and r["method"] != f"single_{MISSING[ds]}"]
                best = max(singles, key=lambda r: r["dice_mean"])["method"]  # best single modality, this seed
                for regime in [g for g in (REGIMES[:4] if args.quick else REGIMES) if g != "dense"]:
                    if (ds, best, regime, 0.0, seed) in done:
                        continue
                    if 0.0 not in pools:  # every run of this seed at 0 mm was resumed
                        pools[0.0] = make_pool(Path(tmp) / f"{ds}_s{seed}_0mm", ds, cfg, spec, seed, 0.0)
                    measure(Path(tmp), ds, spec, best, regime, 0.0, seed, *pools[0.0])
    fresh = {run_key(r) for r in records}
    subset = set(datasets) != set(DATASETS) and not args.quick and previous.is_file()
    if merge or subset:  # keep what was not re-measured (a subset of the datasets: the other datasets' records)
        kept = [r for r in json.loads(previous.read_text())
                if run_key(r) not in fresh and (merge or r["dataset"] not in datasets)]
        print(f"re-measured {len(records)} runs; kept {len(kept)} of {previous}")
        records = kept + records
    atomic_write_text(results / "quality.json", json.dumps(records, indent=2))
    report(records, results)
    partial.unlink(missing_ok=True)
    ran = f"{len(fresh)} of {len(records)} runs" if merge or subset else f"{len(records)} runs"
    print(f"\n{ran} in {time.perf_counter() - started:.0f} s; wrote {results / 'quality.json'}, "
          f"{results / 'quality.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
