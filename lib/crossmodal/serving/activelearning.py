"""Active learning until the cross-modal signals land: predictive entropy scoring and a top-score strategy.

The ranking and the score are pure functions; ``EntropyScoring`` and ``TopScoreStrategy`` adapt them to
MONAI Label. Scores live in the datastore's image info (key :data:`SCORE_KEY`) with the model's mtime, so a
stale score is recomputed after each training run.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

logger = logging.getLogger(__name__)
SCORE_KEY = "crossmodal_entropy"
MODEL_TS_KEY = "crossmodal_scored_model_ts"


def mean_entropy(probs: torch.Tensor) -> float:
    """Mean voxel entropy (nats) of class probabilities (C, H, W, D), normalised by log(C) to [0, 1].

    Example:
        >>> round(mean_entropy(torch.full((2, 1, 1, 1), 0.5)), 3)
        1.0
    """
    p = probs.clamp_min(1e-8)
    ent = -(p * p.log()).sum(0)
    return float(ent.mean() / torch.log(torch.tensor(float(probs.shape[0]))))


def rank_cases(case_ids: Sequence[str], scores: Mapping[str, float], seed: int = 0) -> list[str]:
    """Cases by descending score; unscored ones after the scored, in a seeded random order.

    Example:
        >>> rank_cases(["a", "b", "c"], {"a": 0.1, "b": 0.7})[:2]
        ['b', 'a']
    """
    scored = sorted((c for c in case_ids if c in scores), key=lambda c: -scores[c])
    rest = [c for c in case_ids if c not in scores]
    random.Random(seed).shuffle(rest)
    return scored + rest


class EntropyScoring(ScoringMethod):
    """Scores every unlabeled case by the mean predictive entropy of the current model."""

    def __init__(self, infer_task: Any, description: str = "Mean predictive entropy of the current model") -> None:
        super().__init__(description)
        self.infer_task = infer_task

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        path = self.infer_task.get_path()
        if not path:
            return {"scored": 0, "reason": "no model yet"}
        model_ts = os.path.getmtime(path)
        scored, failed = {}, {}
        for image_id in datastore.get_unlabeled_images():
            info = datastore.get_image_info(image_id)
            if info.get(MODEL_TS_KEY) == model_ts and SCORE_KEY in info:
                continue
            try:
                _, data = self.infer_task({"image": datastore.get_image_uri(image_id), "skip_writer": True,
                                           "missing_modality": "zero_fill", "keep_probs": True})
            except Exception as e:  # a broken case (CaseError, HTTP 422) must not stop the others from being scored
                failed[image_id] = str(getattr(e, "detail", e))
                continue
            score = mean_entropy(torch.softmax(data["logits"].float(), 0))
            datastore.update_image_info(image_id, {SCORE_KEY: score, MODEL_TS_KEY: model_ts})
            scored[image_id] = round(score, 6)
        return {"scored": len(scored), "scores": scored, "failed": failed}


class TopScoreStrategy(Strategy):
    """Next sample: the unlabeled case with the highest stored score (a random one when none is scored)."""

    def __init__(self, description: str = "Unlabeled case with the highest predictive entropy") -> None:
        super().__init__(description)

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        ids = datastore.get_unlabeled_images()
        if not ids:
            return None
        scores = {i: float(s) for i in ids if (s := datastore.get_image_info(i).get(SCORE_KEY)) is not None}
        ranked = rank_cases(sorted(ids), scores, seed=int(request.get("seed", random.randrange(1 << 30))))
        return {"id": ranked[0], "score": scores.get(ranked[0])}


class RandomStrategy(Strategy):
    """MONAI Label's Random (cases not handed out for longest weigh most), safe for calls within one second.

    Upstream weighs a case by ``now - last hand-out`` in whole seconds, so two requests in the same second with
    every remaining case just handed out raise "Total of weights must be greater than zero"; here each weight
    is at least 1.
    """

    def __init__(self) -> None:
        super().__init__("Random case, least recently handed out preferred")

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        strategy = request.get("strategy", "random")
        now = int(time.time())
        weights = [max(now - datastore.get_image_info(i).get("strategy", {}).get(strategy, {}).get("ts", 0), 0) + 1
                   for i in images]
        pick = random.choices(images, weights=weights)[0]
        return {"id": pick, "weight": weights[images.index(pick)]}
