"""What the benchmark scripts share."""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def results_dir(quick: bool = False) -> Path:
    """Where a benchmark writes: ``RESULTS_DIR`` when set, else ``bench/results`` (full runs, committed) or, for a
    ``--quick`` check, ``bench/results/quick`` (ignored by git), so a quick check never overwrites the full run's
    figures the README quotes. Created if missing."""
    default = REPO / "bench" / "results" / ("quick" if quick else "")
    path = Path(os.environ.get("RESULTS_DIR") or default)
    path.mkdir(parents=True, exist_ok=True)
    return path


def seed_spread(per_seed: list[float]) -> dict:
    """Per-seed values of a goal -> ``{"per_seed", "sd", "ci95"}``: the 95 % confidence interval of their mean
    (Student's t over the seeds; None with fewer than 2), to tell a margin from the seed noise.

    Example:
        >>> seed_spread([1.0, 2.0, 3.0])["ci95"]
        [-0.4841, 4.4841]
    """
    from scipy.stats import t

    n = len(per_seed)
    if n < 2:
        return {"per_seed": [round(v, 4) for v in per_seed], "sd": None, "ci95": None}
    mean, sd = statistics.mean(per_seed), statistics.stdev(per_seed)
    half = float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return {"per_seed": [round(v, 4) for v in per_seed], "sd": round(sd, 4),
            "ci95": [round(mean - half, 4), round(mean + half, 4)]}


def git_commit() -> str | None:
    """The checkout's commit (with ``+`` when it has uncommitted changes), recorded with every run."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+" if dirty else "")


CODE = ("lib", "configs", "apps", "bench", "requirements.txt", ":(exclude)bench/results", ":(exclude)bench/*.md")


def code_changes(commit: str, repo: Path = REPO) -> list[str] | None:
    """The files of :data:`CODE` that differ between ``commit`` and the working tree (committed or not); None when
    that cannot be told (no git, an unknown commit, a commit stamped ``+``: written from uncommitted changes)."""
    import subprocess

    if not commit or commit.endswith("+"):
        return None
    try:
        out = subprocess.run(["git", "diff", "--name-only", commit, "--", *CODE], cwd=repo, capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return [line for line in out.splitlines() if line]


def made_by(records: list[dict]) -> str:
    """Which code made ``records``: ``"4a1b2c3 x75"`` per commit stamp, ``"unstamped"`` for records from before the
    stamp (simulate.json before 2026-12-04).

    Example:
        >>> made_by([{"commit": "4a1b2c3"}, {"commit": "4a1b2c3"}, {}])
        '4a1b2c3 x2, unstamped x1'
    """
    counts: dict[str, int] = {}
    for r in records:
        key = r.get("commit") or "unstamped"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in counts.items())
