"""One case's cross-modal scoring forward: the MC-dropout samples decoded in one batch (now) vs one decode each.

``score_image`` runs the encoders and fusion once, then the decoder for the plain output and for each of the
``active.mc_samples`` dropout samples. Until 2026-12-05 each of those was its own decoder pass (batch 1); now they
are one pass of batch 1 + T, with the dropout masks drawn beforehand in the order the separate passes drew them
(:meth:`CrossModalNet._decode_batched`). On the scoring scale's small inputs a decoder pass costs little compute and
many calls, so fewer, larger calls pay. This times both on the committed phantom and brain weights, on real cases'
scoring inputs (the scoring cache's: read, registered, normalised, halved per axis) of generated phantom cases and
the demo's brain cases (``make data``), in one process, in blocks of back-to-back calls (as a pool is scored; two
blocks each, A B A B, 3 untimed warm-up calls a block); checks that both give the
same scores (the same masks: logits equal to float rounding) and prints a table; writes ``scoring.json`` to
``RESULTS_DIR`` (default ``bench/results``; ``--quick``: fewer repeats, ``bench/results/quick``).

    python bench/scoring.py [--quick] [--repeats 30] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from benchutil import results_dir  # noqa: E402
from crossmodal.active import CaseScores, score_image  # noqa: E402
from crossmodal.config import atomic_write_text, load_config  # noqa: E402
from crossmodal.data.phantom import make_phantom  # noqa: E402
from crossmodal.data.studies import generate  # noqa: E402
from crossmodal.nets import CrossModalNet  # noqa: E402
from crossmodal.serving.app import AppParts  # noqa: E402


def sequential(self: CrossModalNet, fused: list[torch.Tensor], drops: Sequence[bool]) -> torch.Tensor:
    """The decodes as before 2026-12-05: one decoder pass each, in turn (the baseline)."""
    return torch.stack([self._decode(fused, d) for d in drops])


def inputs(preset: str, studies: Path, work: Path, cases: int) -> tuple[AppParts, list[tuple[torch.Tensor, list]]]:
    """The app (committed weights of ``preset``) and the scoring inputs of the first ``cases`` cases of ``studies``."""
    parts = AppParts.from_conf(str(work / preset), {"preset": preset, "model_dir": str(work / preset / "model"),
                                                    "pretrained": str(REPO / "apps" / "crossmodal" / "pretrained"
                                                                      / f"{preset}_crossmodal.pt")})
    store = parts.datastore(str(studies))
    scoring = parts.scoring(parts.infer())
    scoring.cache_dir = work / preset / "cache"
    ids = sorted(store.list_images())[:cases]
    return parts, [scoring.case_input(store.get_image_uri(c)) for c in ids]


def time_one(net: CrossModalNet, x: torch.Tensor, present: list, samples: int, seed: int) -> tuple[float, CaseScores]:
    """Seconds of one ``score_image`` and its scores, the generator seeded first (the same masks either way)."""
    torch.manual_seed(seed)
    t = time.perf_counter()
    s = score_image(net, x, present, samples)
    return time.perf_counter() - t, s


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=30, help="timed calls per block, case and way (default 30; quick 5)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    repeats = 5 if args.quick else args.repeats
    if args.threads:
        torch.set_num_threads(args.threads)
    results = results_dir(args.quick)
    brain = REPO / "data" / "brain"
    if not brain.is_dir():
        sys.exit(f"bench/scoring.py: {brain} does not exist; run `make data` first")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        phantom = work / "phantom_studies"
        cfg = load_config("phantom")
        generate(phantom, cfg, lambda rng: make_phantom(cfg, rng, size=48), 4, seed=11, prefix="phantom")
        for preset, studies in (("phantom", phantom), ("brain", brain)):
            parts, cases = inputs(preset, studies, work, 2 if args.quick else 4)
            net = parts.infer()._get_network("cpu", {})
            net.eval()
            samples = parts.cfg.active.mc_samples
            for i, (x, present) in enumerate(cases):
                times: dict[str, list[float]] = {"sequential": [], "batched": []}
                scores: dict[str, CaseScores] = {}
                for _block in range(2):  # A B A B: blocks of back-to-back calls, as a pool is scored
                    for way in ("sequential", "batched"):
                        baseline = mock.patch.object(CrossModalNet, "_decode_batched", sequential)
                        with baseline if way == "sequential" else contextlib.nullcontext():
                            for rep in range(3 + repeats):  # 3 untimed warm-up calls
                                sec, scores[way] = time_one(net, x, present, samples, seed=rep)
                                if rep >= 3:
                                    times[way].append(sec)
                a, b = scores["sequential"], scores["batched"]
                med = {k: float(np.median(v)) for k, v in times.items()}
                rows.append({"preset": preset, "case": i, "shape": list(x.shape[2:]), "mc_samples": samples,
                             "sequential_ms": round(1000 * med["sequential"], 3),
                             "batched_ms": round(1000 * med["batched"], 3),
                             "ratio": round(med["batched"] / med["sequential"], 4),
                             "disagreement": [a.disagreement, b.disagreement],
                             "mc_uncertainty": [a.mc_uncertainty, b.mc_uncertainty],
                             "max_rel_score_diff": max(abs(u - v) / max(abs(u), 1e-12) for u, v in
                                                       ((a.disagreement, b.disagreement),
                                                        (a.mc_uncertainty, b.mc_uncertainty),
                                                        (a.entropy, b.entropy)))})
    summary: dict[str, dict[str, float]] = {
        p: {k: round(float(np.median([r[k] for r in rows if r["preset"] == p])), 3)
            for k in ("sequential_ms", "batched_ms")}
        for p in ("phantom", "brain")}
    for v in summary.values():
        v["ratio"] = round(v["batched_ms"] / v["sequential_ms"], 4)
    print(f"score_image, {torch.get_num_threads()} threads, median of 2 x {repeats} calls per case (ms)")
    print(f"{'preset':8} {'case':>4} {'input':>12} {'sequential':>10} {'batched':>8} {'ratio':>6} {'max rel diff':>12}")
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['preset']:8} {r['case']:4d} {shape:>12} {r['sequential_ms']:10.2f} {r['batched_ms']:8.2f} "
              f"{r['ratio']:6.3f} {r['max_rel_score_diff']:12.2e}")
    for p, v in summary.items():
        print(f"{p:8} median {v['sequential_ms']:.2f} ms -> {v['batched_ms']:.2f} ms: {v['ratio']:.3f}x the time")
    atomic_write_text(results / "scoring.json", json.dumps({"threads": torch.get_num_threads(), "repeats": repeats,
                                                            "rows": rows, "summary": summary}, indent=2))
    print(f"-> {results / 'scoring.json'}")
    worst = max(r["max_rel_score_diff"] for r in rows)
    if worst > 1e-3:
        sys.exit(f"bench/scoring.py: the batched decode's scores differ from the sequential ones by {worst:.2e} "
                 "(relative): the masks are no longer drawn as the separate decodes drew them")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
