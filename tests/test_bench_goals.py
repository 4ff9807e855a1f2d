"""The quality benchmark's goal arithmetic (bench/quality.py): the issue's goals from hand-made records."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import quality  # noqa: E402

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


def records(order: list[int] = (0, 1, 2)) -> list[dict]:
    out = []
    for (method, regime, mm, missing), values in DICE.items():
        for seed in order:
            out.append({"dataset": "brain", "method": method, "regime": regime, "misregistration_mm": mm,
                        "missing_modality": missing, "seed": seed, "dice_mean": values[seed], "hd95_mean": 5.0,
                        "dice_per_class": {"a": values[seed], "b": values[seed]},
                        "hd95_per_class": {"a": 5.0, "b": 5.0}, "train_seconds": 20.0, "peak_rss_gb": 1.0})
    return out


def test_goals_are_the_issues_margins_with_their_per_seed_values():
    goals = {g["goal"]: g for g in quality.summarize(records([2, 0, 1]))["goals"]}  # seeds out of order: paired
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

    mis = goals["4 mm misregistration cost, ours (points)"]
    assert mis["value"] == pytest.approx(1.0, abs=1e-4) and mis["met"] is True  # baseline's cost 9 points
    assert mis["threshold"] == "<= 2 and < baseline's 9.00"
    assert mis["per_seed"] == [1.0, 0.0, 2.0]

    # the reference is the best single model trained without the missing modality (T2 at 0.72, not PD at 0.80)
    missing = goals["ours without pd - single_t2 (points)"]
    assert missing["value"] == pytest.approx(-1.0, abs=1e-4) and missing["met"] is True  # within 2 points
    assert missing["per_seed"] == [-2.0, 1.0, -2.0]


def test_goals_pair_only_the_seeds_every_run_has():
    recs = [r for r in records() if not (r["method"] == "baseline_unet" and r["seed"] == 2)]
    goals = {g["goal"]: g for g in quality.summarize(recs)["goals"]}
    scrib = goals["ours - baseline_unet, scribbles (Dice points)"]
    assert scrib["per_seed"] == [6.0, 9.0]  # seed 2 has no baseline run
    assert scrib["value"] == pytest.approx(100 * (0.77 - 0.705), abs=1e-4)  # the means use every run there is
    one = [r for r in records() if r["seed"] == 0]
    spread = quality.summarize(one)["goals"][0]
    assert spread["sd"] is None and spread["ci95"] is None  # one seed: no spread
