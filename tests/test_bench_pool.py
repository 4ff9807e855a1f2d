"""bench/pool.py's scoring measure: each pool re-scores from its own warm cache, and a case preprocessed again inside
the timing stops the run (a cache shared by pools lost cases to a smaller pool's prune and charged their reading
and preprocessing to the per-case rows until 2026-12-05)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import pool  # noqa: E402
from crossmodal.config import load_config  # noqa: E402
from crossmodal.data.phantom import make_phantom  # noqa: E402
from crossmodal.data.studies import generate  # noqa: E402


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """3 phantom cases, the committed weights and a cache warmed on all of them."""
    work = tmp_path_factory.mktemp("pool")
    cfg = load_config("phantom")
    generate(work / "cases", cfg, lambda rng: make_phantom(cfg, rng, size=48), 3, seed=7, prefix="pool")
    cases = sorted(p.name[: -len(".nii.gz")] for p in (work / "cases").glob("*.nii.gz"))
    weights = work / pool.WEIGHTS.name
    shutil.copy(pool.WEIGHTS, weights)
    first = pool.score_pool(pool.sub_pool(work / "cases", work / "warm", cases), work / "warm_app", work / "cache",
                            5.0, weights, rescoring=False)
    assert first["scored"] == first["stored"] == 3
    return work, cases, weights


def test_each_pool_rescores_from_its_own_cache(warm):
    work, cases, weights = warm
    small = pool.score_pool(pool.sub_pool(work / "cases", work / "p1", cases[:1]), work / "p1_app",
                            pool.pool_cache(work / "cache", work / "p1_cache", cases[:1]), 0.0, weights)
    assert small["scored"] == small["stored"] == 1
    assert sorted(pool.cache_state(work / "cache")) == [f"{c}.pt" for c in cases]  # the shared cache kept them all
    big = pool.score_pool(pool.sub_pool(work / "cases", work / "p3", cases), work / "p3_app",
                          pool.pool_cache(work / "cache", work / "p3_cache", cases), 0.0, weights)
    assert big["scored"] == big["stored"] == 3


def test_a_case_preprocessed_again_stops_the_measure(warm):
    work, cases, weights = warm
    shared = work / "shared"
    shutil.copytree(work / "cache", shared)
    pool.score_pool(pool.sub_pool(work / "cases", work / "s1", cases[:1]), work / "s1_app", shared, 0.0, weights)
    assert sorted(pool.cache_state(shared)) == [f"{cases[0]}.pt"]  # the scoring pruned the others
    with pytest.raises(SystemExit, match=r"pool of 3 \(flush_s 0.0\): 2 cases were read and preprocessed again "
                                         rf"\(e.g. {cases[1]}.pt\)"):
        pool.score_pool(pool.sub_pool(work / "cases", work / "s3", cases), work / "s3_app", shared, 0.0, weights)
