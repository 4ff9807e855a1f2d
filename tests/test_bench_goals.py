"""The benchmarks' goal arithmetic (bench/quality.py, bench/simulate.py): the issues' goals from hand-made records."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import quality  # noqa: E402
import simulate  # noqa: E402
from crossmodal.simulate import summarize  # noqa: E402

# ours / baseline_unet / single models, 3 seeds, Dice per seed (one data set, two classes)
DICE = {
    ("ours", "dense", 0.0, None): [0.80, 0.82, 0.78],
    ("ours", "scribbles", 0.0, None): [0.76, 0.80, 0.75],
    ("ours", "dense10", 0.0, None): [0.70, 0.72, 0.73],
    ("ours", "dense10_unlabeled", 0.0, None): [0.75, 0.74, 0.76],
    ("ours", "dense", 4.0, None): [0.79, 0.82, 0.76],
    ("ours", "dense", 0.0, "pd"): [0.70, 0.74, 0.69],
    ("baseline_unet", "dense", 0.0, None): [0.81, 0.80, 0.79],
    ("baseline_unet", "dense", 4.0, None): [0.71, 0.70, 0.72],
    ("baseline_unet", "scribbles", 0.0, None): [0.70, 0.71, 0.72],
    ("baseline_unet", "dense10_unlabeled", 0.0, None): [0.74, 0.73, 0.72],
    ("single_t2", "dense", 0.0, None): [0.72, 0.73, 0.71],
    ("single_t1", "dense", 0.0, None): [0.60, 0.61, 0.62],
    ("single_pd", "dense", 0.0, None): [0.80, 0.80, 0.80],  # the missing one: never the reference
}


def records(order: tuple[int, ...] = (0, 1, 2)) -> list[dict]:
    out = []
    for (method, regime, mm, missing), values in DICE.items():
        for seed in order:
            out.append({"dataset": "brain", "method": method, "regime": regime, "misregistration_mm": mm,
                        "missing_modality": missing, "seed": seed, "dice_mean": values[seed], "hd95_mean": 5.0,
                        "dice_per_class": {"a": values[seed], "b": values[seed]},
                        "hd95_per_class": {"a": 5.0, "b": 5.0}, "train_seconds": 20.0, "peak_rss_gb": 1.0})
    return out


def test_goals_are_the_issues_margins_with_their_per_seed_values():
    goals = {g["goal"]: g for g in quality.summarize(records((2, 0, 1)))["goals"]}  # seeds out of order: paired
    assert len(goals) == 6

    ratio = goals["ours scribbles / ours dense"]
    assert ratio["value"] == pytest.approx(0.77 / 0.80, abs=1e-4)  # means: 0.77 / 0.80 = 0.9625
    assert ratio["met"] is True
    assert ratio["per_seed"] == [0.95, round(0.80 / 0.82, 4), round(0.75 / 0.78, 4)]

    scrib = goals["ours - baseline_unet, scribbles (Dice points)"]
    assert scrib["value"] == pytest.approx(6.0, abs=1e-4) and scrib["met"] is True
    assert scrib["per_seed"] == [6.0, 9.0, 3.0]
    # Student's t, 2 degrees of freedom: 6 +- 4.3027 * 3 / sqrt(3)
    assert scrib["sd"] == 3.0 and scrib["ci95"] == pytest.approx([6 - 7.4524, 6 + 7.4524], abs=1e-3)

    semi = goals["ours - baseline_unet, dense10_unlabeled (Dice points)"]
    assert semi["value"] == pytest.approx(2.0, abs=1e-4) and semi["met"] is False  # 3 points asked
    assert semi["per_seed"] == [1.0, 1.0, 4.0]

    gain = goals["ours dense10_unlabeled - dense10 (points)"]
    assert gain["value"] == pytest.approx(100 * (0.75 - 2.15 / 3), abs=1e-4) and gain["met"] is True  # 3.33
    assert gain["per_seed"] == [5.0, 2.0, 3.0]

    # what the two unlabeled goals would read with ours trained on dense labels everywhere (ours dense)
    assert semi["ceiling"]["value"] == pytest.approx(100 * (0.80 - 0.73), abs=1e-4)
    assert semi["ceiling"]["per_seed"] == [6.0, 9.0, 6.0]
    assert gain["ceiling"]["value"] == pytest.approx(100 * (0.80 - 2.15 / 3), abs=1e-4)
    assert gain["ceiling"]["per_seed"] == [10.0, 10.0, 5.0] and gain["ceiling"]["sd"] == pytest.approx(2.8868, abs=1e-4)

    mis = goals["4 mm misregistration cost, ours (points)"]
    assert mis["value"] == pytest.approx(1.0, abs=1e-4) and mis["met"] is True  # baseline's cost 9 points
    assert mis["threshold"] == "<= 2 and < baseline's 9.00"
    assert mis["per_seed"] == [1.0, 0.0, 2.0]

    # the reference is the best single model trained without the missing modality (T2 at 0.72, not PD at 0.80)
    missing = goals["ours without pd - single_t2 (points)"]
    assert missing["value"] == pytest.approx(-1.0, abs=1e-4) and missing["met"] is True  # within 2 points
    assert missing["per_seed"] == [-2.0, 1.0, -2.0]
    assert [g for g in goals if "ceiling" in goals[g]] == [semi["goal"], gain["goal"]]


def test_the_readme_tables_come_from_the_summary():
    """``--summarize --markdown``: the README's results table (the better of ours and the baseline in bold; a regime
    ours did not run is left out, a model not run a dash; the baseline's 10% dense stands in for 10% dense +
    unlabeled where it has no such run) and its goal table, from the same summary as the goals."""
    recs = records() + [{**r, "regime": "dense10", "dice_mean": r["dice_mean"] - 0.01} for r in records()
                        if (r["method"], r["regime"]) == ("baseline_unet", "dense10_unlabeled")]
    table, goal_table = quality.markdown(quality.summarize(recs)).split("\n\n")
    assert table.splitlines() == [
        "| data | regime | ours | `baseline_unet` | best single modality |",
        "|---|---|---|---|---|",
        "| brain | dense | **0.800** +- 0.020 (5.0) | 0.800 +- 0.010 (5.0) | 0.800 PD (5.0) |",
        "| brain | scribbles | **0.770** +- 0.026 (5.0) | 0.710 +- 0.010 (5.0) | - |",
        "| brain | 10% dense | 0.717 +- 0.015 (5.0) | **0.720** +- 0.010 (5.0) | - |",
        "| brain | 10% dense + unlabeled | **0.750** +- 0.010 (5.0) | 0.730 +- 0.010 (5.0) | - |",
    ]
    lines = goal_table.splitlines()
    assert lines[:2] == ["| goal | brain |", "|---|---|"] and len(lines) == 8
    assert "| ours beats `baseline_unet` by >= 3 points under scribbles | +6.0 [-1.5, +13.5]: met |" in lines
    assert "| ... under 10% dense + unlabeled | +2.0 [-2.3, +6.3]: missed |" in lines
    assert lines[-2].startswith("| 4 mm misregistration costs ours")
    assert lines[-2].endswith(" vs the baseline's 9.0: met |")
    assert lines[-1] == ("| one modality missing: within 2 points of the remaining modality alone | "
                         "-1.0 [-5.3, +3.3] vs T2: met |")
    stand_in = [r for r in recs if (r["method"], r["regime"]) != ("baseline_unet", "dense10_unlabeled")]
    assert "| brain | 10% dense + unlabeled | **0.750** +- 0.010 (5.0) | 0.720 +- 0.010 (5.0) | - |" in \
        quality.markdown(quality.summarize(stand_in)).splitlines()


def test_the_baseline_is_given_each_of_our_label_steps_for_comparison():
    brain = {(m, r) for m, r, mm, _ in quality.experiments("brain", quick=False) if "+" in m}
    phantom = {(m, r) for m, r, mm, _ in quality.experiments("phantom", quick=False) if "+" in m}
    scribbles = ("scribbles", "scribbles30_unlabeled")
    assert {("baseline_unet+transfer", r) for r in scribbles} <= brain  # the brain preset transfers strokes
    assert not any(m.endswith("+transfer") for m, _ in phantom)  # the phantom's does not
    assert {("baseline_unet+propagation", r) for r in scribbles} <= phantom & brain
    assert ("baseline_unet+registration", "dense") in phantom & brain
    spec = quality.DATASETS["brain"]
    methods = ("ours", "baseline_unet", "baseline_unet+transfer", "baseline_unet+propagation",
               "baseline_unet+registration")
    runs = {m: quality.run_config(spec, m, seed=3) for m in methods}
    assert {m: name for m, (_, name) in runs.items()} == {
        "ours": "ours", "baseline_unet": "baseline_unet", "baseline_unet+transfer": "baseline_unet_xfer",
        "baseline_unet+propagation": "baseline_unet_prop", "baseline_unet+registration": "baseline_unet_reg"}
    given = {m: (c.model.name, c.data.register, c.train.propagate.method, c.train.consistency.atlas_sparse,
                 c.train.seed) for m, (c, _) in runs.items()}
    assert given == {"ours": ("crossmodal", "translation", "none", 6, 3),  # the brain preset's own
                     "baseline_unet": ("baseline_unet", "none", "none", 0, 3),  # nnU-Net: the strokes as drawn
                     "baseline_unet+transfer": ("baseline_unet", "none", "none", 6, 3),  # as many as ours gets
                     "baseline_unet+propagation": ("baseline_unet", "none", "random_walker", 0, 3),
                     "baseline_unet+registration": ("baseline_unet", "translation", "none", 0, 3)}


def test_goals_pair_only_the_seeds_every_run_has():
    recs = [r for r in records() if not (r["method"] == "baseline_unet" and r["seed"] == 2)]
    goals = {g["goal"]: g for g in quality.summarize(recs)["goals"]}
    scrib = goals["ours - baseline_unet, scribbles (Dice points)"]
    assert scrib["per_seed"] == [6.0, 9.0]  # seed 2 has no baseline run
    assert scrib["value"] == pytest.approx(100 * (0.77 - 0.705), abs=1e-4)  # the means use every run there is
    one = [r for r in records() if r["seed"] == 0]
    spread = quality.summarize(one)["goals"][0]
    assert spread["sd"] is None and spread["ci95"] is None  # one seed: no spread


CURVES = {("ours", 0): [0.90, 0.96, 0.97], ("ours", 1): [0.90, 0.96, 0.99],
          ("random", 0): [0.90, 0.92, 0.96], ("random", 1): [0.90, 0.93, 0.96],
          ("epistemic", 0): [0.90, 0.97, 0.98], ("epistemic", 1): [0.90, 0.96, 0.95]}


def simulation(dataset: str = "p") -> tuple[list[dict], list[dict], dict]:
    """Hand-made simulation records (2 seeds, 3 rounds of 2 cases), full-annotation references (Dice 1.0: 95 % is
    0.95) and the scoring cost of ``dataset``."""
    recs = [{"dataset": dataset, "strategy": st, "seed": seed, "round": k, "annotated_cases": 2 + 2 * k,
             "annotated_voxels": 100 * (k + 1), "dice_mean": dice, "scoring_seconds_per_case": 0.05 if
             st == "ours" else 0.0}
            for (st, seed), values in CURVES.items() for k, dice in enumerate(values)]
    refs = [{"dataset": dataset, "strategy": "full", "seed": s, "dice_mean": 1.0} for s in (0, 1)]
    cost = {dataset: {"ours_warm_s": 0.01, "epistemic_s": 0.5, "ours_cold_s": 0.03, "ratio_warm": 0.02,
                      "ratio_cold": 0.06}}
    return recs, refs, cost


def test_simulation_goals_from_hand_made_curves():
    recs, refs, cost = simulation()
    goals = {g["goal"]: g for g in simulate.goals(summarize(recs, refs), cost)}
    reach = goals["cases to 95% of full: ours / random (<= 0.6)"]
    assert reach["measured"] == pytest.approx(4 / 6) and reach["met"] is False
    # round 0 (2 cases, 0.90) is below 0.95 on both seeds: no strategy can reach it with fewer than 4 cases
    assert reach["lowest_possible"] == pytest.approx(8 / 12, abs=1e-4)
    assert reach["detail"] == ("ours [4, 4], random [6, 6] (per seed); the lowest ratio any strategy can reach here "
                               "0.6667 (fewest cases possible [4, 4])")
    # AUC over 2..6 cases = (y0 + 2 y1 + y2) / 4: ours 0.9475 / 0.9525, random 0.925 / 0.93, epistemic 0.955 / 0.9425
    rnd = goals["AUC(cases) ours > random"]
    assert rnd["measured"] == pytest.approx(0.0225, abs=1e-4) and rnd["met"] is True
    assert rnd["per_seed"] == [0.0225, 0.0225] and rnd["ci95"] == [0.0225, 0.0225]
    epi = goals["AUC(cases) ours > epistemic"]
    assert epi["per_seed"] == [-0.0075, 0.01] and epi["met"] is True
    assert epi["ci95"][0] < 0 < epi["ci95"][1]  # one seed each way: undecided
    assert goals["scoring one case <= 1/20 of Epistemic (5 samples), re-scoring"]["met"] is True
    cost["p"]["ratio_warm"] = 0.06
    assert simulate.goals(summarize(recs, refs), cost)[-1]["met"] is False


def test_a_curve_that_never_gets_to_95_percent_bounds_the_cases_ratio():
    """A seed whose curve stays below 95 % of full annotation (None) needs more cases than the run's last round:
    counted as that many, ours missing it bounds the ratio from below, Random missing it from above."""
    recs, refs, cost = simulation()
    for r in recs:
        if (r["strategy"], r["seed"]) == ("ours", 1):
            r["dice_mean"] = [0.90, 0.92, 0.93][r["round"]]
    summary = summarize(recs, refs)
    reach = simulate.goals(summary, cost)[0]
    assert reach["measured"] is None and reach["at_least"] == pytest.approx(10 / 12, abs=1e-4)
    assert reach["met"] is False and "at_most" not in reach
    assert reach["detail"].startswith("ours [4, None], random [6, 6] (per seed; None: not reached with 6 cases);")
    row = simulate.markdown(summary, simulate.goals(summary, cost)).splitlines()[9]
    assert row == ("| p | cases to 95% of full: ours / random (<= 0.6) | > 0.83 (ours [4, None], random [6, 6] (per "
                   "seed; None: not reached with 6 cases); lowest possible 0.667) | MISSED |")

    recs, refs, cost = simulation()  # Random misses on seed 0, ours is there from round 0 on: at most (2 + 2) / 12
    for r in recs:
        if (r["strategy"], r["seed"]) == ("random", 0):
            r["dice_mean"] = [0.90, 0.92, 0.93][r["round"]]
        if r["strategy"] == "ours" and r["round"] == 0:
            r["dice_mean"] = 0.96
    reach = simulate.goals(summarize(recs, refs), cost)[0]
    assert reach["measured"] is None and reach["at_most"] == pytest.approx(4 / 12, abs=1e-4) and reach["met"] is True
    for r in recs:  # both miss somewhere: no bound, not met
        if (r["strategy"], r["seed"]) == ("ours", 1):
            r["dice_mean"] = 0.90
    reach = simulate.goals(summarize(recs, refs), cost)[0]
    assert reach["measured"] is None and not {"at_least", "at_most"} & set(reach) and reach["met"] is False


def test_the_readme_simulation_tables_come_from_the_summary():
    """`bench/simulate.py --summarize --markdown`: the README's curve and goal tables, every cell from the records."""
    recs, refs, cost = simulation("phantom_mixed")
    summary = summarize(recs, refs)
    lines = simulate.markdown(summary, simulate.goals(summary, cost)).splitlines()
    assert lines[0].startswith("| data | strategy | Dice per round (annotated cases 2, 4, 6), mean of seeds |")
    # AUC over 2..6 cases = (y0 + 2 y1 + y2) / 4, mean of seeds; voxels 100..300 alike
    assert lines[2:6] == [
        "| phantom mixed | ours | 0.900 / 0.960 / 0.980 | 0.9500 | 0.9500 | [4, 4] | 0.050 |",
        "| phantom mixed | random | 0.900 / 0.925 / 0.960 | 0.9275 | 0.9275 | [6, 6] | 0.000 |",
        "| phantom mixed | epistemic | 0.900 / 0.965 / 0.965 | 0.9487 | 0.9487 | [4, 4] | 0.000 |",
        "| phantom mixed | full annotation | 1.0000 | | | | |"]
    assert lines[6:9] == ["", "| data | goal | measured | |", "|---|---|---|---|"]
    assert lines[9:] == [
        "| phantom mixed | cases to 95% of full: ours / random (<= 0.6) | 0.67 (ours [4, 4], random [6, 6] (per "
        "seed); lowest possible 0.667) | MISSED |",
        "| phantom mixed | AUC(cases) ours > random | 0.0225 (0.9500 vs 0.9275; 95% CI of the per-seed differences "
        "[+0.0225, +0.0225]) | met |",
        "| phantom mixed | AUC(cases) ours > epistemic | 0.0012 (0.9500 vs 0.9487; 95% CI of the per-seed "
        "differences [-0.1099, +0.1124]) | met |",
        "| phantom mixed | scoring one case <= 1/20 of Epistemic (5 samples), re-scoring | 0.02 (0.0100 s vs 0.5000 s; "
        "first sight (read + preprocess too) 0.0300 s = 0.0600) | met |"]


def test_an_interrupted_benchmark_resumes_with_the_runs_it_saved(tmp_path, monkeypatch):
    """Every run's records are saved as they come (``quality.partial.json``); ``--resume`` keeps them and trains only
    the rest, so a 2-hour run cut off (a session's end, a kill) is not lost. The real training is stood in for by a
    run that returns made-up records (its training is tested elsewhere); its calls are counted."""
    import json

    calls: list[tuple] = []

    def fake_run(root, ds, spec, method, regime, mm, seed, pool, test, drops=(None,)):
        calls.append((method, regime, mm, seed))
        if fail_after is not None and len(calls) > fail_after:
            raise KeyboardInterrupt  # killed mid-benchmark
        value = 0.5 + 0.01 * len(calls)
        return [{"dataset": ds, "method": method, "regime": regime, "misregistration_mm": mm,
                 "missing_modality": drop, "seed": seed, "dice_mean": value, "hd95_mean": 3.0,
                 "dice_per_class": {"organ": value}, "hd95_per_class": {"organ": 3.0}, "train_seconds": 1.0,
                 "peak_rss_gb": 1.0} for drop in drops]

    monkeypatch.setattr(quality, "run", fake_run)
    monkeypatch.setattr(quality, "make_pool", lambda *a: (tmp_path / "pool", tmp_path / "test"))
    monkeypatch.setattr(quality, "git_commit", lambda: "abc1234")
    monkeypatch.setenv("RESULTS_DIR", str(tmp_path / "results"))
    argv = ["quality.py", "--quick", "--datasets", "phantom"]
    fail_after: int | None = 5
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(KeyboardInterrupt):
        quality.main()
    partial = tmp_path / "results" / "quality.partial.json"
    saved = json.loads(partial.read_text())
    assert saved["commit"] == "abc1234" and len({(r["method"], r["regime"]) for r in saved["records"]}) == 5
    first = list(calls[:5])

    calls.clear()
    fail_after = None
    monkeypatch.setattr(quality, "code_changes", lambda commit, repo=None: ["lib/crossmodal/losses.py"])
    monkeypatch.setattr(sys, "argv", [*argv, "--resume"])
    with pytest.raises(SystemExit, match=r"--resume: the code changed since .* \(abc1234\): "
                                         r"lib/crossmodal/losses.py; run without --resume"):
        quality.main()
    with pytest.raises(SystemExit, match=r"is a run of \{'datasets': \['phantom'\], .*\}, not of \{'datasets': "
                                         r"\['brain'\]"):  # other options: not the same run
        quality.resumed(partial, {**saved["plan"], "datasets": ["brain"]})
    assert not calls

    monkeypatch.setattr(quality, "code_changes", lambda commit, repo=None: [])
    monkeypatch.setattr(sys, "argv", [*argv, "--resume"])
    assert quality.main() == 0
    total = first + calls
    assert not set(first) & set(calls) and len(total) == len(set(total))  # none trained twice, none left out
    assert len(total) == len(quality.experiments("phantom", quick=True)) + 3  # + the best single model's 3 regimes
    final = json.loads((tmp_path / "results" / "quality.json").read_text())
    assert {(r["method"], r["regime"], r["misregistration_mm"]) for r in final} == \
        {(m, g, mm) for m, g, mm, _ in total}
    assert all(r["commit"] == "abc1234" for r in final) and not partial.exists()


def test_code_changes_are_those_of_the_code_not_of_the_results(tmp_path):
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tmp_path, capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    for path in ("lib/a.py", "bench/results/quality.json", "bench/README.md", "README.md"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("1\n")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    commit = git("rev-parse", "--short", "HEAD").strip()
    assert quality.code_changes(commit, tmp_path) == []
    (tmp_path / "bench/results/quality.json").write_text("2\n")  # the benchmark's own output
    (tmp_path / "README.md").write_text("2\n")
    (tmp_path / "bench/README.md").write_text("2\n")
    assert quality.code_changes(commit, tmp_path) == []
    (tmp_path / "lib/a.py").write_text("2\n")  # uncommitted counts too
    assert quality.code_changes(commit, tmp_path) == ["lib/a.py"]
    assert quality.code_changes(commit + "+", tmp_path) is None  # made from uncommitted changes: unknown code
    assert quality.code_changes("0000000", tmp_path) is None


def test_a_cut_off_simulation_benchmark_resumes_with_the_curves_it_finished(tmp_path, monkeypatch, capsys):
    """`make simulate` takes about 2 hours; cut off, it had to start again. ``--resume`` keeps every finished curve
    and reference of simulate.json and trains only the rest, if the code that made them is the code of now. The
    simulation itself is stood in for by one that emits made-up records and honours ``done`` as
    :func:`crossmodal.simulate.simulate_dataset` does (tested in tests/test_active.py); its curves are counted."""
    import json

    curves: list[tuple[str, int]] = []

    def fake_simulate(studies, work, ds, spec, seeds, emit, cost=True, done=()):
        for seed in seeds:
            if ("full", seed) not in done:
                emit("reference", {"dataset": ds, "strategy": "full", "seed": seed, "annotated_cases": 6,
                                   "annotated_voxels": 900, "dice_mean": 0.9})
            for strategy in ("ours", "random", "epistemic"):
                if (strategy, seed) in done:
                    continue
                curves.append((strategy, seed))
                for r in range(spec.rounds):
                    if kill_at is not None and len(curves) == kill_at and r == 1:
                        raise KeyboardInterrupt  # cut off inside a curve
                    emit("record", {"dataset": ds, "strategy": strategy, "seed": seed, "round": r,
                                    "annotated_cases": 2 + 2 * r, "annotated_voxels": 100 * (r + 1),
                                    "dice_mean": 0.5 + 0.1 * r, "scoring_seconds_per_case": 0.01})
                if cost and strategy == "ours":
                    emit("cost", {"dataset": ds, "ours_warm_s": 0.01, "ours_cold_s": 0.05, "epistemic_s": 1.0,
                                  "ratio_warm": 0.01, "ratio_cold": 0.05})
                    cost = False

    monkeypatch.setattr(simulate, "simulate_dataset", fake_simulate)
    monkeypatch.setattr(simulate, "make_data", lambda root, ds, cases, mix=None: tmp_path / ds)
    monkeypatch.setattr(simulate, "git_commit", lambda: "abc1234")
    monkeypatch.setattr(simulate, "code_changes", lambda commit: [])
    monkeypatch.setenv("RESULTS_DIR", str(tmp_path / "results"))
    argv = ["simulate.py", "--datasets", "phantom", "--seeds", "2"]
    kill_at: int | None = 5  # seed 0's three curves, seed 1's ours; cut off in seed 1's random
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(KeyboardInterrupt):
        simulate.main()
    cut = json.loads((tmp_path / "results" / "simulate.json").read_text())
    assert len(cut["records"]) == 4 * 5 + 1 and len(cut["full_annotation"]) == 2

    curves.clear()
    kill_at = None
    monkeypatch.setattr(simulate, "code_changes", lambda commit: ["lib/crossmodal/active.py"])
    monkeypatch.setattr(sys, "argv", [*argv, "--resume"])
    with pytest.raises(SystemExit):
        simulate.main()
    assert "--resume: phantom's records were made by 'abc1234', and the code changed since: " \
        "lib/crossmodal/active.py; run without --resume" in capsys.readouterr().err
    assert not curves

    monkeypatch.setattr(simulate, "code_changes", lambda commit: [])
    assert simulate.main() == 0
    assert "phantom: kept 20 records of 4 finished curves; training again: [('random', 1)] unfinished" in \
        capsys.readouterr().out
    assert curves == [("random", 1), ("epistemic", 1)]  # only what the cut-off run had not finished
    final = json.loads((tmp_path / "results" / "simulate.json").read_text())
    assert sorted((r["strategy"], r["seed"], r["round"]) for r in final["records"]) == sorted(
        (s, n, r) for s in ("ours", "random", "epistemic") for n in (0, 1) for r in range(5))
    assert len(final["full_annotation"]) == 2 and final["scoring_cost"]["phantom"]["ratio_warm"] == 0.01


def test_cleanup_rows_pair_each_setting_with_none_and_ours_with_the_baseline():
    """bench/cleanup.py's rows: mean Dice / HD95 per setting and method, the change against no clean-up and ours'
    lead, each paired by seed (points)."""
    import cleanup

    dice = {("none", "ours"): [0.78, 0.76], ("none", "baseline_unet"): [0.75, 0.75],
            ("foreground", "ours"): [0.79, 0.76], ("foreground", "baseline_unet"): [0.77, 0.76]}
    records = [{"setting": name, "method": m, "seed": s, "dice_mean": v, "hd95_mean": 10.0 - s}
               for (name, m), values in dice.items() for s, v in enumerate(values)]
    none, fg = cleanup.summarize(records)
    assert (none["setting"], fg["setting"], fg["seeds"]) == ("none", "foreground", 2)
    assert fg["ours"]["dice"] == 0.775 and fg["ours"]["hd95"] == 9.5 and fg["baseline_unet"]["dice"] == 0.765
    assert fg["ours"]["change_points"]["per_seed"] == pytest.approx([1.0, 0.0])
    assert fg["baseline_unet"]["change_points"]["per_seed"] == pytest.approx([2.0, 1.0])
    assert none["lead_points"]["per_seed"] == pytest.approx([3.0, 1.0])
    assert fg["lead_points"]["per_seed"] == pytest.approx([2.0, 0.0])
    assert none["ours"]["change_points"]["per_seed"] == [0.0, 0.0]
