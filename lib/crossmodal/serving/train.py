"""The app's train task on MONAI Label's ``BasicTrainTask`` (MONAI ``SupervisedTrainer`` / ignite engines).

Hybrid supervision: dense labels, sparse labels (by their recorded kind) and unlabelled cases each get their
own shuffling loader, stepped together (:class:`crossmodal.hybrid.MultiSourceLoader`); sparse labels are first
grown by a random walker over the modalities (:mod:`crossmodal.propagate`, ``train.propagate``); labels train
through the partial loss (annotated voxels only), and a cross-modal network also learns from every case through the
consistency terms of :class:`crossmodal.hybrid.HybridLoss` and, with dense labels, copy-paste mixes of dense and
unlabelled cases (:func:`crossmodal.hybrid.copy_paste`, EMA teacher); with ``train.consistency.refine_pseudo``,
self-training rounds (:class:`PseudoLabelRounds`) give the unlabelled cases walker-refined pseudo-labels that
supervise them and their mixes. Training starts from the published model when
there is one. Validation uses dense labels when there are any (Dice), held-out sparse labels otherwise
(partial Dice); the best model by validation (without held-out labels: the latest, :class:`LatestModel`) is
published atomically: an infer request never reads a half-written file,
and a killed training leaves the previous model in service. A fine-tuning publishes only an epoch that validates
better than the model it started from (:class:`StartingScore`; train option ``publish=best_of_run``: the run's
best, as MONAI Label); with no label held out, only a last model that still fits the run's own labels within
``train.fit_tolerance`` of the model it started from (from scratch: of the model in service; :class:`TrainingFit`).
A run whose loss turns NaN / Inf
stops before that step's update with a :class:`crossmodal.errors.TrainingDiverged` (the server's 422) and puts the
published model and its train stats back as they were before it. ``processes=N`` trains data-parallel in N
processes (torch.distributed: gloo on CPU, NCCL on GPUs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import filecmp
import functools
import gc
import io
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from crossmodal.atlas import (
    WarpCache,
    atlas_pseudo_label,
    in_parallel,
    split_workers,
    transfer_strokes,
    usable_cores,
)
from crossmodal.config import (
    MISSING_POLICIES,
    SPACING_TOLERANCE,
    ConfigError,
    CrossModalConfig,
    as_flag,
    as_number,
    atomic_write_bytes,
    atomic_write_text,
    far_apart,
    json_safe,
    near_miss,
    other_windows,
    save_config,
    served_config,
)
from crossmodal.errors import CaseError, TrainingDiverged, user_error_in
from crossmodal.hybrid import (
    CarryUserErrors,
    EMATeacher,
    HybridLoss,
    MultiSourceLoader,
    RaisingThreadDataLoader,
    collate_carrying,
    copy_paste,
    hybrid_batch,
    raise_carried,
    sample_available,
    sample_present,
)
from crossmodal.inference import NetworkInferer
from crossmodal.io import (
    Case,
    atomic_copy,
    case_id_of,
    find_case,
    format_mm,
    header_spacing,
    process_identity,
    staging_folder,
    volume_channels,
)
from crossmodal.labels import DENSE, IGNORE_INDEX, SPARSE
from crossmodal.losses import SupervisedLoss
from crossmodal.nets import (
    CrossModalNet,
    CrossModalOutput,
    build_network,
    non_finite_weights,
    record_preset,
    record_voxel_mm,
    weights_voxel_mm,
    weights_windows,
)
from crossmodal.propagate import refine_segmentation
from crossmodal.serving.datastore import request_device
from crossmodal.transforms import missing_modality_message, preprocessing
from ignite.engine import Engine, Events
from ignite.handlers import EarlyStopping
from monai.data import CacheDataset, DataLoader, Dataset, partition_dataset
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents, default_prepare_batch
from monai.handlers import (
    CheckpointSaver,
    LrScheduleHandler,
    StatsHandler,
    TensorBoardStatsHandler,
    stopping_fn_from_metric,
)
from monai.transforms import Compose, MapTransform
from monai.utils.enums import CommonKeys as Keys
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.basic_train import BasicTrainTask, Context
from monailabel.tasks.train.handler import PublishStatsAndModel, prepare_stats

UNLABELED = "unlabeled"
SOURCES = (DENSE, SPARSE, UNLABELED)

logger = logging.getLogger(__name__)


class PartialOneHotd(MapTransform):
    """``pred`` logits (C, ...) and ``label`` (1, ...) with ``IGNORE_INDEX`` -> one-hot maps zeroed where unannotated.

    With these, MONAI's ``MeanDice`` computes Dice over annotated voxels only (partial Dice).
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__(["pred", "label"])
        self.num_classes = num_classes

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        label = d["label"][0].long()
        mask = (label != IGNORE_INDEX).unsqueeze(0)
        pred = torch.argmax(d["pred"], dim=0)
        eye = torch.eye(self.num_classes, device=pred.device)
        d["pred"] = eye[pred].movedim(-1, 0) * mask
        d["label"] = eye[label.clamp_min(0)].movedim(-1, 0) * mask
        return d


class SparedGenerators:
    """Handlers on an evaluator that put torch's generators (the CPU's and the current CUDA device's) back as they
    were when it started once it completes: an evaluation draws from them (its loader's base seed) and the training
    that follows would draw otherwise (its loaders' shuffles, dropout), so a run's model depended on when it was
    evaluated - its ``publish`` mode (the starting model's evaluation, :class:`StartingScore`, :class:`TrainingFit`)
    and its ``val_interval``. On every evaluator of a run (:meth:`CrossModalTrain.finalize`)."""

    def __init__(self) -> None:
        self.saved: tuple[torch.Tensor, list[torch.Tensor], list[int]] | None = None

    def attach(self, evaluator: Engine) -> None:
        evaluator.add_event_handler(Events.STARTED, self.save)  # before ignite makes the loader's iterator
        evaluator.add_event_handler(Events.COMPLETED, self.restore)

    def save(self, _: Engine) -> None:
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        self.saved = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices], devices

    def restore(self, _: Engine) -> None:
        if self.saved is not None:
            cpu, cuda, devices = self.saved
            torch.set_rng_state(cpu)
            for d, state in zip(devices, cuda, strict=True):
                torch.cuda.set_rng_state(state, d)
            self.saved = None


class StartingScore:
    """The held-out score of the model a run fine-tunes, measured before its first step (an ignite handler on the
    trainer's ``STARTED``, after MONAI's ``CheckpointLoader`` has loaded the weights).

    ``evaluator`` is a bare one (the run's loader, inferer, post-transforms and key metric, none of its handlers: no
    checkpoint, no publish). MONAI Label's publisher takes the best epoch of the run, so a fine-tuning whose every
    epoch validated worse than the model in service replaced it anyway; with this score the publisher
    (:class:`AtomicPublish`) only takes an epoch that beats it. Runs on every process (the metric is reduced
    across them).
    """

    def __init__(self, evaluator: Engine, key: str, start_from: str, scratch: bool = False) -> None:
        self.evaluator, self.key, self.start_from, self.scratch = evaluator, key, start_from, scratch
        self.score: float | None = None

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.STARTED, self)

    def beaten_by(self, best: float) -> bool:
        """Whether a run's best validation ``best`` may replace the starting model (True before it is scored)."""
        return self.score is None or best > self.score

    def __call__(self, engine: Engine) -> None:
        t0 = time.perf_counter()
        self.evaluator.run()
        seconds = time.perf_counter() - t0
        self.score = float(self.evaluator.state.metrics[self.key])
        what = f"training from scratch beside {self.start_from}: held-out {self.key} of the model in service" \
            if self.scratch else f"fine-tuning {self.start_from}: held-out {self.key} of the starting model"
        logger.info(f"{what} {self.score:.4f} ({seconds:.1f} s); "
                    "an epoch of this run is published only when it beats it (train request publish=best_of_run: "
                    "the run's best epoch whatever it scores)")


class TrainingFit:
    """A fine-tuning with no label held out (one labelled case, or ``val_split`` 0): how well the starting model and
    the run's last one segment the run's own labelled cases (partial Dice on what was drawn; an ignite handler on
    the trainer's ``STARTED`` and ``COMPLETED``, every process). A run from scratch beside a model in service
    (``scratch``) is held to that model's fit. ``start_evaluator`` (default ``evaluator``) scores the starting model,
    or the model in service loaded beside, on the run's labelled cases as inference reads them for it
    (:meth:`CrossModalTrain.beside_config`: at the voxel size it records).

    Without held-out labels the last model is published (:class:`LatestModel`), so a learning rate that wrecked the
    model while its loss stayed finite went into service (AdamW steps of 1.0: the committed phantom model, fine-tuned
    one epoch on one case, segmented the others at Dice 0.008 instead of 0.94), as did a run too short to get over
    the first steps of a fresh AdamW (one epoch on one phantom case: its own label 0.93 -> 0.86). Fitting the labels
    it trained on is the least a fine-tuning does: a last model that fits them worse than the starting model by more
    than ``tolerance`` (``train.fit_tolerance``) is not published and the model in service stays, as when no epoch
    beats it on held-out labels (:class:`StartingScore`). :class:`AtomicPublish` publishes nothing until the check
    has passed. Both evaluations leave torch's generators as they were (:class:`SparedGenerators`).
    """

    def __init__(self, evaluator: SupervisedEvaluator, key: str, start_from: str, cases: int, tolerance: float,
                 start_evaluator: SupervisedEvaluator | None = None, scratch: bool = False) -> None:
        self.evaluator, self.key, self.start_from, self.cases, self.tolerance = \
            evaluator, key, start_from, cases, tolerance
        self.start_evaluator, self.scratch = start_evaluator, scratch
        self.start: float | None = None
        self.end: float | None = None
        self.seconds: list[float] = []  # each evaluation's

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.STARTED, self.started)
        trainer.add_event_handler(Events.COMPLETED, self.completed)

    def score(self, evaluator: SupervisedEvaluator | None = None) -> float:
        """The key metric of ``evaluator`` (default: the run's network's) over the run's labelled cases."""
        evaluator = evaluator or self.evaluator
        t0 = time.perf_counter()
        evaluator.run()
        self.seconds.append(time.perf_counter() - t0)
        return float(evaluator.state.metrics[self.key])

    def started(self, engine: Engine) -> None:
        self.start = self.score(self.start_evaluator)
        self.start_evaluator = None  # from scratch: the model in service, loaded beside, let go
        what = f"training from scratch beside {self.start_from} with no label held out: the model in service" \
            if self.scratch else f"fine-tuning {self.start_from} with no label held out: it"
        logger.info(f"{what} fits this run's {self.cases} "
                    f"labelled case(s) at {self.key} {self.start:.4f} ({self.seconds[-1]:.1f} s); the last model is "
                    f"published only if it fits them at {self.start - self.tolerance:.4f} or better "
                    f"(train.fit_tolerance {self.tolerance:g})")

    def completed(self, engine: Engine) -> None:
        self.end = self.score()
        if self.passed:
            logger.info(f"the last model fits this run's labelled case(s) at {self.key} {self.end:.4f} "
                        f"({self.seconds[-1]:.1f} s; {self.against}: {self.start:.4f}): published")
        else:
            logger.warning(self.refusal(engine))

    def refusal(self, engine: Engine) -> str:
        """Why the last model was not published, and what to do."""
        why = "A learning rate too high (this run's: {lr:g}) or too few epochs to learn them" if self.scratch else \
            "A learning rate too high for fine-tuning (this run's: {lr:g}) or too few epochs to get over a fresh " \
            "optimiser's first steps"
        return (f"not published: after {engine.state.epoch} epoch(s) the model fits the {self.cases} labelled "
                f"case(s) it was trained on at {self.key} {self.end:.4f}, {self.against} at {self.start:.4f} "
                f"(train.fit_tolerance {self.tolerance:g}); the model in service stays. "
                f"{why.format(lr=learning_rate(engine))}: train again with a lower `learning_rate` or "
                "more `max_epochs`")

    @property
    def against(self) -> str:
        """What the run's fit is held to, in words."""
        return "the model in service" if self.scratch else "the model it started from"

    @property
    def passed(self) -> bool:
        """Whether the run's last model may be published (False until the run has completed)."""
        return self.start is not None and self.end is not None and self.end >= self.start - self.tolerance

    def record(self) -> dict[str, Any]:
        """``training_fit`` of the train stats: {key, start, end (None until the run completed), published, seconds
        (both evaluations')}."""
        return {"key": self.key, "start": self.start, "end": self.end, "published": self.passed,
                "seconds": round(sum(self.seconds), 2), "from_scratch": self.scratch}


RUN_FOLDER = re.compile(r"^train_(\d+)$")


def run_folders(model_dir: str | os.PathLike[str]) -> list[Path]:
    """The ``train_NN`` run folders under ``model_dir``, oldest first (by number: ``train_100`` after ``train_99``)."""
    root = Path(model_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir() if (m := RUN_FOLDER.match(d.name)) and d.is_dir()]
    return [d for _, d in sorted(found)]


def claim_run_folder(model_dir: str | os.PathLike[str]) -> str:
    """Create and return the name of the next run folder, ``train_NN`` (one above the highest there; two digits at
    least, MONAI Label's ``train_01`` style).

    Example:
        >>> import tempfile; d = tempfile.mkdtemp(); [claim_run_folder(d) for _ in range(2)]
        ['train_01', 'train_02']
    """
    os.makedirs(model_dir, exist_ok=True)
    folders = run_folders(model_dir)
    n = int(RUN_FOLDER.match(folders[-1].name).group(1)) if folders else 0  # type: ignore[union-attr]
    while True:
        n += 1
        name = f"train_{n:02d}"
        try:
            os.mkdir(os.path.join(model_dir, name))  # atomic: two runs never share a folder
            return name
        except FileExistsError:
            continue


def same_bytes(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether files ``a`` and ``b`` both exist with the same content (what "this run's model is in service" means)."""
    return os.path.isfile(a) and os.path.isfile(b) and filecmp.cmp(a, b, shallow=False)


def run_stats(folder: str | os.PathLike[str]) -> tuple[Path | None, dict]:
    """A run folder's newest ``stats_*.json`` and its content ({} when there is none or it does not read: a run
    killed at its start)."""
    folder = Path(folder)
    files = sorted(folder.glob("stats_*.json"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    if not files:
        return None, {}
    try:
        return files[-1], json.loads(files[-1].read_text())
    except (OSError, ValueError):
        return files[-1], {}


def mark_ended(folder: str | os.PathLike[str], how: str, published: str | None = None) -> None:
    """The run folder's stats get ``ended``: ``how`` (``completed``: every epoch trained, ``early_stopped``,
    ``failed``: an error ended it, ``interrupted`` / ``terminated``: Ctrl-C / SIGTERM to the command line), and so do
    the ``published`` stats where they are the run's; nothing where the run wrote no stats. Stats without it: the
    run still trains, or its process was killed (``crossmodal models`` tells which)."""
    stats_file, stats = run_stats(folder)
    if stats_file is None or not stats:
        return
    text = json.dumps({**stats, "ended": how}, indent=2)
    if published and same_bytes(stats_file, published):
        atomic_write_text(Path(published), text)
    atomic_write_text(stats_file, text)


def recompute(network: torch.nn.Module, loss_fn: HybridLoss, x: torch.Tensor, above_megavoxels: float) -> bool:
    """Turn activation checkpointing of ``network`` (a cross-modal one, or its data-parallel wrapper) and
    ``loss_fn`` on for a step whose input ``x`` (B, M, H, W, D) holds more than ``above_megavoxels`` million
    voxels per modality (0: every step, -1: none), off otherwise; returns whether it is on."""
    on = above_megavoxels >= 0 and x.shape[0] * x[0, 0].numel() / 1e6 > above_megavoxels
    net = network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network
    if isinstance(net, CrossModalNet):
        net.checkpointing = on
    loss_fn.checkpointing = on
    return on


def prune_runs(model_dir: str | os.PathLike[str], keep_runs: int, keep: str | None = None) -> list[str]:
    """Remove the oldest run folders beyond the newest ``keep_runs``, never ``keep`` (the run just made) nor a run
    whose model is the one in service (any ``<model_dir>/*.pt`` byte for byte: an earlier run put back with
    ``crossmodal models --publish``); returns the names removed. A folder that cannot be removed is logged and left."""
    folders = run_folders(model_dir)
    if len(folders) <= keep_runs:
        return []
    published = [p for p in Path(model_dir).glob("*.pt") if p.is_file()]
    removed = []
    for folder in folders[: len(folders) - keep_runs]:
        if folder.name == keep or any(same_bytes(folder / "model.pt", p) for p in published):
            continue
        try:
            shutil.rmtree(folder)
            removed.append(folder.name)
        except OSError as e:
            logger.warning(f"run folder {folder} not removed (train.keep_runs {keep_runs}): {e}")
    if removed:
        logger.info(f"removed the oldest run folders {removed} (train.keep_runs {keep_runs})")
    return removed


def stats_path_of(publish_path: str) -> str:
    """The train stats file published beside a model's weights.

    Example:
        >>> stats_path_of("/app/model/phantom_crossmodal.pt")
        '/app/model/phantom_crossmodal_train_stats.json'
    """
    return f"{os.path.splitext(publish_path)[0]}_train_stats.json"


class AtomicPublish(PublishStatsAndModel):
    """MONAI Label's publisher, with stats and model replaced through temp files (``os.replace``); with a
    :class:`StartingScore`, only a best epoch that validates above the starting model's score is published."""

    def __init__(self, *args: Any, start: StartingScore | None = None, fit: TrainingFit | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.start, self.fit = start, fit

    def iteration_completed(self) -> dict[str, Any]:
        stats = prepare_stats(self.start_ts, self.trainer, self.evaluator)
        start = self.start.score if self.start is not None else None
        if start is not None:
            stats["start_metric"] = start
        if self.fit is not None and self.fit.start is not None:
            stats["training_fit"] = self.fit.record()
        stats["process"] = process_identity()  # whether the run still trains, or was killed: crossmodal models
        text = json.dumps(json_safe(stats), indent=2, default=str)  # NaN in it made every GET /info/ a 500
        atomic_write_text(Path(self.output_dir) / f"stats_{self.run_id}.json", text)
        if self._stats_path:
            atomic_write_text(Path(self._stats_path), text)
        best = os.path.join(self.output_dir, self._key_metric_filename)
        if self.start is not None and self.evaluator is not None and not self.start.beaten_by(
                self.evaluator.state.best_metric):
            return stats  # the run's best so far validates no better than the model it started from
        if self.fit is not None and not self.fit.passed:
            return stats  # no label held out: the last model is published once it is known to fit its labels
        if self._publish_path and os.path.exists(best):
            if not os.path.exists(self._publish_path) or os.path.getmtime(best) > os.path.getmtime(self._publish_path):
                atomic_copy(best, self._publish_path)
                logger.info(f"New model published: {best} => {self._publish_path}")
        return stats


class LatestModel:
    """Writes the network's weights to ``path`` after every epoch (temp file + ``os.replace``), for publishing.

    Used when no labels are held out for validation. The alternative, MONAI Label's best Dice on the training batches,
    picks whichever epoch fitted its own few patches best: over bench-quality's 168 runs (300 steps at a constant
    learning rate) the last model scored +0.41 Dice points on average, 100 runs up and 58 down (brain, one labelled
    case + unlabelled ones: 0.711 -> 0.737).
    """

    def __init__(self, network: torch.nn.Module, path: str) -> None:
        self.network, self.path = network, Path(path)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        state = getattr(self.network, "module", self.network).state_dict()
        bad = non_finite_weights(state)
        if bad:  # a finite loss with non-finite gradients: the next step's loss check would come too late
            raise TrainingDiverged(f"training stopped: after epoch {engine.state.epoch} {len(bad)} weight tensor(s) "
                                   f"are not finite (NaN / Inf), first {bad[0]!r}; they were not published and the "
                                   "model in service is the one from before this run. "
                                   f"{LOWER_LR.format(lr=learning_rate(engine))}")
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(self.path, buffer.getvalue())


LOWER_LR = ("Lower the learning rate (this run's: {lr:g}; the train request's `learning_rate`, or the config's "
            "`train.learning_rate`) and train again")


def seed_run(seed: int) -> None:
    """Seeds torch's global generator where a training process starts its run, before it builds the network (each
    data-parallel process with ``seed + rank``): the network's initial weights, its dropout and per-batch modality
    dropout, MONAI's random transforms and the loader workers' seeds (drawn from it) follow the request's ``seed``
    (default ``train.seed``), whatever the process drew before (the app builds and checks networks at start-up), so a
    run repeats another of the same data and settings. The step's own generator (augmented copies, copy-paste boxes)
    and the validation split follow ``train.seed``.

    Example:
        >>> seed_run(3); a = torch.rand(2); seed_run(3); bool((a == torch.rand(2)).all())
        True
    """
    torch.manual_seed(seed)


def process_threads(request: dict[str, Any], world_size: int, cores: int | None = None) -> int | None:
    """The compute threads of each process of a data-parallel run (``multi_gpu`` and ``world_size`` > 1): its share
    of the ``cores`` (default: :func:`usable_cores`); None for a run in one process, which keeps them all (MONAI
    Label passes such a run the number of GPUs visible as its ``world_size``).

    Example:
        >>> process_threads({"multi_gpu": True}, 2, cores=2), process_threads({"multi_gpu": True}, 4, cores=2)
        (1, 1)
        >>> process_threads({"multi_gpu": True}, 8, cores=16), process_threads({"multi_gpu": False}, 8, cores=16)
        (2, None)
    """
    if not request.get("multi_gpu") or world_size < 2:
        return None
    return max(1, (usable_cores() if cores is None else cores) // world_size)


def request_seed(request: dict[str, Any], cfg: CrossModalConfig) -> int:
    """The train request's ``seed`` (checked as :func:`check_train_request` does), else the preset's ``train.seed``.

    Example:
        >>> from crossmodal.config import load_config
        >>> request_seed({"seed": "7"}, load_config("phantom")), request_seed({}, load_config("phantom"))
        (7, 0)
    """
    seed = check_train_request({"seed": request["seed"]})["seed"] if request.get("seed") is not None else None
    return cfg.train.seed if seed is None else int(seed)


def learning_rate(engine: Engine) -> float:
    """The first parameter group's learning rate of ``engine``'s optimizer: the run's (where a schedule lowers it, the
    rate it started at)."""
    group = engine.optimizer.param_groups[0]  # type: ignore[attr-defined]
    return float(group.get("initial_lr", group["lr"]))


def carry_error(error: BaseException, path: str | os.PathLike[str]) -> None:
    """Pickle what a data-parallel process's ``error`` tells the parent to ``path``: the user's error in its chain (a
    case that does not read: the CLI's message, the server's 4xx), else a RuntimeError holding the traceback's text.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "carried"
        >>> try:
        ...     raise RuntimeError("applying transform") from CaseError("c1", "c1.nii.gz", "file does not exist")
        ... except RuntimeError as e:
        ...     carry_error(e, path)
        >>> str(pickle.loads(path.read_bytes()))
        "case 'c1': file c1.nii.gz: file does not exist"
        >>> try:  # a bug: its traceback
        ...     _ = 1 / 0
        ... except ZeroDivisionError as e:
        ...     carry_error(e, path)
        >>> text = str(pickle.loads(path.read_bytes())).splitlines(); text[0], text[-1]
        ('a data-parallel training process failed:', 'ZeroDivisionError: division by zero')
    """
    found = user_error_in(error)
    if found is None:
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        found = RuntimeError(f"a data-parallel training process failed:\n{text}")
    atomic_write_bytes(Path(path), pickle.dumps(found))


def finite_on_every_rank(loss: torch.Tensor) -> bool:
    """Whether the scalar ``loss`` is finite here and, in a data-parallel run, on every process: all of them must
    stop together, or the others would wait for this one's gradients until the process group times out."""
    ok = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok.item())


@contextlib.contextmanager
def restored_if_diverged(*paths: str | None) -> Iterator[None]:
    """The files at ``paths`` (the published model, its stats) put back as they were before the block when it raises
    :class:`TrainingDiverged` (a file that was not there is removed): a diverged run's earlier epochs may have been
    published, every one of them when no label is held out, and the last ones may be finite but ruined.

    The copies lie in a temp folder named by this host and process; a run killed before it removed its own (the
    viewers' Stop Training, SIGKILL) left it there until 2026-12-07, a model's copy at each stop: the next run
    removes it."""
    keep = staging_folder(tempfile.gettempdir(), "crossmodal-before-run-")
    try:
        saved: dict[str, Path | None] = {}
        for i, path in enumerate(p for p in paths if p):
            saved[path] = keep / str(i) if os.path.exists(path) else None
            if saved[path] is not None:
                shutil.copyfile(path, keep / str(i))
        try:
            yield
        except Exception as e:
            if isinstance(user_error_in(e), TrainingDiverged):
                for path, copy in saved.items():
                    if copy is None:
                        Path(path).unlink(missing_ok=True)
                    else:
                        atomic_copy(copy, path)
                logger.info(f"training diverged: {', '.join(saved)} put back as they were before the run")
            raise
    finally:
        shutil.rmtree(keep, ignore_errors=True)


def diverged_run_hint(model_dir: str | os.PathLike[str], run: str) -> str:
    """What a diverged run left that is worth having: its best epoch by held-out validation (``<run>/model.pt``) when
    that beat the model in service (or none was), as a sentence naming the command that puts it in service; "" when
    there is none (no label held out: its model is the latest, not a validated one; or it validated no better)."""
    model = Path(model_dir) / run / "model.pt"
    if not model.is_file():
        return ""
    _, stats = run_stats(model.parent)
    best, start = stats.get("best_metric"), stats.get("start_metric")
    if not (stats.get("eval") or {}).get("key_metric_name") or not isinstance(best, (int, float)) or \
            not math.isfinite(best) or (isinstance(start, (int, float)) and best <= start):
        return ""
    than = f" (the model in service: {start:.4f})" if isinstance(start, (int, float)) else ""
    return (f" This run's best epoch before it diverged validated {best:.4f}{than} and is kept in {model}: "
            f"`crossmodal models --model-dir {model_dir} --publish {run}` puts it in service.")


def diverged(engine: Engine, parts: dict[str, float]) -> TrainingDiverged:
    """The error that stops a run whose loss is not finite at this step (``parts``: the loss's parts here)."""
    dist = torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1
    bad = ", ".join(f"{k} {v}" for k, v in parts.items() if not math.isfinite(v)) or \
        ("on another process" if dist else "its parts finite, their weighted sum overflowed")
    return TrainingDiverged(
        f"training stopped: the loss is not finite (NaN / Inf) at epoch {engine.state.epoch}, step "
        f"{engine.state.iteration} ({bad}); that step was not applied and the model in service is the one from "
        f"before this run. {LOWER_LR.format(lr=learning_rate(engine))}")


class LearningCurve:
    """A run's learning curve, on rank 0: per epoch the learning rate, the train metrics (epoch means of the loss
    parts, train Dice) and, on validation epochs, the evaluator's -> ``learning_curve.json`` every epoch (a killed
    run keeps the epochs it finished), ``learning_curve.png`` when the run completes (:func:`plot_learning_curve`).
    With a :class:`StartingScore`, the starting model's score is an epoch-0 row."""

    def __init__(self, output_dir: str, evaluator: Engine | None = None, start: StartingScore | None = None) -> None:
        self.dir, self.evaluator, self.start = Path(output_dir), evaluator, start
        self.history: list[dict[str, Any]] = []

    def attach(self, trainer: Engine) -> None:  # after MONAI's ValidationHandler: this epoch's validation is in
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        trainer.add_event_handler(Events.COMPLETED, self.completed)

    def epoch_completed(self, engine: SupervisedTrainer) -> None:
        if not self.history and self.start is not None and self.start.score is not None:
            self.history.append({"epoch": 0, "iteration": 0, self.start.key: round(self.start.score, 5)})
        row: dict[str, Any] = {"epoch": engine.state.epoch, "iteration": engine.state.iteration,
                               "learning_rate": engine.optimizer.param_groups[0]["lr"]}
        row.update({k: round(float(v), 5) for k, v in engine.state.metrics.items() if isinstance(v, int | float)})
        ev = self.evaluator
        if ev is not None and ev.state.epoch == engine.state.epoch:
            row.update({k: round(float(v), 5) for k, v in ev.state.metrics.items() if isinstance(v, int | float)})
        self.history.append(row)
        atomic_write_text(self.dir / "learning_curve.json", json.dumps(json_safe(self.history), indent=1))

    def completed(self, engine: Engine) -> None:
        if self.history:
            plot_learning_curve(self.history, self.dir / "learning_curve.png")


def plot_learning_curve(history: list[dict[str, Any]], path: Path) -> None:
    """Loss parts (left, log scale) and Dice (right: train, validation) per epoch, from
    :class:`LearningCurve`'s rows; written through a temp file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    keys = sorted({k for row in history for k in row})
    for k in [k for k in keys if k.startswith("loss_") and k != "loss_ramp"]:
        pts = [(r["epoch"], r[k]) for r in history if r.get(k, 0) > 0]
        if pts:
            left.plot(*zip(*pts, strict=True), marker=".", label=k[5:])
    left.set(xlabel="epoch", ylabel="loss (epoch mean)", yscale="log", title="loss parts")
    left.legend(fontsize=8)
    for k, style in (("train_mean_dice", "--"), ("val_mean_dice", "-")):
        pts = [(r["epoch"], r[k]) for r in history if k in r]
        if pts:
            right.plot(*zip(*pts, strict=True), style, marker="o", label=k.replace("_mean_dice", "") + " Dice")
    val = [r for r in history if "val_mean_dice" in r]
    published = max(val, key=lambda r: r["val_mean_dice"])["epoch"] if val else history[-1]["epoch"]
    why = "best validation" if val else "last: no held-out label"
    right.axvline(published, color="tab:gray", lw=0.8, label=f"published: epoch {published} ({why})" if published
                  else "published: none (epoch 0, the model fine-tuned, validated best)")
    right.set(xlabel="epoch", ylabel="mean foreground Dice", title="Dice")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


class PseudoLabelRounds:
    """Self-training rounds (``train.consistency.refine_pseudo``), an ignite handler on ``ITERATION_COMPLETED``.

    From step ``refine_start`` on, every ``refine_interval`` steps, the EMA teacher (the network while there is
    none) segments unlabelled cases of ``items`` whole (at most ``refine_max_cases`` a round, the next ones in
    turn), and :func:`crossmodal.propagate.refine_segmentation` re-decides the band around every predicted
    boundary along the images' edges; the results go to ``store`` (``{case_id: (1, H, W, D)}``), which the
    unlabelled loader crops with the images (``PseudoLabeld``).
    """

    def __init__(self, cfg: CrossModalConfig, items: list[dict[str, Any]], store: dict[str, torch.Tensor]) -> None:
        self.cfg, self.items, self.store = cfg, items, store
        self.load = preprocessing(cfg, "val")
        self.inferer = NetworkInferer(cfg.infer, fused_only=True, roi_size=cfg.train.patch_size)
        self.last: int | None = None
        self.next = 0  # index in items of the next case to refine

    def due(self, iteration: int) -> bool:
        cc = self.cfg.train.consistency
        return iteration >= cc.refine_start and (self.last is None or iteration - self.last >= cc.refine_interval)

    def take(self) -> list[dict[str, Any]]:
        """The cases of the next round: up to ``refine_max_cases``, continuing where the last round stopped."""
        count = min(len(self.items), self.cfg.train.consistency.refine_max_cases)
        chosen = [self.items[(self.next + i) % len(self.items)] for i in range(count)]
        self.next = (self.next + count) % max(1, len(self.items))
        return chosen

    @torch.no_grad()
    def __call__(self, engine: SupervisedTrainer) -> None:
        if not self.due(engine.state.iteration):
            return
        self.last = engine.state.iteration
        start = time.perf_counter()
        teacher = getattr(engine.state, "teacher", None)
        model = teacher.model if teacher is not None else getattr(engine.network, "module", engine.network)
        was_training = model.training
        model.eval()
        cc, p = self.cfg.train.consistency, self.cfg.train.propagate
        labelled = []
        for item in self.take():
            d = self.load(dict(item))
            image = d["image"].as_tensor() if hasattr(d["image"], "as_tensor") else d["image"]
            logits = self.inferer(image[None].to(engine.state.device), model, present=d["present"][None])
            conf, seg = torch.softmax(logits, 1).max(1)
            label = refine_segmentation(image, seg, self.cfg.labels.num_classes, cc.refine_erode, p.beta,
                                        p.threshold, p.max_voxels, conf[0], cc.refine_keep_confident)
            self.store[str(d["case_id"])] = label.cpu()
            labelled.append(float((label != IGNORE_INDEX).float().mean()))
        model.train(was_training)
        engine.state.metrics["pseudo_refined_cases"] = len(labelled)
        engine.state.metrics["pseudo_labelled"] = round(sum(labelled) / max(1, len(labelled)), 4)
        logger.info(f"step {self.last}: pseudo-labels of {len(labelled)} of {len(self.items)} unlabelled cases "
                    f"refined by the random walker in {time.perf_counter() - start:.1f} s "
                    f"({100 * sum(labelled) / max(1, len(labelled)):.1f}% of their voxels labelled)")


def plain(t: Any) -> torch.Tensor:
    """A MetaTensor's plain tensor (anything else as it is)."""
    return t.as_tensor() if hasattr(t, "as_tensor") else t


def lacking_modalities(cfg: CrossModalConfig, items: list[dict[str, Any]]) -> dict[str, tuple[Case, list[str]]]:
    """``{case id: (case, the secondary modalities it has no file for)}`` over the cases of ``items`` lacking one (a
    4D primary file holding every modality lacks none)."""
    lacking = {}
    for d in items:
        case = find_case(d["image"], cfg.modality_names, cfg.data.sidecar_dir)
        gone = [m for m in cfg.modality_names[1:] if case.modalities.get(m) is None]
        if gone and volume_channels(case.primary) != len(cfg.modality_names):
            lacking[case.case_id] = (case, gone)
    return lacking


def _listed(lacking: dict[str, tuple[Case, list[str]]], most: int = 10) -> str:
    shown = "; ".join(f"{c}: {', '.join(m)}" for c, (_, m) in sorted(lacking.items())[:most])
    return shown + (f"; {len(lacking) - most} more" if len(lacking) > most else "")


def check_modalities(cfg: CrossModalConfig, items: list[dict[str, Any]]) -> None:
    """Before any case loads: under ``missing_modality: zero_fill``, log the training cases without some secondary
    modality's file (each trains with it left out of its fusion); under ``error``, stop the run naming them all.

    Raises:
        CaseError: ``error`` policy and a case lacks a modality: the first one's message (where its file belongs,
            what to do) and the others' ids and modalities.
    """
    lacking = lacking_modalities(cfg, items)
    if not lacking:
        return
    if cfg.infer.missing_modality == "zero_fill":
        logger.info(f"{len(lacking)} of {len(items)} training cases lack a modality ({_listed(lacking)}): each trains "
                    "with it left out of its fusion, heads and consistency terms (missing_modality zero_fill)")
        return
    first, (case, gone) = sorted(lacking.items())[0]
    others = {k: v for k, v in lacking.items() if k != first}
    n = len(others)
    also = f"; {n} more training case{'s' * (n > 1)} of {len(items)} lack a modality ({_listed(others)})" if n else ""
    raise CaseError(first, None, missing_modality_message(case, gone[0], cfg) + also)


def check_spacings(cfg: CrossModalConfig, items: list[dict[str, Any]],
                   tolerance: float = SPACING_TOLERANCE) -> str | None:
    """Before any case loads: with no working spacing set (``data.spacing`` null), training cases whose voxel sizes
    differ by more than ``tolerance`` on an axis are each seen at their own scale (the committed phantom model, trained
    at 2 mm, segmented its own cases resampled to 1 / 1.5 / 3 mm at 0.39 / 0.50 / 0.57 mean Dice instead of 0.93; with
    ``data.spacing: [2, 2, 2]`` 0.90 / 0.89 / 0.90): a warning naming the sizes and the per-axis median to set,
    returned and logged. Not where the run fine-tunes weights that record their voxel size: cases far from it are
    resampled to it."""
    if cfg.data.spacing or cfg.data.weights_spacing:
        return None
    sizes = _voxel_sizes(items)
    if len(sizes) < 2:
        return None
    arr = np.asarray(list(sizes.values()))
    if not bool((arr.max(0) / arr.min(0) > tolerance).any()):
        return None
    median = [round(float(v), 2) for v in np.median(arr, 0)]
    order = {c: (float(np.prod(v)), tuple(v)) for c, v in sizes.items()}  # by voxel volume, ties by the sizes
    fine, coarse = min(sizes, key=order.__getitem__), max(sizes, key=order.__getitem__)
    shown = {c: format_mm(sizes[c]) for c in (fine, coarse)}
    message = (f"the {len(sizes)} training cases come in voxel sizes from {shown[fine]} mm ({fine}) to "
               f"{shown[coarse]} mm ({coarse}), and data.spacing is not set: the network sees each case at its own "
               "scale, and a case at another will segment poorly. Set data.spacing in the preset (their median: "
               f"{median}) to resample every case to one voxel size, for training and inference")
    logger.warning(message)
    return message


def _voxel_sizes(items: list[dict[str, Any]]) -> dict[str, tuple[float, float, float]]:
    """{case: its primary image's voxel size (mm along R, A, S)} from the headers, of the cases whose header reads."""
    return {case_id_of(d["image"]): s for d in items if (s := header_spacing(d["image"])) is not None}


def training_voxel_mm(cfg: CrossModalConfig, items: list[dict[str, Any]]) -> tuple[float, float, float] | None:
    """The voxel size (mm, per axis) a run's network sees its cases at, recorded in its weights for inference:
    ``data.spacing`` where set, else the size of the weights it fine-tunes (``data.weights_spacing``, see
    :meth:`CrossModalTrain.run_config`), else the per-axis median of the training cases' own (headers only); None
    without a readable header.

    Example:
        >>> from crossmodal.config import load_config
        >>> training_voxel_mm(load_config("phantom"), [])
        (2.0, 2.0, 2.0)
    """
    if cfg.data.spacing or cfg.data.weights_spacing:
        return cfg.data.spacing or cfg.data.weights_spacing
    sizes = _voxel_sizes(items)
    if not sizes:
        return None
    a, b, c = (round(float(v), 4) for v in np.median(np.asarray(list(sizes.values())), 0))
    return a, b, c


def batch_present(batch: dict[str, Any]) -> torch.Tensor:
    """(B, M) bool: the modalities each case of a collated batch has (``present``, from ``LoadCased``)."""
    return plain(batch["present"]).to(torch.bool).cpu()


def on_cuda(request: dict[str, Any]) -> bool:
    """Whether a train request runs on a GPU: one is visible and the request's ``device`` (MONAI Label's default:
    ``cuda``) is not the CPU.

    Example:
        >>> on_cuda({"device": "cpu"})
        False
    """
    return (request_device(request.get("device")) or "cuda").startswith("cuda") and torch.cuda.is_available()


def prepare_with_present(batch: dict[str, Any], device: str | torch.device | None = None,
                         non_blocking: bool = False, **kwargs: Any) -> tuple:
    """MONAI's ``default_prepare_batch`` plus each case's modalities for the inferer (:class:`NetworkInferer`'s
    ``present``): a validation case without a secondary modality is segmented without it, as the infer task does."""
    image, label = default_prepare_batch(raise_carried(batch), device, non_blocking, **kwargs)
    return image, label, (), {"present": batch_present(batch)}


def labelled_case(d: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """A loaded case's image (M, H, W, D), label (1, H, W, D) and grid affine (voxel -> mm)."""
    return plain(d["image"]), plain(d["label"]), np.asarray(d["image"].affine, dtype=np.float64)


def registration_workers(cfg: CrossModalConfig, processes: int = 1) -> int:
    """Registrations one training process runs at once: ``train.consistency.atlas_workers``, or (0) its share of
    the usable cores when ``processes`` train side by side on this machine (data-parallel ranks), at least 1."""
    return cfg.train.consistency.atlas_workers or max(1, usable_cores() // max(1, processes))


def atlas_labels(cfg: CrossModalConfig, unlabeled: list[dict[str, Any]], dense: list[dict[str, Any]],
                 store: dict[str, torch.Tensor], cache_dir: str | os.PathLike[str] | None = None,
                 processes: int = 1) -> None:
    """Fill ``store`` (``{case_id: (1, H, W, D)}`` on the working grid) with atlas pseudo-labels of the first
    ``atlas_max_cases`` ``unlabeled`` items from the first ``atlas_count`` ``dense`` ones
    (:func:`crossmodal.atlas.atlas_pseudo_label`, ``train.consistency.atlas_*``; cases side by side; registrations
    kept in ``cache_dir``, :class:`crossmodal.atlas.WarpCache`; :func:`registration_workers` at once)."""
    cc = cfg.train.consistency
    cache = WarpCache(cache_dir) if cache_dir is not None else None
    load = preprocessing(cfg, "val")
    start = time.perf_counter()
    atlases = [labelled_case(load(dict(item))) for item in dense[: cc.atlas_count]]
    items = unlabeled[: cc.atlas_max_cases]
    at_once, each = split_workers(registration_workers(cfg, processes), len(items))

    def pseudo(item: dict[str, Any]) -> tuple[str, torch.Tensor]:
        d = load(dict(item))
        return str(d["case_id"]), atlas_pseudo_label(plain(d["image"]), np.asarray(d["image"].affine, np.float64),
                                                     atlases, cfg.labels.num_classes, cc.atlas_min_agreement,
                                                     workers=each, cache=cache)

    labelled = []
    for case_id, label in in_parallel(pseudo, items, at_once):
        store[case_id] = label
        labelled.append(float((label != IGNORE_INDEX).float().mean()))
    logger.info(f"atlas pseudo-labels of {len(labelled)} of {len(unlabeled)} unlabelled cases from {len(atlases)} "
                f"atlas{'es' if len(atlases) != 1 else ''} (dense cases) in {time.perf_counter() - start:.1f} s, "
                f"{at_once} case{'s' * (at_once != 1)} x {min(each, len(atlases))} at once{read_back(cache)} "
                f"({100 * sum(labelled) / max(1, len(labelled)):.1f}% of their voxels labelled)")


def stroke_transfer(cfg: CrossModalConfig, sparse: list[dict[str, Any]], store: dict[str, torch.Tensor],
                    cache_dir: str | os.PathLike[str] | None = None, processes: int = 1) -> None:
    """Fill ``store`` (``{case_id: (1, H, W, D)}`` on the working grid) with the sparse labels of the first
    ``atlas_max_cases`` ``sparse`` items, each with the strokes of the next ``atlas_sparse`` items added
    (:func:`crossmodal.atlas.transfer_strokes`; cases side by side; registrations kept in ``cache_dir``,
    :class:`crossmodal.atlas.WarpCache`; :func:`registration_workers` at once)."""
    cc = cfg.train.consistency
    cache = WarpCache(cache_dir) if cache_dir is not None else None
    load = preprocessing(cfg, "val")
    start = time.perf_counter()
    k = min(cc.atlas_sparse, len(sparse) - 1)
    targets = list(range(min(len(sparse), cc.atlas_max_cases) if k > 0 else 0))
    at_once, each = split_workers(registration_workers(cfg, processes), len(targets))

    # case i reads cases i..i+k: each is read once (the last k wrap round) while at most at_once cases run
    @functools.lru_cache(maxsize=k + at_once)
    def case(j: int) -> tuple[str, tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
        d = load(dict(sparse[j]))
        return str(d["case_id"]), labelled_case(d)

    def transferred(i: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        case_id, (image, own, affine) = case(i)
        others = [case((i + j) % len(sparse))[1] for j in range(1, k + 1)]
        return case_id, own, transfer_strokes(image, affine, own, others, workers=each, cache=cache)

    drawn, grown = [], []
    for case_id, own, label in in_parallel(transferred, targets, at_once):
        store[case_id] = label
        drawn.append(float((own != IGNORE_INDEX).float().mean()))
        grown.append(float((label != IGNORE_INDEX).float().mean()))
    others = f"{max(k, 0)} other{'s' * (k != 1)}"
    logger.info(f"stroke transfer: {len(grown)} of {len(sparse)} sparse cases given the strokes of {others} "
                f"in {time.perf_counter() - start:.1f} s, {at_once} case{'s' * (at_once != 1)} "
                f"x {min(each, k)} at once{read_back(cache)} ({100 * sum(drawn) / max(1, len(drawn)):.1f}% -> "
                f"{100 * sum(grown) / max(1, len(grown)):.1f}% of their voxels labelled)")


def read_back(cache: WarpCache | None) -> str:
    """``", 4 of 6 read back"``: the registrations a run found in its cache (nothing without one)."""
    if cache is None:
        return ""
    done = cache.counts["read"] + cache.counts["registered"]
    return f", {cache.counts['read']} of {done} read back"


def coerce_tracking(request: dict[str, Any], model_dir: str) -> dict[str, Any]:
    """MLflow only on a ``sqlite:///`` URI (MLflow >= 3.13 rejects MONAI Label's ``file://`` default).

    Slicer asks for ``tracking=mlflow``; then the URI becomes ``sqlite:///<model_dir>/mlflow.db`` unless a sqlite
    URI was given. None, ``""`` or ``"None"`` turns tracking off (:func:`check_train_request` refuses any other).
    """
    req = dict(request)
    tracking = req.get("tracking")
    tracking = tracking[0] if isinstance(tracking, list) else tracking
    if str(tracking).lower() == "mlflow":
        uri = str(req.get("tracking_uri") or "")
        if not uri.startswith("sqlite:///"):
            req["tracking_uri"] = "sqlite:///" + os.path.abspath(os.path.join(model_dir, "mlflow.db"))
        req["tracking"] = "mlflow"
    else:
        req["tracking"] = None
    return req


POSITIVE_INTS = ("max_epochs", "train_batch_size", "val_batch_size", "val_interval", "processes")
SEED_KEYS = ("seed",)  # the run's generator (:func:`seed_run`), 0 .. 2^32 - 1
FLAGS = ("pretrained", "use_unlabeled", "multi_gpu")  # true / false, also as the strings a form or a URL sends
# the train task's choices, the first the default: the viewers show each as a list and send the item chosen (a
# request without the key reached MONAI Label's run as the whole list, which its loaders took for the plain ones)
CHOICES = {"dataset": ("Dataset", "CacheDataset"), "dataloader": ("DataLoader", "ThreadDataLoader"),
           "publish": ("if_better", "best_of_run")}


def train_choices(cfg: CrossModalConfig) -> dict[str, tuple[str, ...]]:
    """:data:`CHOICES` plus ``missing_modality``, the server's policy first: a case without a secondary modality's
    file stops the run (``error``) or trains with that modality left out (``zero_fill``), per run."""
    default = cfg.infer.missing_modality
    return {**CHOICES, "missing_modality": (default, *(p for p in MISSING_POLICIES if p != default))}


def check_train_request(request: dict[str, Any], choices: dict[str, tuple[str, ...]] | None = None,
                        known: Iterable[str] = ()) -> dict[str, Any]:
    """The request with its numbers as numbers and each choice (``choices``, default :data:`CHOICES`) one of its
    options; ConfigError naming the key and the value when one is out of range, and naming a key that is not one of
    the task's options (``known``) but nearly is (a typo: ``max_epoch`` was ignored without a word and the run
    trained the preset's epochs; keys far from every option, such as those MONAI Label adds, pass).

    Example:
        >>> [check_train_request({"max_epochs": v})["max_epochs"] for v in ("3", 3, 3.0)]
        [3, 3, 3]
        >>> check_train_request({"max_epochs": -3})
        Traceback (most recent call last):
        ...
        crossmodal.config.ConfigError: train request: max_epochs=-3 must be a positive integer
        >>> [check_train_request(r)["dataset"] for r in ({}, {"dataset": ["CacheDataset", "Dataset"]})]
        ['Dataset', 'CacheDataset']
        >>> check_train_request({"dataset": "PersistentDataset"})
        Traceback (most recent call last):
        ...
        crossmodal.config.ConfigError: train request: dataset='PersistentDataset' must be one of ['Dataset', \
'CacheDataset']
        >>> [check_train_request({"pretrained": v})["pretrained"] for v in (False, "false", "True")]
        [False, False, True]
        >>> check_train_request({"use_unlabeled": "no"})["use_unlabeled"]
        False
        >>> check_train_request({"max_epoch": 2, "client_id": "a"}, known=["max_epochs", "val_interval"])
        Traceback (most recent call last):
        ...
        crossmodal.config.ConfigError: train request: max_epoch is not an option of this task; did you mean max_epochs?
    """
    req = dict(request)
    if typo := near_miss(req, known):
        raise ConfigError(f"train request: {typo[0]} is not an option of this task; did you mean {typo[1]}?")
    for key, options in (CHOICES if choices is None else choices).items():
        value = req.get(key, options[0])
        value = value[0] if isinstance(value, list) and value else value  # a list: its first item, as the viewers
        if value not in options:
            raise ConfigError(f"train request: {key}={req[key]!r} must be one of {list(options)}")
        req[key] = value
    name = req.get("name")  # the run folder under the model dir (MONAI Label joins it to that path as it comes)
    if name and (not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name)):
        raise ConfigError(f"train request: name={name!r} must be a folder name (letters, digits, '_', '.', '-'), or "
                          "empty for the next train_NN")
    for key in FLAGS:  # pretrained false: a run from scratch (:meth:`CrossModalTrain.load_path`)
        if req.get(key) is not None:
            flag = as_flag(req[key])
            if flag is None:
                raise ConfigError(f"train request: {key}={req[key]!r} must be true or false")
            req[key] = flag
    if req.get("multi_gpu") and not torch.cuda.is_available():  # MONAI Label spawned its GPU workers all the same
        raise ConfigError("train request: multi_gpu=true trains on GPUs and this server has none; processes=N trains "
                          "data-parallel in N CPU processes")
    checks: list[tuple[str, type, Callable[[Any], bool], str]] = [
        (key, int, lambda x: x >= 1, "a positive integer") for key in POSITIVE_INTS]
    checks += [(key, int, lambda x: 0 <= x < 2**32, "an integer from 0 to 2^32 - 1") for key in SEED_KEYS]
    checks += [("learning_rate", float, lambda x: x > 0, "a number > 0"),
               ("val_split", float, lambda x: 0 <= x < 1, "a number in [0, 1)")]
    for key, kind, inside, want in checks:
        if req.get(key) is not None:
            value = as_number(req[key], kind)
            if value is None or not inside(value):
                raise ConfigError(f"train request: {key}={req[key]!r} must be {want}")
            req[key] = value
    if req.get("early_stop_patience") is not None:  # "x" was taken, and the run trained every epoch
        patience = as_number(req["early_stop_patience"], int)
        if patience is None or patience < -1:
            raise ConfigError(f"train request: early_stop_patience={req['early_stop_patience']!r} must be an integer: "
                              "validations without a better held-out score before the run stops (-1 or 0: never)")
        req["early_stop_patience"] = patience
    tracking = req.get("tracking")
    tracking = tracking[0] if isinstance(tracking, list) and tracking else tracking
    if tracking is not None and str(tracking).lower() not in ("", "none", "mlflow"):  # turned tracking off silently
        raise ConfigError(f"train request: tracking={req['tracking']!r} must be mlflow or None")
    if req.get("val_batch_size", 1) != 1:  # MONAI's collate stacks whole cases, which differ in size
        raise ConfigError(f"train request: val_batch_size={req['val_batch_size']} must be 1: validation segments each "
                          "held-out case whole, and cases of different sizes do not stack into one batch (the "
                          "sliding window batches within a case: infer.sw_batch_size)")
    return req


def quiet_on_interrupt(handlers: list[Any]) -> list[Any]:
    """``handlers`` with each :class:`~monai.handlers.StatsHandler` passing a KeyboardInterrupt (Ctrl-C in ``crossmodal
    train``) on without logging its traceback: the command says in one line where the run stopped and what is in
    service. Any other exception is logged as before."""
    for h in handlers:
        if isinstance(h, StatsHandler):
            def raised(engine: Any, e: BaseException, log: Callable[..., None] = h.exception_raised) -> None:
                if isinstance(e, KeyboardInterrupt):
                    raise e
                log(engine, e)

            h.exception_raised = raised  # type: ignore[method-assign,assignment]  # before attach() registers it
    return handlers


class CrossModalTrain(BasicTrainTask):
    """Train ``cfg.model`` on the datastore's dense and sparse labels and (cross-modal networks) unlabelled cases."""

    def __init__(self, cfg: CrossModalConfig, model_dir: str, publish_path: str, pretrained_path: str | None,
                 description: str) -> None:
        t = cfg.train
        super().__init__(
            model_dir=model_dir, description=description, amp=False, load_path=pretrained_path,
            publish_path=publish_path, labels=cfg.labels.classes, load_strict=True, tracking=None,
            # one stats file a model (MONAI Label's default, <model_dir>/train_stats.json, is one for all: the
            # viewers saw the last run of either model as both models' train stats)
            stats_path=stats_path_of(publish_path),
            find_unused_parameters=True,  # modality dropout leaves encoders out of some steps
            config={"max_epochs": t.max_epochs, "train_batch_size": t.batch_size, "val_batch_size": 1,
                    "val_split": t.val_fraction, "val_interval": t.val_interval,
                    "learning_rate": t.lr_for(cfg.model.name), "multi_gpu": False,
                    # MONAI Label's default, train_01, was every run's folder: each run replaced the last one's model
                    "name": "",
                    "processes": 1, "use_unlabeled": t.consistency.unlabeled, "seed": t.seed,
                    **{key: list(options) for key, options in train_choices(cfg).items()},
                    "tracking": ["None", "mlflow"]},
        )
        self.cfg = cfg  # during a run: the preset as the run works with it (:meth:`__call__`, :meth:`run_config`)
        self._start: StartingScore | None = None  # the running fine-tuning's (:meth:`finalize`)
        self._fit: TrainingFit | None = None
        self._pseudo_rounds: PseudoLabelRounds | None = None  # the running run's self-training rounds

    @property
    def hybrid(self) -> bool:
        """Whether the consistency terms (and so unlabelled cases) take part: a cross-modal network with weights."""
        return self.cfg.model.name == "crossmodal" and self.cfg.train.consistency.active

    def network(self, context: Context) -> torch.nn.Module:
        return build_network(self.cfg)

    def optimizer(self, context: Context) -> torch.optim.Optimizer:
        """AdamW at the request's (else the preset's) learning rate, times ``train.finetune_lr_scale`` when the run
        fine-tunes a model."""
        t = self.cfg.train
        lr = float(context.request.get("learning_rate", t.lr_for(self.cfg.model.name)))
        start_from = self.finetuning(context)
        if start_from is not None and t.finetune_lr_scale != 1.0:
            logger.info(f"fine-tuning {start_from}: learning rate {lr:g} x train.finetune_lr_scale "
                        f"{t.finetune_lr_scale:g} = {lr * t.finetune_lr_scale:g}")
            lr *= t.finetune_lr_scale
        return torch.optim.AdamW(context.network.parameters(), lr=lr, weight_decay=t.weight_decay)

    def loss_function(self, context: Context) -> HybridLoss:
        t = self.cfg.train
        return HybridLoss(SupervisedLoss(t.dice_weight, t.ce_weight, t.aux_weight), t.consistency)

    def finetuning(self, context: Context) -> str | None:
        """The model this run fine-tunes (:meth:`load_path`), or None for a run from scratch."""
        start_from = self.load_path(context.output_dir, context.pretrained)
        return start_from if start_from and os.path.exists(start_from) else None

    def stats(self) -> dict[str, Any]:
        """The published train stats (``GET /info/``'s ``train_stats``), NaN / Inf as null: a file written with
        them before 2026-12-03 made every ``GET /info/`` a 500, the viewers' connect included."""
        return json_safe(super().stats())

    def in_service(self) -> str | None:
        """The weights infer serves: the published model, else the pretrained one; None when neither exists."""
        for path in (self._publish_path, self._load_path):
            if path and os.path.exists(path):
                return path
        return None

    def load_path(self, output_dir: str, pretrained: bool = True) -> str | None:
        """Fine-tune the model in service (:meth:`in_service`); this run folder's best only when there is none;
        request ``pretrained`` false: a run from scratch (None). MONAI Label's order puts the run folder's best first,
        also for ``pretrained`` false: after a fine-tuning that published nothing, the next run started from the
        epoch no better than the model in service, and its gate compared against that."""
        if not pretrained:
            return None
        return self.in_service() or super().load_path(output_dir, pretrained)

    def train_iteration_update(self, context: Context) -> Callable[[Engine, Any], dict[str, Any]]:
        """One step on a ``{source: batch}`` dict; the loss sees the whole network output, metrics the labelled
        fused logits. The loss parts go to ``engine.state.metrics`` (train stats for the viewers)."""
        loss_fn = self.loss_function(context)
        gen = torch.Generator().manual_seed(self.cfg.train.seed + 1000 * context.local_rank)
        sums: dict[str, Any] = {}

        cc = self.cfg.train.consistency
        teacher: EMATeacher | None = None

        crossmodal = self.cfg.model.name == "crossmodal"  # an early-fusion network reads zero-filled channels

        told = False  # the log has said that steps recompute

        def step(engine: Any, batch: dict[str, Any]) -> dict[str, Any]:
            nonlocal teacher, told
            dev = engine.state.device
            labeled = [(plain(batch[k]["image"]).to(dev), plain(batch[k]["label"]).to(dev))
                       for k in (DENSE, SPARSE) if k in batch]
            unlabeled = [plain(batch[UNLABELED]["image"]).to(dev)] if UNLABELED in batch else []
            # the modalities each sample's case has (B, M), in the order of the stacked batch below
            has = [batch_present(batch[k]) for k in (DENSE, SPARSE) if k in batch]
            has_u = batch_present(batch[UNLABELED]) if unlabeled else None
            n_real = sum(len(t[0]) for t in labeled)
            # the unlabelled cases' refined pseudo-labels (self-training rounds), when the loader carries them
            refined = plain(batch[UNLABELED]["label"]).to(dev) if unlabeled and "label" in batch[UNLABELED] else None
            if self.hybrid and cc.copy_paste and DENSE in batch and unlabeled:
                # bidirectional copy-paste between the dense cases and the unlabelled ones (EMA teacher's
                # pseudo-labels); sparse labels stay out: a scribble beside a dense pseudo-label would drown
                if teacher is None:
                    teacher = engine.state.teacher = EMATeacher(engine.network, cc.teacher_decay)
                if engine.state.iteration > cc.copy_paste_start:
                    assert has_u is not None  # unlabeled is not empty
                    xl, yl = labeled[0]
                    n = min(len(xl), len(unlabeled[0]))
                    pseudo = teacher.pseudo_label(unlabeled[0][:n], cc.pseudo_threshold, has_u[:n])
                    if refined is not None:  # refined pseudo-labels where a round has made them
                        pseudo = torch.where(refined[:n] != IGNORE_INDEX, refined[:n].to(pseudo.dtype), pseudo)
                    labeled.append(copy_paste(xl[:n], yl[:n], unlabeled[0][:n], pseudo, gen))
                    both = has[0][:n] & has_u[:n]  # a mix lacks what either of its two cases lacks
                    has.append(torch.cat([both, both]))
                    engine.state.metrics["pseudo_confident"] = round(float((pseudo != IGNORE_INDEX).float().mean()), 4)
            n_mixed = sum(len(t[0]) for t in labeled) - n_real
            n_augmented = None
            if refined is not None and has_u is not None and bool((refined != IGNORE_INDEX).any()):  # self-training
                # they supervise, and are the consistency terms' plain samples too (their augmented copies are
                # of them): in the batch once (until 2026-12-04 a second time as unlabelled: 8 of the 32 patches
                # of a brain demo step from scratch)
                labeled.append((unlabeled.pop(), refined))
                has.append(has_u)
                has_u, n_augmented = None, len(refined)
            present = torch.cat(has + ([has_u] if has_u is not None else [])) if crossmodal else None
            present = None if present is None or bool(present.all()) else present
            x, y, n_lab, n_plain, aug = hybrid_batch(labeled, unlabeled, gen, augment=self.hybrid,
                                                     modality_dropout=cc.modality_dropout, present=present,
                                                     n_augmented=n_augmented)
            engine.state.output = {Keys.IMAGE: x[:n_real], Keys.LABEL: None if y is None else y[:n_real]}
            # MONAI post-processes zip(decollated batch, decollated output): the {source: batch} dict decollates
            # to fewer items than the n_real outputs, and the rest reached the train Dice as raw logits
            engine.state.batch = dict(engine.state.output)
            engine.state.metrics["copy_paste_samples"] = n_mixed  # mixes in this step's supervised part
            engine.state.metrics["pseudo_labelled_samples"] = n_lab - n_real - n_mixed  # refined pseudo-labels
            if recompute(engine.network, loss_fn, x, self.cfg.train.recompute_above_megavoxels) and not told:
                told = True
                logger.info(f"steps of {len(x)} patches ({x.shape[0] * x[0, 0].numel() / 1e6:.1f} M voxels) recompute "
                            "their activations in the backward pass (train.recompute_above_megavoxels "
                            f"{self.cfg.train.recompute_above_megavoxels:g})")
            engine.network.train()
            engine.optimizer.zero_grad(set_to_none=True)
            mask = sample_present(n_plain, aug, present)
            out = engine.network(x) if mask is None else \
                engine.network(x, sample_present=mask, available=sample_available(n_plain, aug, present))
            fused = out.fused if isinstance(out, CrossModalOutput) else out
            engine.state.output[Keys.PRED] = fused[:n_real].detach()
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            by_name = None if present is None else dict(zip(self.cfg.modality_names, present.T.to(dev), strict=True))
            loss, parts = loss_fn(out, y, n_lab, n_plain, aug, engine.state.iteration - 1, by_name)
            if not finite_on_every_rank(loss):  # before its update: the weights stay as the last step left them
                raise diverged(engine, parts)
            engine.state.output[Keys.LOSS] = loss.detach()
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
            if teacher is not None:
                teacher.update(engine.network)
            engine.fire_event(IterationEvents.MODEL_COMPLETED)  # MONAI decollates and post-processes here
            if sums.get("epoch") != engine.state.epoch:  # epoch means of the loss parts, for the stats
                sums.clear()
                sums.update({"epoch": engine.state.epoch, "n": 0})
            sums["n"] += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
                engine.state.metrics[f"loss_{k}"] = round(sums[k] / sums["n"], 5)
            return engine.state.output

        return step

    def _dataloader(self, context: Context, dataset: Any, batch_size: int, num_workers: int,
                    shuffle: bool = False) -> DataLoader:
        """MONAI Label's loader, ``DataLoader`` or ``ThreadDataLoader`` by the request (the latter one that raises
        what its thread met: :class:`~crossmodal.hybrid.RaisingThreadDataLoader`); with worker processes, a case
        error met in one comes back as the batch (:class:`~crossmodal.hybrid.CarryUserErrors`) and is raised here,
        naming its case and file as it does without workers."""
        kind = RaisingThreadDataLoader if context.dataloader_type == "ThreadDataLoader" else DataLoader
        if num_workers == 0:
            return kind(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=0)
        return kind(CarryUserErrors(dataset), batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                    collate_fn=collate_carrying)

    def val_data_loader(self, context: Context, num_workers: int | None = None) -> DataLoader:
        """MONAI Label's validation loader, with ``train.num_workers`` worker processes."""
        workers = self.cfg.train.num_workers if num_workers is None else num_workers
        return super().val_data_loader(context, workers)

    def train_data_loader(self, context: Context, num_workers: int | None = None,
                          shuffle: bool = True) -> MultiSourceLoader:
        """One shuffling loader per source present (dense, sparse, unlabelled), stepped together, each with
        ``num_workers`` (default ``train.num_workers``) worker processes; the unlabelled cases load in this process
        under self-training rounds (the rounds' pseudo-labels, made here, must reach the next batch)."""
        workers = self.cfg.train.num_workers if num_workers is None else num_workers
        loaders, caps = {}, {}
        labeled_sources = [k for k in (DENSE, SPARSE) if any(d["label_kind"] == k for d in context.train_datalist)]
        ranks = context.world_size if context.multi_gpu else 1  # processes registering side by side here
        for source in SOURCES:
            items = [d for d in context.train_datalist if d["label_kind"] == source]
            if not items:
                continue
            if context.multi_gpu and len(items) >= context.world_size:
                items = partition_dataset(items, num_partitions=context.world_size, even_divisible=True,
                                          shuffle=False)[context.local_rank]
            store: dict[str, torch.Tensor] | None = None  # labels made before training (atlas, stroke transfer)
            if source == UNLABELED:
                cons = self.cfg.train.consistency
                dense = self.hybrid and DENSE in labeled_sources  # pseudo-labels need dense labels
                start_from = self.finetuning(context)
                finetune = start_from is not None
                atlas = cons.atlas_runs(dense, finetune)
                if dense and cons.atlas_pseudo and not atlas:
                    logger.info(f"atlas pseudo-labels off: fine-tuning {start_from}, which segments better than "
                                "one atlas registers (train.consistency.atlas_on_finetune)")
                if atlas or (dense and cons.refine_pseudo):  # else no store: no label for the unlabelled loader
                    store = {}
                    if atlas:
                        atlas_labels(self.cfg, items, [d for d in context.train_datalist if d["label_kind"] == DENSE],
                                     store, os.path.join(self._model_dir, "registrations"), ranks)
                    if cons.refine_pseudo:
                        self._pseudo_rounds = PseudoLabelRounds(self.cfg, items, store)
                transforms = preprocessing(self.cfg, "unlabeled", pseudo_labels=store)
                batch = cons.unlabeled_per_step(dense, finetune)
                most = self.cfg.train.consistency.max_unlabeled_per_epoch
                caps[source] = math.ceil(most / batch)
                walked = len(items) > most  # read in turn over the epochs: caching the pool would only cost memory
            else:
                cons = self.cfg.train.consistency
                if source == SPARSE and cons.atlas_sparse:  # any network: the labels, not the losses
                    start_from = self.finetuning(context)
                    if start_from is not None and not cons.atlas_on_finetune:
                        logger.info(f"stroke transfer off: fine-tuning {start_from} "
                                    "(train.consistency.atlas_on_finetune)")
                    else:
                        store = {}
                        stroke_transfer(self.cfg, items, store, os.path.join(self._model_dir, "registrations"),
                                        ranks)
                transforms = self.train_pre_transforms(context, labels=store)
                batch = max(1, int(context.train_batch_size) // max(1, len(labeled_sources)))
                walked = False
            dataset = CacheDataset(items, transforms, progress=False) \
                if context.dataset_type == "CacheDataset" and not walked else Dataset(items, transforms)
            rounds = source == UNLABELED and self._pseudo_rounds is not None
            loaders[source] = self._dataloader(context, dataset, batch, 0 if rounds else workers, shuffle=shuffle)
            logger.info(f"{context.local_rank} - {source}: {len(items)} cases, batch {batch}")
        return MultiSourceLoader(loaders, caps)

    def _create_trainer(self, context: Context) -> SupervisedTrainer:
        """MONAI Label's trainer set-up, with the multi-source loader and its epoch length."""
        handlers: list[Any] = self.train_handlers(context)
        if context.local_rank == 0:
            handlers.append(CheckpointSaver(
                save_dir=context.output_dir, save_dict={self._model_dict_key: context.network},
                save_interval=self._train_save_interval, save_final=True, final_filename=self._final_filename,
                save_key_metric=True, n_saved=self._n_saved, key_metric_filename=f"train_{self._key_metric_filename}"))
            if context.evaluator is None:  # no held-out labels: publish the latest model, not the best training Dice
                handlers.append(LatestModel(context.network, os.path.join(context.output_dir,
                                                                           self._key_metric_filename)))
        self._load_checkpoint(context, handlers)
        self._pseudo_rounds = None
        loader = self.train_data_loader(context)
        trainer = SupervisedTrainer(
            device=context.device, max_epochs=context.max_epochs, train_data_loader=loader,
            epoch_length=len(loader), network=context.network, optimizer=context.optimizer,
            loss_function=self.loss_function(context), inferer=self.train_inferer(context), amp=self._amp,
            postprocessing=self._validate_transforms(self.train_post_transforms(context), "Training", "post"),
            key_train_metric=self.train_key_metric(context),
            additional_metrics=self.train_additional_metrics(context), train_handlers=handlers,
            iteration_update=self.train_iteration_update(context), event_names=self.event_names(context))
        if self._pseudo_rounds is not None:
            trainer.add_event_handler(Events.ITERATION_COMPLETED, self._pseudo_rounds)
        if self.cfg.train.lr_schedule == "poly":  # nnU-Net's decay over the run's steps, every step
            steps = max(1, int(context.max_epochs) * len(loader))
            poly = torch.optim.lr_scheduler.PolynomialLR(context.optimizer, total_iters=steps, power=0.9)
            LrScheduleHandler(poly, print_lr=False, epoch_level=False).attach(trainer)  # type: ignore[arg-type]
        # after the starting weights load (their record, if any, is the voxel size they were trained at before)
        voxel_mm = training_voxel_mm(self.cfg, [d for d in context.datalist if d.get("image")])

        def record(_: Any) -> None:
            record_voxel_mm(context.network, voxel_mm)
            record_preset(context.network, self.cfg)

        trainer.add_event_handler(Events.STARTED, record)
        return trainer

    def _device(self, context: Context) -> torch.device:
        if context.multi_gpu and not on_cuda(context.request):
            return torch.device("cpu")  # data-parallel processes on CPU (gloo)
        return super()._device(context)

    def _create_network_and_optimizer(self, context: Context) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        if not (context.multi_gpu and context.device.type == "cpu"):
            return super()._create_network_and_optimizer(context)
        network = self.network(context)
        context.network = network
        optimizer = self.optimizer(context)
        return torch.nn.parallel.DistributedDataParallel(network, find_unused_parameters=True), optimizer

    def train_pre_transforms(self, context: Context, labels: dict[str, torch.Tensor] | None = None) -> Compose:
        # the grown scribbles persist across epochs (Dataset reads every case anew) and across training runs;
        # ``labels``: labels that replace the saved ones of the cases they hold (stroke transfer)
        return preprocessing(self.cfg, "train", cache_dir=os.path.join(self._model_dir, "propagated"),
                             pseudo_labels=labels)

    def train_post_transforms(self, context: Context) -> list[MapTransform]:
        return [PartialOneHotd(self.cfg.labels.num_classes)]

    def val_pre_transforms(self, context: Context) -> Compose:
        return preprocessing(self.cfg, "val")

    def val_post_transforms(self, context: Context) -> list[MapTransform]:
        return [PartialOneHotd(self.cfg.labels.num_classes)]

    def val_inferer(self, context: Context) -> NetworkInferer:
        return NetworkInferer(self.cfg.infer, fused_only=True)

    def train_handlers(self, context: Context) -> list[Any]:
        handlers = super().train_handlers(context)
        return quiet_on_interrupt([h for h in handlers if not isinstance(h, TensorBoardStatsHandler)])

    def val_handlers(self, context: Context) -> list[Any] | None:
        handlers = super().val_handlers(context)
        return None if handlers is None else quiet_on_interrupt(handlers)

    def run_config(self, request: dict[str, Any]) -> CrossModalConfig:
        """The preset as a run works with it: where its ``data.spacing`` is null and the run fine-tunes weights that
        record the voxel size they were trained at, with that size (``data.weights_spacing``): a case far from it is
        resampled to it, as inference does, and the run's weights record it again; else the preset (a ``data.spacing``
        far from the starting weights' record is said, as CT windows other than theirs are: the run trains at the
        preset's, held to those weights segmenting at theirs, :meth:`beside_config`)."""
        pretrained = check_train_request({"pretrained": request.get("pretrained", True)})["pretrained"]
        start = self.in_service() if pretrained else None
        trained = weights_voxel_mm(start)
        windows = other_windows(self.cfg, weights_windows(start))
        if windows:
            preset = {m.name: m.window for m in self.cfg.modalities}
            logger.info(f"fine-tuning {start}, trained at CT window{'s' * (len(windows) > 1)} "
                        + ", ".join(f"{n} {w[0]:g}..{w[1]:g}" for n, w in windows.items())
                        + ", at the preset's " + ", ".join(f"{n} {preset[n][0]:g}..{preset[n][1]:g}" for n in windows)
                        + f": its model will record those, and it is held to {start} segmenting at its own")
        if trained and self.cfg.data.spacing:
            if far_apart(self.cfg.data.spacing, trained):
                logger.info(f"fine-tuning {start}, trained at {format_mm(trained)} mm, at the preset's data.spacing "
                            f"{format_mm(self.cfg.data.spacing)} mm: its model will record that size, and it is "
                            f"held to {start} segmenting at its own")
            return self.cfg
        if not trained:
            return self.cfg
        logger.info(f"data.spacing is not set and {start} was trained at {format_mm(trained)} mm: "
                    f"a training case of voxels more than {SPACING_TOLERANCE:g} times off it on an axis is "
                    "resampled to it")
        return dataclasses.replace(self.cfg, data=dataclasses.replace(self.cfg.data, weights_spacing=trained))

    def pre_process(self, request: dict[str, Any], datastore: Datastore) -> list[dict[str, Any]]:
        """Every case with a final label (image, label, its kind), plus the unlabelled cases when they take part, but
        those the request's ``held_out`` names (case ids: an offline run's test cases, truth and no final label, which
        its evaluation scores after training: not trained on, not even through the consistency terms)."""
        items = []
        for d in datastore.datalist():
            image_id = case_id_of(d["image"])  # series UIDs hold dots: strip only the image extension
            kind = datastore.label_kind(image_id) if hasattr(datastore, "label_kind") else DENSE
            items.append({"image": d["image"], "label": d["label"], "label_kind": kind})
        if not items:
            raise ValueError("no case has a final label yet: save at least one label before training")
        use = bool(request.get("use_unlabeled", self.cfg.train.consistency.unlabeled))  # check_train_request read it
        if self.hybrid and use:
            given = request.get("held_out") or ()
            held = {given} if isinstance(given, str) else set(given)  # one case id, or a list of them
            pool = datastore.get_unlabeled_images()
            for image_id in pool:
                if image_id not in held:
                    items.append({"image": datastore.get_image_uri(image_id), "label_kind": UNLABELED})
            if left := held.intersection(pool):
                logger.info(f"unlabelled cases: {len(pool) - len(left)} of {len(pool)}; the {len(left)} held-out test "
                            f"case{'s' * (len(left) > 1)} ({', '.join(sorted(left)[:5])}{', ...' * (len(left) > 5)}) "
                            "left out of training")
        check_modalities(self.cfg, items)
        check_spacings(self.cfg, items)
        return items

    def partition_datalist(self, context: Context, shuffle: bool = False) -> tuple[list, list]:
        """Hold out ``val_split`` of the dense cases (sparse ones when none is dense); one case: no validation."""
        everything = list(context.datalist)
        items = [d for d in everything if d["label_kind"] != UNLABELED]
        unlabeled = [d for d in everything if d["label_kind"] == UNLABELED]
        split = float(context.request.get("val_split", self.cfg.train.val_fraction))
        if len(items) < 2 or split <= 0:
            return everything, []
        dense = [d for d in items if d["label_kind"] == DENSE]
        pool = dense if len(dense) >= 2 else [d for d in items if d["label_kind"] != DENSE] or items
        random.Random(self.cfg.train.seed).shuffle(pool := list(pool))
        n_val = max(1, round(split * len(pool))) if len(pool) >= 2 else 0
        val = pool[:n_val]
        train = [d for d in items if d not in val]
        return train + unlabeled, val

    def beside_config(self, path: str) -> CrossModalConfig:
        """The run's preset as the model at ``path`` (the one it fine-tunes, or the one in service beside a run from
        scratch) reads cases in service (:func:`~crossmodal.config.served_config`, as the infer task's
        ``working_config``); the run's own where that is how it reads them."""
        return served_config(self.cfg, weights_voxel_mm(path), weights_windows(path))

    def _beside_loader(self, context: Context, items: list[dict[str, Any]], path: str, loader: Any) -> Any:
        """``loader`` (the run's, over ``items``) where the model at ``path`` reads cases as the run does; else one
        over ``items`` read at its :meth:`beside_config` (a run from scratch under a null ``data.spacing`` works on
        its cases' own grids, a fine-tuning at its preset's ``data.spacing``: there a model trained at another
        voxel size scores low, a bar the run beat without being better)."""
        cfg = self.beside_config(path)
        if cfg is self.cfg:
            return loader
        return self._dataloader(context, Dataset(items, self._validate_transforms(
            preprocessing(cfg, "val"), "Validation", "pre")), 1, 0, shuffle=False)

    def _loaded_beside(self, context: Context, path: str) -> torch.nn.Module:
        """A fresh network on the run's device holding the weights of ``path`` (the model in service, the bar that a
        run from scratch is held to)."""
        network = self.network(context).to(context.device)
        ckpt = torch.load(path, map_location=context.device, weights_only=True)
        network.load_state_dict(ckpt.get(self._model_dict_key, ckpt))
        return network

    def _bare_evaluator(self, context: Context, loader: Any, network: torch.nn.Module) -> SupervisedEvaluator:
        """An evaluator with the validation's inferer, post transforms and key metric and no handlers (nothing
        saved, nothing published) but :class:`SparedGenerators`: scores ``network`` on ``loader``'s cases when run."""
        bare = SupervisedEvaluator(
            device=context.device, val_data_loader=loader, network=network,
            inferer=self.val_inferer(context), prepare_batch=prepare_with_present,
            postprocessing=self._validate_transforms(self.val_post_transforms(context), "Validation", "post"),
            key_val_metric=self.val_key_metric(context))
        SparedGenerators().attach(bare)
        return bare

    def _starting_score(self, context: Context) -> StartingScore | None:
        """A :class:`StartingScore` when a model is in service (the one this run fine-tunes, or beside a run from
        scratch), labels are held out and the request's ``publish`` is ``if_better`` (the default); attached to the
        trainer on every process."""
        start_from = self.finetuning(context)
        against = start_from or self.in_service()
        if context.evaluator is None or against is None or context.request.get("publish") == "best_of_run":
            return None
        # a run from scratch: the model in service, loaded beside it, sets the bar; either scores the held-out cases
        # as it reads them in service
        network = context.network if start_from is not None else self._loaded_beside(context, against)
        bare = self._bare_evaluator(context, self._beside_loader(context, context.val_datalist, against,
                                                                 context.evaluator.data_loader), network)
        start = StartingScore(bare, context.evaluator.state.key_metric_name, against, scratch=start_from is None)
        start.attach(context.trainer)
        return start

    def _training_fit(self, context: Context) -> TrainingFit | None:
        """A :class:`TrainingFit` when the run fine-tunes a model, or trains from scratch beside one in service,
        with no label held out (and the request's ``publish`` is ``if_better``, the default); attached to the
        trainer on every process, each of which scores every labelled case of the run (the metric is reduced across
        them)."""
        start_from = self.finetuning(context)
        against = start_from or self.in_service()
        labelled = [d for d in context.train_datalist if d["label_kind"] in (DENSE, SPARSE)]
        if context.evaluator is not None or against is None or not labelled or \
                context.request.get("publish") == "best_of_run":
            return None
        loader = self._dataloader(context, Dataset(labelled, self._validate_transforms(
            self.val_pre_transforms(context), "Validation", "pre")), 1, 0, shuffle=False)
        bare = self._bare_evaluator(context, loader, context.network)
        # a run from scratch: the model in service, loaded beside it, sets the bar; either scores the cases as it
        # reads them in service
        start_loader = self._beside_loader(context, labelled, against, loader)
        start = bare if start_from is not None and start_loader is loader else self._bare_evaluator(
            context, start_loader, context.network if start_from is not None else self._loaded_beside(context, against))
        fit = TrainingFit(bare, next(iter(self.val_key_metric(context))), against, len(labelled),
                          self.cfg.train.fit_tolerance, start_evaluator=start, scratch=start_from is None)
        fit.attach(context.trainer)
        return fit

    def _report_kept(self, context: Context, start: StartingScore) -> None:
        best = context.evaluator.state.best_metric
        if start.score is not None and not start.beaten_by(best):
            what = "the model in service" if start.scratch else "the starting model"
            logger.info(f"no epoch beat {what} (held-out {start.key} {start.score:.4f}, this run's best "
                        f"{best:.4f} at epoch {context.evaluator.state.best_metric_epoch}): the model in service "
                        "stays")

    def finalize(self, context: Context) -> None:
        if context.evaluator is not None:  # MONAI Label builds it with the default, which drops ``present``
            context.evaluator.prepare_batch = prepare_with_present
            SparedGenerators().attach(context.evaluator)
        self._start = start = self._starting_score(context)
        self._fit = fit = self._training_fit(context)
        if context.local_rank == 0:
            save_config(self.cfg, os.path.join(context.output_dir, "config.yaml"))
            publisher = AtomicPublish(self._stats_path, self._publish_path, self._key_metric_filename,
                                      context.start_ts, context.run_id, context.output_dir, context.trainer,
                                      context.evaluator, start=start, fit=fit)
            engine = context.evaluator or context.trainer
            engine.add_event_handler(Events.EPOCH_COMPLETED, publisher)
            if fit is not None:  # after the fit's own COMPLETED handler: the last model, now that it passed
                context.trainer.add_event_handler(Events.COMPLETED, publisher)
            LearningCurve(context.output_dir, context.evaluator, start).attach(context.trainer)
            if start is not None:
                context.trainer.add_event_handler(Events.COMPLETED, lambda _: self._report_kept(context, start))
            context.trainer.add_event_handler(  # after the publisher's last write
                Events.COMPLETED, lambda t: mark_ended(context.output_dir, "completed" if t.state.epoch >= (
                    t.state.max_epochs or 0) else "early_stopped", self._stats_path))
        self._early_stopping(context)
        if context.multi_gpu:
            # every process leaves training together (rank 0 publishes last), so MONAI Label's
            # destroy_process_group() never tears gloo down under a peer still running
            context.trainer.add_event_handler(Events.COMPLETED, lambda _: torch.distributed.barrier())

    def _early_stopping(self, context: Context) -> None:
        """The train request's ``early_stop_patience`` (validations without a better held-out score before the run
        stops; -1 / 0: off), as MONAI Label's ``finalize`` has it: this task's own ``finalize`` replaced that one, and
        the option the viewers show did nothing until 2026-12-03."""
        patience = int(context.request.get("early_stop_patience") or -1)
        if patience < 1:
            return
        if context.evaluator is None:
            if context.local_rank == 0:
                logger.info(f"early_stop_patience {patience}: no label is held out, so no validation to stop on: the "
                            "run trains its max_epochs")
            return
        key = next(iter(self.val_key_metric(context)))
        stopper = EarlyStopping(patience=patience, score_function=stopping_fn_from_metric(key),
                                trainer=context.trainer)
        context.evaluator.add_event_handler(Events.EPOCH_COMPLETED, stopper)

    def train(self, rank: int, world_size: int, request: dict[str, Any], datalist: Any) -> dict[str, Any]:
        """MONAI Label's run, then (data-parallel) the run's engines and DistributedDataParallel wrapper freed here,
        after ``destroy_process_group``: left to interpreter exit, gloo's threads were torn down mid-shutdown and
        one process in ~8 aborted (SIGABRT, "terminate called without an active exception").

        A data-parallel process's user error (a case that does not read, ...) is also pickled to the request's
        ``user_error_file``: ``torch.multiprocessing.spawn`` hands the parent its traceback's text only.

        A data-parallel process computes on its share of the cores (``usable_cores() // world_size``, as torchrun
        sets ``OMP_NUM_THREADS``): each took all of them, so on the CPU two processes ran four threads on two cores
        and waited on each other at every all-reduce."""
        threads = process_threads(request, world_size)
        if threads is not None:
            torch.set_num_threads(threads)
            logger.info(f"{rank} - {torch.get_num_threads()} compute thread(s): {usable_cores()} usable core(s), "
                        f"{world_size} processes")
        seed_run(request_seed(request, self.cfg) + rank)  # before the run builds its network: nothing before counts
        try:
            stats = super().train(rank, world_size, request, datalist)
            if self._start is not None and self._start.score is not None:
                stats["start_metric"], stats["start_model"] = self._start.score, self._start.start_from
            if self._fit is not None:
                stats["start_model"] = self._fit.start_from
                if self._fit.end is not None:
                    stats["training_fit"] = self._fit.record()
            return json_safe(stats)  # a synchronous train request answers with it
        except Exception as e:
            if not request.get("user_error_file"):
                raise
            # a data-parallel process: its error (the user's, else its traceback's text) goes to the parent through
            # the run's folder, and the process ends by SystemExit, for which torch's spawn writes no traceback file
            # of its own (it removes none: one was left in the temp folder at each failed run until 2026-12-07)
            carry_error(e, request["user_error_file"])
            raise SystemExit(1) from e
        finally:
            if world_size > 1:
                gc.collect()  # the engines hold reference cycles: only the collector frees them

    def check_request(self, request: dict[str, Any]) -> dict[str, Any]:
        """The request as a run reads it (:func:`check_train_request`, tracking coerced), checked against this
        task's options and this machine (``processes``); ConfigError naming the option. The server asks it before
        MONAI Label queues the run's process, so a bad request is a 422 at once (it was answered 200 and failed in
        the background process)."""
        req = coerce_tracking(check_train_request(request, train_choices(self.cfg), self._config), self._model_dir)
        every, epochs = (int(self._config[k] if req.get(k) is None else req[k]) for k in ("val_interval", "max_epochs"))
        if every > epochs:  # MONAI's ValidationHandler would never run: no epoch validated, none published
            raise ConfigError(f"train request: val_interval={every} is more than max_epochs={epochs}: no epoch would "
                              "validate, so none would be published; lower val_interval or raise max_epochs")
        processes = int(req.get("processes") or 1)
        if processes > 1:
            cuda = on_cuda(req)  # a request for the CPU trains on it (gloo) on a GPU machine too
            if cuda and torch.cuda.device_count() < processes:
                raise ConfigError(f"train request: processes={processes} but only {torch.cuda.device_count()} GPU(s) "
                                  "are visible")
            if not cuda and processes > usable_cores():  # more spawned trainers than cores: memory runs out first
                raise ConfigError(f"train request: processes={processes} but this machine has {usable_cores()} "
                                  "usable CPU core(s): at most one process a core")
        return req

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        req = self.check_request(request)
        cfg, interval = self.cfg, int(self._val_interval)  # type: ignore[has-type]
        if req["missing_modality"] != cfg.infer.missing_modality:  # this run's policy (the infer task keeps its own)
            self.cfg = dataclasses.replace(cfg, infer=dataclasses.replace(cfg.infer,
                                                                          missing_modality=req["missing_modality"]))
        self.cfg = self.run_config(req)
        every = int(self._config["val_interval"] if req.get("val_interval") is None else req["val_interval"])
        self._val_interval = every  # MONAI Label's ValidationHandler reads the task's, not the request's
        claimed = None
        if not req.get("name"):  # a folder of its own, so that an earlier run's model can be put back in service
            req["name"] = claimed = claim_run_folder(self._model_dir)
        try:
            with restored_if_diverged(self._publish_path, self._stats_path):
                result = self._run(req, datastore)
            return {**result, "run": req["name"]} if isinstance(result, dict) else result  # its folder
        except Exception as e:
            mark_ended(Path(self._model_dir) / req["name"], "failed", self._stats_path)  # not "killed": it said why
            found = user_error_in(e)
            hint = diverged_run_hint(self._model_dir, req["name"]) if isinstance(found, TrainingDiverged) else ""
            if hint:
                text = str(found)
                raise TrainingDiverged(f"{text}{'' if text.endswith('.') else '.'}{hint}") from e
            raise
        finally:
            self.cfg, self._val_interval = cfg, interval
            folder = Path(self._model_dir) / req["name"]
            try:  # housekeeping: never the run's outcome
                if claimed and folder.is_dir() and not any(folder.iterdir()):  # refused before it began: no trace
                    folder.rmdir()
                if cfg.train.keep_runs:
                    prune_runs(self._model_dir, cfg.train.keep_runs, keep=req["name"])
            except OSError as e:
                logger.warning(f"run folders under {self._model_dir} not tidied: {e}")

    def _run(self, req: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        processes = int(req.get("processes") or 1)
        if processes > 1:  # MONAI Label's multi-GPU path, also on CPU: N processes, gloo (CPU) or NCCL
            cuda = on_cuda(req)  # (:meth:`check_request` checked the devices / cores)
            # the run's own temp folder: the processes' rendezvous file (torch's FileStore creates it) and the error
            # a process carries to this one (:func:`carry_error`), removed with it
            run_tmp = Path(tempfile.mkdtemp(prefix="crossmodal-dist-"))
            init_file, carried = run_tmp / "rendezvous", run_tmp / "user-error"
            req.update({"multi_gpu": True, "gpus": ",".join(str(i) for i in range(processes)),
                        "distributed_backend": "nccl" if cuda else "gloo", "distributed_url": f"file://{init_file}",
                        "user_error_file": str(carried)})
            try:
                return super().__call__(req, datastore)
            except Exception as e:  # spawn's ProcessExitedException (a process killed, or ended by its error)
                if carried.is_file():  # the case and file it names, for the CLI's message and the server's 4xx
                    raise pickle.loads(carried.read_bytes()) from e
                raise
            finally:
                shutil.rmtree(run_tmp, ignore_errors=True)
        return super().__call__(req, datastore)
