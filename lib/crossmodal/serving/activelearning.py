"""Active learning in MONAI Label: cross-modal scoring and strategy (thin adapters over :mod:`crossmodal.active`).

``CrossModalScoring`` scores every candidate case with the current model in one forward at a reduced scale (per-
modality heads, MC-dropout decoder samples, pooled descriptors) and stores the scores in the case's image info
(key :data:`SCORES_KEY`, with the model's key, :func:`model_key`, so a score is recomputed after each training run or
under another preset, and on a local datastore the sizes and mtimes of the case's files, so a replaced or added
modality is scored again). The case's preprocessed input is cached on disk (keyed by the files and by
:func:`input_key`), so re-scoring after training costs one small forward per case.
``CrossModalStrategy`` hands out the best case by combined score and diversity, never the same case to two
clients within ``active.handout_window_s``, and falls back to diversity alone before the first model exists. On a
fresh datastore (nothing scored yet: a request before MONAI Label's start-up scoring stored anything) a request scores
candidates itself first, for at most ``active.cold_scoring_s``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from crossmodal.active import combine, image_descriptor, score_image, scoring_input, select
from crossmodal.config import ConfigError, CrossModalConfig, as_flag
from crossmodal.errors import CaseError, cause_of_type
from crossmodal.io import case_id_of, find_case
from crossmodal.serving.datastore import CrossModalDatastore, http_error, request_device
from crossmodal.transforms import preprocessing
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.utils.others.generic import remove_file

logger = logging.getLogger(__name__)
SCORES_KEY = "crossmodal_scores"
HANDOUT_KEY = "crossmodal_handout"
SCORE_NAMES = ("disagreement", "mc_uncertainty", "entropy")


def candidates(datastore: Datastore, refine_sparse: bool) -> list[str]:
    """Unlabelled cases, plus cases whose final label is sparse when ``refine_sparse``."""
    ids = list(datastore.get_unlabeled_images())
    if refine_sparse and hasattr(datastore, "label_kind"):
        ids += [i for i in datastore.get_labeled_images() if datastore.label_kind(i) == "sparse"]
    return sorted(set(ids))


def stored_scores(infos: dict[str, dict[str, Any]], weights: dict[str, float]
                  ) -> tuple[dict[str, dict[str, float]], dict[str, float], dict[str, np.ndarray]]:
    """From image infos {case: info}: (raw scores by name, combined score by case, descriptor by case). A value that
    is not what the scoring stores (image infos are writable over REST: ``PUT /datastore/image/info``) counts as not
    scored, logged, instead of failing every selection."""
    stored = {i: _stored(info, SCORES_KEY, i) for i, info in infos.items()}
    scores: dict[str, dict[str, float]] = {n: {} for n in SCORE_NAMES}
    desc: dict[str, np.ndarray] = {}
    for i, v in stored.items():
        for n in SCORE_NAMES:
            if n in v and (x := _finite(v[n])) is not None:
                scores[n][i] = x
        if "descriptor" in v:
            try:
                d = np.asarray(v["descriptor"], dtype=np.float32)
            except (TypeError, ValueError):
                d = np.empty(0, dtype=np.float32)
            if d.ndim == 1 and d.size and np.isfinite(d).all():
                desc[i] = d
            else:
                logger.warning(f"case {i!r}: stored descriptor is not a vector of numbers; ignored")
    scores = {n: v for n, v in scores.items() if v}
    return scores, combine(scores, weights), desc


def _stored(info: dict[str, Any], key: str, case: str) -> dict[str, Any]:
    """``info[key]`` when it is a dict (what the scoring / strategy write), else {} (logged when present)."""
    value = info.get(key)
    if value is None or isinstance(value, dict):
        return value or {}
    logger.warning(f"case {case!r}: image info {key!r} = {value!r} is not what the scoring stores; ignored")
    return {}


def _finite(value: Any) -> float | None:
    """``value`` as a finite float, or None."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def labelled_descriptors(datastore: Datastore) -> list[np.ndarray]:
    """Descriptors of the labelled cases that have one (selection keeps away from them)."""
    return list(stored_scores({i: datastore.get_image_info(i) for i in datastore.get_labeled_images()}, {})[2]
                .values())


def store_infos(datastore: CrossModalDatastore, infos: dict[str, dict[str, Any]]) -> None:
    """Many cases' image infos in one datastore write; a case gone from the datastore meanwhile is skipped (logged)."""
    missing = datastore.update_image_infos(infos)
    if missing:
        logger.warning(f"cases {missing}: gone from the datastore while being scored; their scores are dropped")


def input_key(cfg: CrossModalConfig) -> str:
    """What a case's scoring input is computed with (the modalities in order and their normalisation, the working
    spacing, registration, the scoring scale, the network's stride): a cached input or a stored score made under
    another preset, or after a config edit, does not match it.

        >>> from crossmodal.config import load_config
        >>> input_key(load_config("phantom")) == input_key(load_config("phantom")) != input_key(load_config("brain"))
        True
    """
    what = {"modalities": [dataclasses.asdict(m) for m in cfg.modalities], "data": dataclasses.asdict(cfg.data),
            "scale": cfg.active.scoring_scale, "strides": list(cfg.model.strides), "axes": "RAS"}  # to_canonical
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_key(cfg: CrossModalConfig, path: str | None) -> str:
    """The weights file ``path`` (its real path, size and mtime in ns; "" without one) and :func:`input_key`: a
    case's stored scores are current while this is. Two weights files of one checkout can share a coarse mtime,
    hence the path and size too."""
    st = os.stat(path) if path else None
    what = [os.path.realpath(path), st.st_size, st.st_mtime_ns] if path and st else []
    return hashlib.sha1(json.dumps([*what, input_key(cfg)]).encode()).hexdigest()[:16]


class CrossModalScoring(ScoringMethod):
    """Scores candidates (see the module docstring); with no model yet, stores image descriptors only.

    Scores reach the datastore in batches, at most every ``flush_s`` seconds (and at the end): the datastore is one
    JSON file holding every case, so writing it once per case costs O(cases) each and a pool of hundreds of cases
    would spend longer writing it than scoring (``flush_s=0``: after every case). A killed scoring loses at most
    the last ``flush_s`` seconds of scores, which the next scoring computes again."""

    def __init__(self, cfg: CrossModalConfig, infer_task: Any, cache_dir: str,
                 description: str = "Cross-modal disagreement + MC-dropout uncertainty + descriptor",
                 flush_s: float = 5.0) -> None:
        super().__init__(description)
        self.cfg, self.infer_task, self.cache_dir, self.flush_s = cfg, infer_task, Path(cache_dir), flush_s

    def case_input(self, path: str, cfg: CrossModalConfig | None = None) -> tuple[torch.Tensor, list[bool]]:
        """The case's network input at the scoring scale (1, M, *S) and its present modalities; cached on disk by
        the source files' mtimes (the primary's and every secondary modality's: a re-exported or added modality
        is read again) and by :func:`input_key` (another preset or an edited config reads it again). ``cfg``: the
        preset as the model in service works with it (the infer task's ``working_config``; default: the preset)."""
        cfg = cfg or self.cfg
        cid = case_id_of(path)
        stamp = [*self.files_stamp(path), input_key(cfg)]
        file = self.cache_dir / f"{cid}.pt"
        if file.is_file():
            try:
                cached = torch.load(file, weights_only=True)
                if cached["stamp"] == stamp:
                    return cached["x"], cached["present"]
            except Exception as e:  # a truncated cache file is rebuilt
                logger.warning(f"case {cid}: rebuilding the scoring cache ({e})")
        # one pass of the whole case: a modality of a partial field of view is left out, as in training
        data = preprocessing(cfg, "infer", missing="zero_fill", partial="leave_out")({"image": path})
        stride = int(np.prod(self.cfg.model.strides))
        x = scoring_input(data["image"].as_tensor(), self.cfg.active.scoring_scale, stride)
        present = [m in data["modalities_used"] for m in self.cfg.modality_names]
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=".tmp")
        os.close(fd)
        torch.save({"stamp": stamp, "x": x, "present": present}, tmp)
        os.replace(tmp, file)
        return x, present

    def files_stamp(self, path: str) -> list[list[int] | None]:
        """[size, mtime in ns] of the case's primary file ``path`` and of each secondary modality's (None where it
        has none): what its scores and its cached input were computed from."""
        case = find_case(path, self.cfg.modality_names, self.cfg.data.sidecar_dir)
        return [[(st := os.stat(p)).st_size, st.st_mtime_ns] if p else None for p in (path, *case.modalities.values())]

    def forget(self, image_id: str) -> None:
        """Remove the case's cached input (its images, downsampled): the datastore calls this when the case is
        deleted."""
        remove_file(str(self.cache_dir / f"{image_id}.pt"))

    def prune_cache(self, live: Iterable[str], stale_s: float = 3600.0) -> list[str]:
        """Remove the cached inputs of cases not in ``live`` (deleted while no server held this cache) and the temp
        files of a scoring killed more than ``stale_s`` seconds ago; returns the ids removed."""
        if not self.cache_dir.is_dir():
            return []
        keep, gone = set(live), []
        for file in self.cache_dir.iterdir():
            if file.suffix == ".pt" and file.stem not in keep:
                gone.append(file.stem)
                remove_file(str(file))
            elif file.suffix == ".tmp" and time.time() - file.stat().st_mtime > stale_s:
                remove_file(str(file))
        if gone:
            logger.info(f"scoring cache: removed the inputs of {len(gone)} case(s) no longer in the datastore")
        return sorted(gone)

    def score_case(self, path: str, network: torch.nn.Module | None, device: str = "cpu",
                   cfg: CrossModalConfig | None = None) -> dict[str, Any]:
        """{disagreement, mc_uncertainty, entropy, descriptor, seconds} of one case (only the descriptor without
        a network). The dropout samples are drawn from a generator seeded by the case's id (torch's global ones are
        put back after): the same case under the same model scores the same each time, whatever was scored
        before it (a ranking no longer reshuffled by a re-scoring)."""
        t = time.perf_counter()
        x, present = self.case_input(path, cfg)
        if network is None:
            return {"descriptor": image_descriptor(x[0]).tolist(), "seconds": time.perf_counter() - t}
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
            torch.manual_seed(int.from_bytes(hashlib.sha256(case_id_of(path).encode()).digest()[:4], "big"))
            s = score_image(network, x.to(device), present, self.cfg.active.mc_samples)
        return {"disagreement": s.disagreement, "mc_uncertainty": s.mc_uncertainty, "entropy": s.entropy,
                "descriptor": s.descriptor.tolist(), "seconds": time.perf_counter() - t}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        try:
            device = request_device(request.get("device")) or ("cuda" if torch.cuda.is_available() else "cpu")
        except ConfigError as e:  # before any case is read
            raise http_error(e, prefix="scoring request: ") from None
        return self.score(datastore, device)

    def score(self, datastore: Datastore, device: str, ids: Sequence[str] | None = None,
              budget_s: float | None = None) -> dict[str, Any]:
        """Scores ``ids`` (default: every candidate) that lack current scores, stored in their image infos; with
        ``budget_s``, those it gets to in that time (each started case finishes; one case at least)."""
        path = self.infer_task.get_path()
        deadline = None if budget_s is None else time.monotonic() + budget_s
        network = self.infer_task._get_network(device, {}) if path else None  # MONAI Label's cached loader
        # the voxel size the model was trained at, where the preset sets none (as its inference resamples to)
        cfg = self.infer_task.working_config() if path and hasattr(self.infer_task, "working_config") else self.cfg
        key = model_key(cfg, path)
        if network is not None:
            network.eval()
        scored: dict[str, dict[str, float]] = {}
        failed: dict[str, str] = {}
        seconds: list[float] = []
        pending: dict[str, dict[str, Any]] = {}
        flushed = time.monotonic()
        # a local case's scores also hold the sizes and mtimes of its files: a modality replaced or added (PUT
        # /datastore/image with params {"modality": ...}, or on disk) is scored again (its old scores stayed); a
        # PACS case's files are fetched once, and asking for them here would fetch every unscored case
        local = getattr(datastore, "files_are_local", False)
        for image_id in candidates(datastore, self.cfg.active.refine_sparse) if ids is None else ids:
            if deadline is not None and (scored or failed) and time.monotonic() > deadline:
                break  # at least one case a request: a budget shorter than one case still picks by scores
            info = datastore.get_image_info(image_id).get(SCORES_KEY) or {}
            current = info.get("model_key") == key and "descriptor" in info
            if current and not local:
                continue
            try:
                image = datastore.get_image_uri(image_id)
                stamp = self.files_stamp(image) if local else None
                if current and info.get("files") == stamp:
                    continue
                s = self.score_case(image, network, device, cfg)
            except Exception as e:  # one broken case must not stop the others from being scored
                failed[image_id] = str(cause_of_type(e, (CaseError,)) or getattr(e, "detail", e))
                continue
            seconds.append(s.pop("seconds"))
            pending[image_id] = {SCORES_KEY: {**s, "model_key": key, **({"files": stamp} if local else {})}}
            scored[image_id] = {k: round(v, 6) for k, v in s.items() if k != "descriptor"}
            if time.monotonic() - flushed >= self.flush_s:
                store_infos(datastore, pending)
                pending, flushed = {}, time.monotonic()
        if pending:
            store_infos(datastore, pending)
        try:
            self.prune_cache(datastore.list_images())
        except Exception as e:  # a PACS gone since: the scores are stored, the cache is pruned next time
            logger.warning(f"scoring cache: not pruned ({e})")
        return {"scored": len(scored), "scores": scored, "failed": failed, "model": bool(path),
                "seconds_per_case": round(float(np.mean(seconds)), 4) if seconds else None}


class CrossModalStrategy(Strategy):
    """The candidate with the best combined score and diversity; cold start: diversity alone (see module doc)."""

    def __init__(self, cfg: CrossModalConfig,
                 description: str = "Cross-modal disagreement + uncertainty, diverse, one client per case",
                 scoring: Callable[[], CrossModalScoring | None] | None = None) -> None:
        """``scoring``: gives the scoring (an app makes it after its strategies) that scores candidates where
        nothing is scored yet (``active.cold_scoring_s``)."""
        super().__init__(description)
        self.cfg, self._scoring = cfg, scoring

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        a = self.cfg.active
        client = str(request.get("client_id") or "anonymous")
        now = time.time()
        asked = request.get("refine_sparse")
        refine = a.refine_sparse if asked is None else as_flag(asked)  # bool("false") would be True
        if refine is None:
            raise http_error(ValueError(f"refine_sparse={request['refine_sparse']!r} must be true or false"),
                             prefix="activelearning request: ")
        pool = candidates(datastore, refine)
        infos = {i: datastore.get_image_info(i) for i in pool}
        held = {i: _stored(info, HANDOUT_KEY, i) for i, info in infos.items()}
        recent = {i for i, h in held.items() if now - (_finite(h.get("ts")) or 0.0) < a.handout_window_s}
        others = {i for i in recent if held[i].get("client") != client}
        free = [i for i in pool if i not in recent]
        mine = [i for i in pool if i in recent and i not in others]
        choices = free or mine
        if not choices:  # the viewers say only that no sample was found: the server's log says why
            if others:
                wait = min(a.handout_window_s - (now - (_finite(held[i].get("ts")) or 0.0)) for i in others)
                logger.info(f"next sample for client {client!r}: every candidate case ({len(others)}) is being "
                            f"annotated by another client (handed out within active.handout_window_s = "
                            f"{a.handout_window_s:g} s); the first is free again in {max(wait, 0):.0f} s")
            return None
        scores, combined, desc = stored_scores({i: infos[i] for i in choices}, a.weights)
        scored_now = 0
        scoring = self._scoring() if self._scoring is not None else None
        if not desc and not combined and scoring is not None and a.cold_scoring_s > 0:  # a fresh datastore
            device = "cuda" if torch.cuda.is_available() else "cpu"
            scored_now = scoring.score(datastore, device, random.sample(choices, len(choices)),  # in a random order:
                                       a.cold_scoring_s)["scored"]  # a random subset where the time runs out
            infos.update({i: datastore.get_image_info(i) for i in choices})
            scores, combined, desc = stored_scores({i: infos[i] for i in choices}, a.weights)
        avoid = labelled_descriptors(datastore) + list(stored_scores({i: infos[i] for i in others}, {})[2].values())
        if not desc and not combined:  # nothing scored yet: random, as MONAI Label's Random
            pick = random.choice(choices)
        else:
            pick = select(choices, combined, desc, 1, a.diversity, avoid)[0]
        datastore.update_image_info(pick, {HANDOUT_KEY: {"ts": now, "client": client}})
        return {"id": pick, "score": combined.get(pick), "cold_start": not combined,
                "scores": {n: scores[n].get(pick) for n in scores}, "scored_now": scored_now}


def select_batch(datastore: Datastore, cfg: CrossModalConfig, k: int, ids: Sequence[str]) -> list[str]:
    """``k`` picks among ``ids`` at once (the simulator's rounds), from the scores stored by the scoring."""
    _, combined, desc = stored_scores({i: datastore.get_image_info(i) for i in ids}, cfg.active.weights)
    return select(list(ids), combined, desc, k, cfg.active.diversity, labelled_descriptors(datastore))


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
