"""What the benchmark scripts share."""

from __future__ import annotations

import os
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
