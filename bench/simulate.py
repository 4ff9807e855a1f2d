"""`make simulate`: the annotate-retrain loop without people on the phantom and the real brain data.

Four pools: ``phantom`` and ``brain`` (every case drawn alike), and ``phantom_mixed`` / ``brain_mixed``, the same
cases as a clinical pool with sub-populations (``crossmodal data ... --variants``: a lesion without tracer uptake,
an MR of another weighting, a FLAIR in place of the T2) in the pool and the test split alike, where the records
are also broken down by variant (``by_variant``: which cases each strategy had annotated, test Dice per variant).

Strategies ours / random / epistemic (MONAI Label's EpistemicScoring, 5 dropout samples), 5 seeds, scribbles from
the ground truth, 5 rounds (2 seed cases + 2 per round), 100 fine-tuning steps per round (200 in round 0), a
12-case held-out test split (4 until 2026-11-30), and a full-annotation reference per seed. Prints the goal checks,
writes `simulate.json` (records, summary, scoring cost, by_variant) and `simulate.png` (Dice vs annotated cases and
voxels, AUC in the legend) to RESULTS_DIR (default bench/results). `--quick`: phantom, one seed, 3 rounds of 30
steps, written to bench/results/quick unless RESULTS_DIR is set.

    python bench/simulate.py [--quick] [--datasets brain,brain_mixed] [--seeds 5]
    python bench/simulate.py --first-seed 3    # seeds 3 and 4 added to an earlier 3-seed simulate.json
    python bench/simulate.py --summarize --markdown  # the README's tables (Markdown) from simulate.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchutil import code_changes, git_commit, made_by, results_dir, seed_spread
from crossmodal.config import atomic_write_text
from crossmodal.simulate import (
    SimSpec,
    fewest_cases_possible,
    finished_curves,
    plot,
    scoring_cost,
    simulate_dataset,
    summarize,
    variant_report,
    write_json,
)

REPO = Path(__file__).resolve().parents[1]
TEST = 12  # held-out test cases with dense truth, the last ones of each data set
MIX = {"phantom_mixed": "typical,typical,cold_lesion,other_mr_weighting",  # case i gets variant i % 4
       "brain_mixed": "typical,typical,typical,t2_flair"}


def make_data(root: Path, dataset: str, cases: int, variants: str | None = None) -> Path:
    out, done = root / f"sim_{dataset}", root / f"sim_{dataset}" / ".done"
    stamp = f"{cases}" + (f" {variants}" if variants else "")
    if not done.is_file() or done.read_text().strip() != stamp:  # made anew when the count or the variants change
        shutil.rmtree(out, ignore_errors=True)                     # (cases are seeded by index: the first ones stay)
        args = ["phantom", "--size", "48"] if dataset.startswith("phantom") else ["brain", "--templates",
                                                                                   str(REPO / "data" / "spm12")]
        args += ["--variants", variants] if variants else []
        made = subprocess.run([sys.executable, "-m", "crossmodal.cli", "data", *args, "--out", str(out), "--cases",
                               str(cases), "--seed", "300"], check=True, stdout=subprocess.PIPE, text=True).stdout
        records = [json.loads(line) for line in made.splitlines() if line.startswith("{")]
        atomic_write_text(out / "variants.json", json.dumps({r["case"]: r["variant"] for r in records}))
        done.write_text(stamp)
    return out


def goals(summary: dict, cost: dict) -> list[dict]:
    rows = []
    for ds, entry in summary.items():
        st = entry["strategies"]
        if not {"ours", "random"} <= set(st):
            continue
        ours, rnd = st["ours"]["cases_to_95pct_full"], st["random"]["cases_to_95pct_full"]
        mean = [sum(v) / len(v) if v and None not in v else None for v in (ours, rnd)]
        ratio = mean[0] / mean[1] if mean[0] is not None and mean[1] else None
        # a seed whose curve never got there (None) needs more than the run's last round: counted as that many, the
        # ratio is a bound, from below where ours missed, from above where Random did (none where both did)
        last = int(st["random"]["curve"][-1]["annotated_cases"])
        bound: dict[str, float] = {}
        if ratio is None and ours and rnd and (None in ours) != (None in rnd):
            filled = [sum(last if c is None else c for c in v) for v in (ours, rnd)]
            bound = {"at_least" if None in ours else "at_most": round(filled[0] / filled[1], 4)}
        # the lowest ratio the protocol allows any strategy, given Random's curve (round 0 is shared)
        cases = [c["annotated_cases"] for c in st["random"]["curve"]]
        floor = fewest_cases_possible(rnd, int(cases[0]), int(cases[1] - cases[0])) if len(cases) > 1 else [None]
        known, seen = [f for f in floor if f is not None], [r for r in rnd if r is not None]
        lowest = round(sum(known) / sum(seen), 4) if len(known) == len(floor) and len(seen) == len(rnd) and seen \
            else None
        rows.append({"dataset": ds, "goal": "cases to 95% of full: ours / random (<= 0.6)",
                     "measured": ratio, **bound, "detail": f"ours {ours}, random {rnd} (per seed"
                     f"{f'; None: not reached with {last} cases' if bound or ratio is None else ''}); the lowest "
                     f"ratio any strategy can reach here {lowest} (fewest cases possible {floor})",
                     "lowest_possible": lowest,
                     "met": (ratio if ratio is not None else bound.get("at_most", 1.0)) <= 0.6})
        for other in ("random", "epistemic"):
            if other in st:
                a, b = st["ours"]["auc_cases"], st[other]["auc_cases"]
                row = {"dataset": ds, "goal": f"AUC(cases) ours > {other}", "measured": round(a - b, 4),
                       "detail": f"{a:.4f} vs {b:.4f}", "met": a > b}
                if st["ours"]["seeds"] == st[other]["seeds"]:  # paired by seed
                    row.update(seed_spread([x - y for x, y in zip(st["ours"]["auc_cases_per_seed"],
                                                                  st[other]["auc_cases_per_seed"], strict=True)]))
                rows.append(row)
        c = cost.get(ds)
        if c:
            rows.append({"dataset": ds, "goal": "scoring one case <= 1/20 of Epistemic (5 samples), re-scoring",
                         "measured": c["ratio_warm"], "detail": f"{c['ours_warm_s']} s vs {c['epistemic_s']} s; "
                         f"first sight (read + preprocess too) {c['ours_cold_s']} s = {c['ratio_cold']}",
                         "met": c["ratio_warm"] <= 0.05, "cost": c})
    return rows


def shown(goal: dict, digits: int | None = None) -> str:
    """A goal row's measured value as text, a bound as "> x" / "< x" (``digits``: rounded to them), "-" if none."""
    for key, sign in (("measured", ""), ("at_least", "> "), ("at_most", "< ")):
        if goal.get(key) is not None:
            return f"{sign}{goal[key] if digits is None else round(goal[key], digits)}"
    return "-"


def markdown(summary: dict, goal_rows: list[dict]) -> str:
    """The README's two tables of a :func:`crossmodal.simulate.summarize` result and its :func:`goals`: per pool and
    strategy the Dice per round (mean of seeds), the areas under the curve, the cases to 95 % of full annotation per
    seed and the scoring seconds per case, with the full-annotation Dice; then each goal (value, detail, 95 % CI of
    the per-seed differences where paired: met / MISSED)."""
    out: list[str] = []
    for ds, entry in summary.items():
        strategies = entry["strategies"]
        if not out:
            cases = ", ".join(f"{c['annotated_cases']:g}" for c in next(iter(strategies.values()))["curve"])
            out += [f"| data | strategy | Dice per round (annotated cases {cases}), mean of seeds | AUC vs cases | AUC "
                    "vs voxels | cases to 95% of full (per seed) | scoring s / case |", "|---|---|---|---|---|---|---|"]
        name = ds.replace("_", " ")
        for st, v in strategies.items():
            dice = " / ".join(f"{c['dice_mean']:.3f}" for c in v["curve"])
            out.append(f"| {name} | {st} | {dice} | {v['auc_cases']:.4f} | {v['auc_voxels']:.4f} | "
                       f"{v['cases_to_95pct_full']} | {v['scoring_seconds_per_case']:.3f} |")
        out.append(f"| {name} | full annotation | {entry['full_annotation_dice']:.4f} | | | | |")
    out += ["", "| data | goal | measured | |", "|---|---|---|---|"]
    for g in goal_rows:
        name = g["dataset"].replace("_", " ")
        if g["goal"].startswith("cases to 95%"):
            ratio = shown(g, 2)
            lowest = "-" if g["lowest_possible"] is None else f"{round(g['lowest_possible'], 3)}"
            detail = g["detail"].split("; the lowest ratio")[0] + f"; lowest possible {lowest}"
            cell = f"{ratio} ({detail})"
        elif g["goal"].startswith("scoring"):
            c = g["cost"]
            cell = (f"{round(g['measured'], 4)} ({c['ours_warm_s']:.4f} s vs {c['epistemic_s']:.4f} s; first sight "
                    f"(read + preprocess too) {c['ours_cold_s']:.4f} s = {c['ratio_cold']:.4f})")
        else:
            ci = "" if g.get("ci95") is None else \
                f"; 95% CI of the per-seed differences [{g['ci95'][0]:+.4f}, {g['ci95'][1]:+.4f}]"
            cell = f"{g['measured']} ({g['detail']}{ci})"
        out.append(f"| {name} | {g['goal']} | {cell} | {'met' if g['met'] else 'MISSED'} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cost-only", action="store_true",
                    help="only re-measure the scoring cost (committed weights) into an existing simulate.json")
    ap.add_argument("--datasets", help="comma-separated subset of the pools to re-run; the other pools' records in "
                                       "an existing simulate.json are kept (after a change to one preset)")
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0 .. SEEDS-1 (default 5)")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="run only seeds FIRST_SEED .. SEEDS-1 and keep the other seeds' records and the scoring cost "
                         "of simulate.json (seeds added to an earlier run; training is deterministic)")
    ap.add_argument("--summarize", action="store_true",
                    help="train nothing: summarise RESULTS_DIR/simulate.json again (tables, goals, PNG)")
    ap.add_argument("--resume", action="store_true",
                    help="a run cut off (a kill, a session's end): keep every finished curve and reference of "
                         "simulate.json and train only the rest (an unfinished curve again from its first round)")
    ap.add_argument("--markdown", action="store_true",
                    help="with --summarize: print the README's Markdown tables (curves and goals) instead")
    args = ap.parse_args()
    if args.markdown and not args.summarize:
        ap.error("--markdown goes with --summarize")
    if args.resume and (args.summarize or args.cost_only):
        ap.error("--resume trains what a cut-off run left; --summarize and --cost-only train nothing")
    results = results_dir(args.quick)
    if (args.summarize or args.cost_only) and not (results / "simulate.json").is_file():
        ap.error(f"--summarize / --cost-only read {results / 'simulate.json'}, which does not exist; run it first")
    scratch = tempfile.TemporaryDirectory(prefix="simulate-")  # removed when the run ends
    work = Path(scratch.name)
    # pool + test cases: 16 + 12 and 12 + 12 (the test split was 4 until 2026-11-30; the pools are unchanged);
    # *_mixed: the same cases (seeds) as a clinical pool with sub-populations, in the pool and the test split alike:
    # phantom, a quarter with a lesion that takes up no tracer and a quarter on an MR of another weighting; brain, a
    # quarter with a FLAIR in place of the T2
    datasets = {"phantom": ("phantom", 16 + TEST, None), "brain": ("brain", 12 + TEST, None),
                "phantom_mixed": ("phantom", 16 + TEST, MIX["phantom_mixed"]),
                "brain_mixed": ("brain", 12 + TEST, MIX["brain_mixed"])}
    if args.quick:
        datasets = {"phantom": ("phantom", 10, None)}
    if not args.quick and not 0 <= args.first_seed < args.seeds:
        ap.error(f"--first-seed {args.first_seed} must lie in 0 .. {args.seeds - 1} (--seeds {args.seeds})")
    seeds = [0] if args.quick else list(range(args.first_seed, args.seeds))
    extend = not args.quick and args.first_seed > 0

    def folder(ds: str) -> str:  # --quick works on its own 10 cases, so the full run's 28 are not made again after it
        return f"{ds}_quick" if args.quick else ds
    records: list[dict] = []
    refs: list[dict] = []
    cost: dict = {}
    commit = git_commit()  # the code that runs, stamped on every record and reference it makes
    earlier_variants: dict = {}  # by_variant of the simulate.json read again, for pools whose data is not here

    def by_variant() -> dict:
        out = {}
        for ds in sorted({r["dataset"] for r in records}):
            path = REPO / "data" / f"sim_{folder(ds)}" / "variants.json"
            variants = json.loads(path.read_text()) if path.is_file() else {}
            if len(set(variants.values())) > 1:
                out[ds] = variant_report([r for r in records if r["dataset"] == ds], variants)
            elif ds in earlier_variants:
                out[ds] = earlier_variants[ds]
        return out

    def save() -> dict:
        summary = summarize(records, refs)
        write_json(results / "simulate.json", {"records": records, "full_annotation": refs, "scoring_cost": cost,
                                               "summary": summary, "goals": goals(summary, cost),
                                               "by_variant": by_variant()})
        if records:
            plot(summary, results / "simulate.png")
        return summary

    done: dict[str, set[tuple[str, int]]] = {}
    if args.resume:  # everything the cut-off run saved stays; per pool, what it finished is not trained again
        previous = results / "simulate.json"
        if not previous.is_file():
            ap.error(f"--resume: {previous} does not exist: nothing to resume")
        old = json.loads(previous.read_text())
        records, refs, cost = old["records"], old["full_annotation"], old["scoring_cost"]
        for ds in datasets:
            if args.datasets and ds not in {d.strip() for d in args.datasets.split(",")}:
                continue
            mine = [r for r in records if r["dataset"] == ds]
            for made in sorted({r.get("commit") or "" for r in mine + refs if r["dataset"] == ds}):
                changed = code_changes(made)
                if changed is None or changed:  # curves of other code would be mixed with this code's
                    ap.error(f"--resume: {ds}'s records were made by {made or 'unstamped code'!r}, "
                             + ("which cannot be compared with the code of now (uncommitted changes or no such "
                                "commit)" if changed is None else f"and the code changed since: "
                                f"{', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}")
                             + "; run without --resume")
            whole, done[ds], dropped = finished_curves(mine, [r for r in refs if r["dataset"] == ds],
                                                       3 if args.quick else 5, ds in cost)
            records = [r for r in records if r["dataset"] != ds] + whole
            print(f"{ds}: kept {len(whole)} records of {len({(r['strategy'], r['seed']) for r in whole})} finished "
                  f"curves; training again: {dropped or 'none'} unfinished, and what was not run yet", flush=True)
    if args.datasets or extend:
        chosen = [d.strip() for d in args.datasets.split(",") if d.strip()] if args.datasets else list(datasets)
        unknown = sorted(set(chosen) - set(datasets))
        if unknown:
            ap.error(f"unknown datasets {unknown}; choose from {sorted(datasets)}")
        previous = results / "simulate.json"
        if extend and not previous.is_file():
            ap.error(f"--first-seed adds seeds to an earlier run, but {previous} does not exist")
        if previous.is_file():
            old = json.loads(previous.read_text())

            def kept(r: dict) -> bool:  # not re-run now: another pool, or (adding seeds) another seed
                return r["dataset"] not in chosen or (extend and r["seed"] not in seeds)

            if not args.resume:
                records = [r for r in old["records"] if kept(r)]
                refs = [r for r in old["full_annotation"] if kept(r)]
                cost = {k: v for k, v in old["scoring_cost"].items() if k not in chosen or extend}
        datasets = {d: datasets[d] for d in chosen}
    if args.summarize or args.cost_only:  # train nothing: the records of the earlier run
        old = json.loads((results / "simulate.json").read_text())
        records, refs = old["records"], old["full_annotation"]
        earlier_variants.update(old.get("by_variant", {}))
        cost = {k: v for k, v in old["scoring_cost"].items() if args.summarize or k not in datasets}
        datasets = datasets if args.cost_only else {}
    if args.cost_only:
        for ds, (preset, cases, mix) in datasets.items():
            spec = SimSpec(preset, test=TEST, steps=100)
            weights = REPO / "apps" / "crossmodal" / "pretrained" / f"{preset}_crossmodal.pt"
            cost[ds] = scoring_cost(make_data(REPO / "data", ds, cases, mix), work, ds, spec, str(weights),
                                    repeats=5)
            print(json.dumps(cost[ds]), flush=True)
        datasets = {}
    for ds, (preset, cases, mix) in datasets.items():
        studies = make_data(REPO / "data", folder(ds), cases, mix)
        spec = SimSpec(preset, test=3 if args.quick else TEST, initial=2, k=2, rounds=3 if args.quick else 5,
                       steps=30 if args.quick else 100)
        def emit(kind: str, item: dict, ds: str = ds) -> None:
            if kind == "cost":
                cost[ds] = item
            else:
                item["commit"] = commit
                (records if kind == "record" else refs).append(item)
            print(json.dumps({k: v for k, v in item.items() if k not in ("cases", "dice_per_case")}), flush=True)
            save()

        # adding seeds keeps the scoring cost measured in the run that made the first ones
        simulate_dataset(studies, work, ds, spec, seeds, emit=emit, cost=not ((extend or args.resume) and ds in cost),
                         done=done.get(ds, ()))
    if args.markdown:  # the README's tables of the records read again; nothing written
        summary = summarize(records, refs)
        print(markdown(summary, goals(summary, cost)))
        return 0
    summary = save()
    print(f"\n{'dataset':14} {'strategy':10} {'AUC cases':>10} {'AUC voxels':>11} {'cases to 95% full':>18} "
          f"{'score s/case':>13}")
    for ds, entry in summary.items():
        for st, v in entry["strategies"].items():
            print(f"{ds:14} {st:10} {v['auc_cases']:10.4f} {v['auc_voxels']:11.4f} {str(v['cases_to_95pct_full']):>18} "
                  f"{v['scoring_seconds_per_case']:13.4f}")
        print(f"{ds:14} full-annotation Dice {entry['full_annotation_dice']:.4f}; records made by "
              f"{made_by([r for r in records + refs if r['dataset'] == ds])}")
    for ds, report in by_variant().items():
        print(f"\n{ds}: share of the annotated cases by variant / test Dice by variant, per round (mean of seeds)")
        for st, rows in report.items():
            for row in rows:
                share = " ".join(f"{v} {x:.2f}" for v, x in row["annotated_share"].items())
                dice = " ".join(f"{v} {x:.3f}" for v, x in row["test_dice"].items())
                print(f"{ds:14} {st:10} cases {row['annotated_cases']:2}  annotated: {share}  |  Dice: {dice}")
    print()
    for g in goals(summary, cost):
        verdict = "met" if g["met"] else "MISSED"
        ci = "" if g.get("ci95") is None else f"  95% CI of the per-seed differences [{g['ci95'][0]}, {g['ci95'][1]}]"
        print(f"{g['dataset']:14} {g['goal']:62} {shown(g)!s:>8}  {verdict}  ({g['detail']}){ci}")
    print(f"-> {results / 'simulate.json'}, {results / 'simulate.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
