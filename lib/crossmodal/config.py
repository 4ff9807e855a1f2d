"""Typed configuration: one schema of dataclasses loaded from ``configs/*.yaml``.

A preset file may name another preset with ``extends: <name>``; it is looked up beside the file and merged
first (dicts merge recursively, everything else is replaced). The resolved config is saved next to every
trained model (``to_dict`` / ``save_config``).

Example:
    >>> cfg = CrossModalConfig.from_dict({"modalities": [{"name": "ct", "kind": "ct"}],
    ...                                   "labels": {"classes": {"background": 0, "liver": 1}}})
    >>> cfg.modality_names, cfg.labels.num_classes
    (['ct'], 2)
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MODALITY_KINDS = ("ct", "mr", "pet")
DICOM_MODALITY = {"ct": "CT", "mr": "MR", "pet": "PT"}
MISSING_POLICIES = ("error", "zero_fill")
# the image and label files read and written (.mha: ITK's one-file MetaImage, as grand-challenge.org ships)
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".mha")
# Names 3D Slicer drops on save: none of our label names may use them.
SLICER_RESERVED_NAMES = ("background", "foreground_scribbles", "background_scribbles")


class ConfigError(ValueError):
    """A config value is missing or invalid; the message names the key and the value."""


def as_number(value: Any, kind: type = int) -> int | float | None:
    """``value`` (a number or its text, as server ``--conf`` and request JSON send it) as ``kind``; None when it
    is not one (a bool, NaN or infinity, 2.5 for an int). Callers check the range and name the key.

    Example:
        >>> [as_number(v) for v in ("3", 3, 3.0, 2.5, True, "abc")], as_number("1e-3", float)
        ([3, 3, 3, None, None, None], 0.001)
    """
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number) or (kind is int and not number.is_integer()):
        return None
    return int(number) if kind is int else number


def near_miss(keys: Iterable[str], options: Iterable[str], cutoff: float = 0.8) -> tuple[str, str] | None:
    """The first of ``keys`` (sorted) that is not one of ``options`` but nearly is (a typo: ``difflib``'s ratio at
    least ``cutoff``), with that option; None when there is none. Keys far from every option (the ones a framework
    adds) pass.

    Example:
        >>> near_miss(["client_id", "max_epoch"], ["max_epochs", "seed"]), near_miss(["model", "seed"], ["seed"])
        (('max_epoch', 'max_epochs'), None)
    """
    options = sorted(options)
    for key in sorted(set(keys) - set(options)):
        near = difflib.get_close_matches(key, options, n=1, cutoff=cutoff)
        if near:
            return key, near[0]
    return None


def as_flag(value: Any) -> bool | None:
    """``value`` (a bool or its text: true / false, 1 / 0, yes / no, any case, as forms, URLs and ``--conf`` send
    it) as a bool; None when it is neither (a bare ``bool("false")`` is True). Callers name the key.

    Example:
        >>> [as_flag(v) for v in (True, "false", " Yes", "0", 1, "maybe", None)]
        [True, False, True, False, True, None, None]
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower() if isinstance(value, str) else None
    return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text or "")


def as_device(value: Any, names: Mapping[str, str] | None = None) -> str | None:
    """A request's ``device`` (``cpu``, ``cuda``, ``cuda:<index>``, or a key of ``names``: its device; a list: its
    first item, as MONAI Label reads it) or None when absent; ConfigError otherwise.

    Example:
        >>> [as_device(v) for v in (None, "cpu", ["cuda:1", "cpu"], "CPU", " Cuda:0 ")]
        [None, 'cpu', 'cuda:1', 'cpu', 'cuda:0']
        >>> as_device("NVIDIA H200", {"NVIDIA H200": "cuda"})  # a GPU as MONAI Label's /info names it
        'cuda'
        >>> as_device("tpu", {"NVIDIA H200": "cuda"})
        Traceback (most recent call last):
        ...
        crossmodal.config.ConfigError: device 'tpu' must be cpu, cuda, cuda:<index> or one of ['NVIDIA H200']
    """
    device = value[0] if isinstance(value, list) and value else value
    names = names or {}
    if isinstance(device, str) and device in names:
        device = names[device]
    elif isinstance(device, str) and re.fullmatch(r"cpu|cuda(:\d+)?", device.strip().lower()):
        device = device.strip().lower()  # as typed in a request: "CPU", "Cuda:0"
    if device is not None and not (isinstance(device, str) and re.fullmatch(r"cpu|cuda(:\d+)?", device)):
        known = f", cuda:<index> or one of {sorted(names)}" if names else " or cuda:<index>"
        raise ConfigError(f"device {device!r} must be cpu, cuda{known}")
    return device


@dataclass
class ModalityConfig:
    """One imaging modality. ``kind`` picks the normalisation: CT windowing, MR/PET z-score."""

    name: str
    kind: str = "mr"
    window: tuple[float, float] = (-1000.0, 1000.0)
    # On a PACS (DICOMweb studies): the series of a study holding this modality has this DICOM Modality
    # (default by kind: CT, PT, MR) and a SeriesDescription matching this case-insensitive regex (default: any).
    dicom_modality: str = ""
    series_description: str = ""

    def __post_init__(self) -> None:
        try:
            re.compile(self.series_description)
        except re.error as e:
            raise ConfigError(f"modalities.{self.name}.series_description: {self.series_description!r} "
                              f"is not a regular expression: {e}") from e
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"modalities: name {self.name!r} must be letters, digits, '_' or '-'")
        if self.kind not in MODALITY_KINDS:
            raise ConfigError(f"modalities.{self.name}.kind: {self.kind!r} is not one of {MODALITY_KINDS}")
        self.window = (float(self.window[0]), float(self.window[1]))
        if self.window[0] >= self.window[1]:
            raise ConfigError(f"modalities.{self.name}.window: {self.window} must be (low, high) with low < high")
        self.dicom_modality = (self.dicom_modality or DICOM_MODALITY[self.kind]).upper()


@dataclass
class LabelConfig:
    """Label names and values.

    ``classes`` maps every class the model predicts to its value, background 0 included, values 0..N-1.
    ``marked_background`` is the value of the segment an annotator paints to mark background explicitly in a
    sparse label (see ``crossmodal.labels``). ``empty_final``: a final label with no voxel drawn is taken as a dense
    "none of the classes here" label (true for a preset where a case may lack every class, e.g. lesions only); false
    (the presets: every case has an organ, or brain tissue) refuses it as a save before drawing, unless the request
    says ``allow_empty``.
    """

    classes: dict[str, int] = field(default_factory=lambda: {"background": 0, "foreground": 1})
    marked_background_name: str = "marked_background"
    marked_background: int = 255
    empty_final: bool = False

    def __post_init__(self) -> None:
        values = sorted(self.classes.values())
        if values != list(range(len(values))) or len(values) < 2:
            raise ConfigError(f"labels.classes: values {values} must be 0..N-1 with N >= 2 (background is 0)")
        if self.marked_background in values or not 0 < self.marked_background < 65536:
            raise ConfigError(
                f"labels.marked_background: {self.marked_background} must be a free label value in 1..65535"
            )
        if self.marked_background_name in SLICER_RESERVED_NAMES:
            raise ConfigError(
                f"labels.marked_background_name: {self.marked_background_name!r} is dropped by 3D Slicer on "
                f"save; pick another name"
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def foreground(self) -> dict[str, int]:
        return {k: v for k, v in self.classes.items() if v != 0}

    @property
    def viewer_labels(self) -> dict[str, int]:
        """Label names the viewers offer: the foreground classes plus the marked-background segment."""
        return {**self.foreground, self.marked_background_name: self.marked_background}


@dataclass
class ModelConfig:
    """Network choice and size. ``name`` is a key of ``crossmodal.nets.NETWORKS``.

    ``inputs``: the modalities the network sees (empty: all; e.g. ``[t1]`` for a single-modality model).
    ``encoder_channels``, ``independent_fraction``, ``modality_dropout``, ``joint_stem`` and ``head_levels`` (the
    encoder levels a per-modality head reads) are read by ``crossmodal`` only (empty ``encoder_channels``: half of
    ``channels``); ``num_res_units`` by ``baseline_unet`` only.
    """

    name: str = "baseline_unet"
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 1
    dropout: float = 0.1
    encoder_channels: tuple[int, ...] = ()
    independent_fraction: float = 0.5
    modality_dropout: float = 0.0
    joint_stem: bool = False
    head_levels: int = 1
    inputs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.inputs = tuple(str(n) for n in self.inputs)
        self.channels = tuple(int(c) for c in self.channels)
        self.strides = tuple(int(s) for s in self.strides)
        self.encoder_channels = tuple(int(c) for c in self.encoder_channels)
        if self.encoder_channels and len(self.encoder_channels) != len(self.channels):
            raise ConfigError(f"model.encoder_channels: {self.encoder_channels} needs {len(self.channels)} entries")
        if not 0.0 < self.independent_fraction < 1.0:
            raise ConfigError(f"model.independent_fraction: {self.independent_fraction} must be in (0, 1)")
        if not 0.0 <= self.modality_dropout < 1.0:
            raise ConfigError(f"model.modality_dropout: {self.modality_dropout} must be in [0, 1)")
        if len(self.strides) != len(self.channels) - 1:
            raise ConfigError(f"model.strides: {self.strides} needs len(channels) - 1 = {len(self.channels) - 1}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: {self.dropout} must be in [0, 1)")


def parse_mirror_axes(value: object, what: str = "mirror_axes") -> tuple[int, ...]:
    """Spatial axes to mirror along, from a list, a comma-separated string (``"0,1,2"``, ``""`` or ``"none"``: no
    mirroring) or None; each in 0..2, each once, sorted.

    Example:
        >>> parse_mirror_axes("2, 0"), parse_mirror_axes("none"), parse_mirror_axes([1])
        ((0, 2), (), (1,))
    """
    if value is None:
        return ()
    try:
        items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)  # type: ignore[call-overload]
        items = [v for v in items if v not in ("", "none")]
        axes = [int(v) for v in items]
        if any(isinstance(v, bool) for v in items) or any(float(v) != a for v, a in zip(items, axes, strict=True)):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: {value!r} is not a list of spatial axes (0, 1, 2)") from None
    if any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
        raise ConfigError(f"{what}: {value!r} must name spatial axes 0, 1 or 2, each once")
    return tuple(sorted(axes))


MAX_SW_BATCH = 64  # windows one sliding-window step may run at once


def parse_overlap(value: object, what: str = "overlap") -> float:
    """The sliding window's overlap of neighbouring windows, a fraction in [0, 1), from a number or its text
    (MONAI's ``SlidingWindowInferer`` refuses 1 and above only when it runs, after the case is read).

    Example:
        >>> parse_overlap("0.5"), parse_overlap(0)
        (0.5, 0.0)
    """
    number = as_number(value, float)
    if number is None or not 0 <= number < 1:
        raise ConfigError(f"{what}: {value!r} must be a number from 0 up to, not including, 1 (the fraction of a "
                          "window its neighbours overlap; more overlap, more windows: slower, smoother)")
    return float(number)


def parse_sw_batch_size(value: object, what: str = "sw_batch_size") -> int:
    """Windows the sliding window runs in one forward pass, an integer from 1 to ``MAX_SW_BATCH``.

    Example:
        >>> parse_sw_batch_size("4")
        4
    """
    number = as_number(value, int)
    if number is None or not 1 <= number <= MAX_SW_BATCH:
        raise ConfigError(f"{what}: {value!r} must be an integer from 1 to {MAX_SW_BATCH} (windows per forward pass; "
                          "more use more memory)")
    return int(number)


FOREGROUND = "foreground"  # infer.largest_component: every foreground class as one


def parse_largest_component(value: object, foreground: Iterable[str], what: str = "largest_component"
                            ) -> tuple[str, ...]:
    """``infer.largest_component`` / a server's or a request's ``largest_component``: a list or
    ``"grey_matter,white_matter"`` (``"none"`` or empty: none) -> class names; :class:`ConfigError` naming ``what``
    and the choices for a name that is no foreground class (or ``foreground``).

    Example:
        >>> parse_largest_component("white_matter, foreground", ["grey_matter", "white_matter"])
        ('white_matter', 'foreground')
    """
    if isinstance(value, str):
        raw = value.split(",")
    elif isinstance(value, list | tuple):
        raw = [str(n) for n in value]
    else:
        raise ConfigError(f"{what}: {value!r} must be class names, e.g. 'grey_matter,white_matter', or none")
    names = [n.strip() for n in raw if n.strip() and n.strip() != "none"]
    choices = [FOREGROUND, *foreground]
    unknown = [n for n in names if n not in choices]
    if unknown:
        raise ConfigError(f"{what}: {unknown} must be among {choices} (or none)")
    return tuple(names)


@dataclass
class InferConfig:
    """Sliding-window inference, test-time mirroring and the policy for a case whose secondary modality file is
    absent.

    ``mirror_axes``: spatial axes (0-2 of the working grid) to mirror the input along at test time; the softmax of
    every combination (2^n passes, nnU-Net's mirroring) is averaged. Empty: one pass. ``missing_modality``:
    ``error`` (a case without a secondary modality's file is refused, naming it) or ``zero_fill`` (it is segmented
    with what it has; training reads it too, with that modality left out of its fusion, heads and consistency
    terms). ``overlap`` in [0, 1) and ``sw_batch_size`` (1-64 windows a forward pass): MONAI's sliding window, for a
    case larger than ``roi_size``; an infer request may set either. ``largest_component``: classes of the label map
    (foreground class names) each kept to its largest connected component, and ``foreground`` for all foreground
    classes as one (islands away from the largest connected foreground dropped); the rest becomes background.
    """

    roi_size: tuple[int, int, int] = (96, 96, 96)
    sw_batch_size: int = 1
    overlap: float = 0.25
    missing_modality: str = "error"
    mirror_axes: tuple[int, ...] = ()
    largest_component: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.roi_size = tuple(int(r) for r in self.roi_size)  # type: ignore[assignment]
        self.mirror_axes = parse_mirror_axes(self.mirror_axes, "infer.mirror_axes")
        self.sw_batch_size = parse_sw_batch_size(self.sw_batch_size, "infer.sw_batch_size")
        self.overlap = parse_overlap(self.overlap, "infer.overlap")
        if self.missing_modality not in MISSING_POLICIES:
            raise ConfigError(f"infer.missing_modality: {self.missing_modality!r} is not one of {MISSING_POLICIES}")


@dataclass
class ConsistencyConfig:
    """The label-free terms of the hybrid trainer (``crossmodal`` networks), each weight ramped up from 0 over
    ``rampup_iterations`` (sigmoid ramp).

    ``inter_weight``: per-modality heads vs fused output (``inter_mode`` ``dice`` or ``pseudo`` with a
    ``pseudo_threshold`` confidence mask); ``intra_weight``: prediction vs prediction of a flipped, intensity-
    jittered copy (the plain prediction is the target); ``channel_weight``: pooled modality-independent channels
    agree across modalities.
    ``unlabeled``: draw unlabeled cases (``unlabeled_batch_size`` per step) into these terms; an epoch draws at
    most ``max_unlabeled_per_epoch`` of them (a larger pool is walked in turn over the epochs, not cached in memory).
    ``modality_dropout``: probability that the augmented copy of the intra-modal term loses some modalities, so
    the fused output learns to do without them from the full prediction (missing-modality robustness, while
    every plain sample trains with all modalities).
    ``copy_paste``: after ``copy_paste_start`` steps, each step's dense cases and unlabelled cases swap a random
    cuboid (bidirectional copy-paste, BCP), supervised by the truth and by the pseudo-labels (``pseudo_threshold``)
    of an EMA teacher (``teacher_decay``); needs dense labels and unlabelled cases in the same run.
    ``refine_pseudo``: self-training rounds: from step ``refine_start`` on, every ``refine_interval`` steps, the
    teacher segments every unlabelled case whole and the random walker re-decides a band of ``refine_erode`` voxels
    around each predicted boundary along the images' edges (:func:`crossmodal.propagate.refine_segmentation`,
    with ``train.propagate``'s walker settings); these pseudo-labels supervise the unlabelled cases and replace the
    teacher's labels in their copy-paste mixes. A round takes at most ``refine_max_cases`` cases, the next ones of
    the pool in turn, so its cost stays bounded however many cases are unlabelled. Band voxels where the teacher's
    top probability reaches ``refine_keep_confident`` keep its class (1.0: the walker re-decides the whole band).
    ``atlas_pseudo``: before training, the dense cases (at most ``atlas_count`` of them) are registered onto each
    unlabelled case (at most ``atlas_max_cases`` of them, :func:`crossmodal.atlas.atlas_pseudo_label`) and their
    warped labels' majority vote (a class needs ``atlas_min_agreement`` of the votes) supervises that case, for
    pools that share an anatomy (tissue maps, organs), not for lesions. Only in runs from scratch unless
    ``atlas_on_finetune``: a published model that is fine-tuned already segments better than one atlas registers.
    ``atlas_sparse``: before training, the strokes of this many other sparse cases (the next ones in the datalist,
    :func:`crossmodal.atlas.transfer_strokes`) are registered onto each of the first ``atlas_max_cases`` sparse
    cases and added where nothing was drawn and they agree (0: off); only from scratch, as ``atlas_pseudo``; for
    any network (a step on the labels, as ``train.propagate``).
    ``atlas_workers``: registrations of the atlas and of stroke transfer that run at once, each on one thread
    (0: one per CPU core the process may use, 1/N of them in each of N data-parallel processes; cases side by
    side, and a case's atlases or other cases; a value set is per process). The train
    task keeps every warped label in ``<model_dir>/registrations`` (:class:`crossmodal.atlas.WarpCache`), so a later
    run from scratch registers only the pairs whose images or labels changed.
    ``pseudo_batch_size``: unlabelled cases a step (instead of ``unlabeled_batch_size``) in a run where they carry
    pseudo-labels (atlas or self-training rounds): there they supervise like dense labels, and one a step beside
    the dense batch under-weights them.
    """

    inter_weight: float = 0.3
    inter_mode: str = "dice"
    pseudo_threshold: float = 0.8
    intra_weight: float = 0.3
    channel_weight: float = 0.05
    rampup_iterations: int = 100
    unlabeled: bool = True
    unlabeled_batch_size: int = 1
    max_unlabeled_per_epoch: int = 32
    modality_dropout: float = 0.0
    copy_paste: bool = False
    teacher_decay: float = 0.99
    copy_paste_start: int = 50
    refine_pseudo: bool = False
    refine_start: int = 100
    refine_interval: int = 50
    refine_erode: int = 1
    refine_max_cases: int = 16
    refine_keep_confident: float = 0.9
    atlas_pseudo: bool = False
    atlas_count: int = 3
    atlas_min_agreement: float = 0.5
    atlas_max_cases: int = 64
    atlas_on_finetune: bool = False
    atlas_sparse: int = 0
    atlas_workers: int = 0
    pseudo_batch_size: int = 1

    def __post_init__(self) -> None:
        for k in ("atlas_count", "atlas_max_cases"):
            if int(getattr(self, k)) < 1:
                raise ConfigError(f"train.consistency.{k}: {getattr(self, k)} must be >= 1")
        if not 0.0 < self.atlas_min_agreement <= 1.0:
            raise ConfigError(f"train.consistency.atlas_min_agreement: {self.atlas_min_agreement} must be in (0, 1]")
        for k in ("refine_start", "refine_erode", "atlas_sparse", "atlas_workers"):
            if int(getattr(self, k)) < 0:
                raise ConfigError(f"train.consistency.{k}: {getattr(self, k)} must be >= 0")
        if not 0.0 < self.refine_keep_confident <= 1.0:
            raise ConfigError(f"train.consistency.refine_keep_confident: {self.refine_keep_confident} "
                              "must be in (0, 1]")
        for k in ("refine_interval", "refine_max_cases"):
            if int(getattr(self, k)) < 1:
                raise ConfigError(f"train.consistency.{k}: {getattr(self, k)} must be >= 1")
        if self.copy_paste_start < 0:
            raise ConfigError(f"train.consistency.copy_paste_start: {self.copy_paste_start} must be >= 0")
        if not 0.0 <= self.teacher_decay < 1.0:
            raise ConfigError(f"train.consistency.teacher_decay: {self.teacher_decay} must be in [0, 1)")
        if not 0.0 <= self.modality_dropout <= 1.0:
            raise ConfigError(f"train.consistency.modality_dropout: {self.modality_dropout} must be in [0, 1]")
        if self.inter_mode not in ("dice", "pseudo"):
            raise ConfigError(f"train.consistency.inter_mode: {self.inter_mode!r} is not one of ('dice', 'pseudo')")
        for k in ("inter_weight", "intra_weight", "channel_weight"):
            if float(getattr(self, k)) < 0:
                raise ConfigError(f"train.consistency.{k}: {getattr(self, k)} must be >= 0")
        for k in ("unlabeled_batch_size", "pseudo_batch_size", "max_unlabeled_per_epoch"):
            if int(getattr(self, k)) < 1:
                raise ConfigError(f"train.consistency.{k}: {getattr(self, k)} must be >= 1")

    @property
    def active(self) -> bool:
        return max(self.inter_weight, self.intra_weight, self.channel_weight) > 0

    def atlas_runs(self, dense: bool, finetune: bool) -> bool:
        """Whether a run with (``dense``) or without dense labels, fine-tuning a published model or not, makes
        atlas pseudo-labels."""
        return dense and self.atlas_pseudo and (self.atlas_on_finetune or not finetune)

    def unlabeled_per_step(self, dense: bool, finetune: bool) -> int:
        """Unlabelled cases a step in such a run: ``pseudo_batch_size`` where they get pseudo-labels (atlas or
        self-training rounds, both need dense labels), else ``unlabeled_batch_size``."""
        pseudo = self.atlas_runs(dense, finetune) or (dense and self.refine_pseudo)
        return self.pseudo_batch_size if pseudo else self.unlabeled_batch_size


@dataclass
class PropagationConfig:
    """Sparse labels grown before training (:mod:`crossmodal.propagate`).

    ``method``: ``random_walker`` (multi-channel, over all modalities) or ``none`` (train on the drawn voxels only,
    the nnU-Net ignore-label recipe); ``beta``: edge sensitivity; ``threshold``: class probability a voxel needs to
    be labelled (0.5: the class a walker most likely reaches first, whenever it has even odds or better; higher
    thresholds keep fewer, surer voxels, mostly of the background); ``max_voxels``: larger cases are propagated on a
    coarser grid; ``min_heldout_accuracy``: a case's label is grown only if growing every other stroke labels the
    strokes left out at least this right (0: no check; :func:`crossmodal.propagate.heldout_accuracy`).
    """

    method: str = "random_walker"
    beta: float = 130.0
    threshold: float = 0.5
    max_voxels: int = 2_000_000
    min_heldout_accuracy: float = 0.99

    def __post_init__(self) -> None:
        if self.method not in ("random_walker", "none"):
            raise ConfigError(f"train.propagate.method: {self.method!r} is not one of ('random_walker', 'none')")
        if self.beta <= 0:
            raise ConfigError(f"train.propagate.beta: {self.beta} must be > 0")
        if not 0.5 <= self.threshold <= 1.0:
            raise ConfigError(f"train.propagate.threshold: {self.threshold} must be in [0.5, 1]")
        if self.max_voxels < 1000:
            raise ConfigError(f"train.propagate.max_voxels: {self.max_voxels} must be >= 1000")
        if not 0.0 <= self.min_heldout_accuracy <= 1.0:
            raise ConfigError(f"train.propagate.min_heldout_accuracy: {self.min_heldout_accuracy} must be in [0, 1]")


LR_SCHEDULES = ("constant", "poly")


@dataclass
class TrainConfig:
    """Training hyper-parameters; the losses read their weights from here.

    ``learning_rate_by_model`` overrides ``learning_rate`` per network name (AdamW step sizes differ by network).
    ``finetune_lr_scale`` multiplies the learning rate of a run that fine-tunes a model (the published one or
    ``--pretrained``): a fresh AdamW at the from-scratch rate first unlearns part of what that model knows.
    ``lr_schedule``: ``constant``, or ``poly`` (nnU-Net's: the rate times (1 - step / the run's steps)^0.9, down to 0
    at the run's last step).
    ``fit_tolerance``: a fine-tuning with no label held out publishes its last model only if that segments the run's
    own labelled cases (partial Dice) no more than this worse than the model it started from (a run from scratch:
    than the model in service; else that model stays; :class:`crossmodal.serving.train.TrainingFit`).
    ``num_workers``: loader worker processes per source (dense, sparse, unlabelled) and for validation; 0 loads
    the cases in the training process. ``keep_runs``: the newest run folders (``train_NN``) a model folder keeps
    (each holds that run's model; the one in service is always kept; 0: keep all). ``recompute_above_megavoxels``:
    a step whose input patches hold more than this many million voxels (per modality) recomputes the network's
    blocks and the loss terms in its backward pass instead of keeping their activations (activation
    checkpointing: the same weights, less memory, about a third more time a step); 0: every step, -1: none.
    """

    def lr_for(self, model: str) -> float:
        return float(self.learning_rate_by_model.get(model, self.learning_rate))

    max_epochs: int = 50
    learning_rate: float = 1e-3
    learning_rate_by_model: dict[str, float] = field(default_factory=dict)
    finetune_lr_scale: float = 1.0
    lr_schedule: str = "constant"
    fit_tolerance: float = 0.05
    weight_decay: float = 1e-5
    batch_size: int = 2
    patch_size: tuple[int, int, int] = (64, 64, 64)
    patches_per_case: int = 4
    val_interval: int = 1
    val_fraction: float = 0.2
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    aux_weight: float = 0.5
    num_workers: int = 0
    seed: int = 0
    keep_runs: int = 10
    recompute_above_megavoxels: float = 5.0
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    propagate: PropagationConfig = field(default_factory=PropagationConfig)

    def __post_init__(self) -> None:
        if isinstance(self.consistency, dict):
            self.consistency = _build(ConsistencyConfig, self.consistency, "train.consistency")
        if isinstance(self.propagate, dict):
            self.propagate = _build(PropagationConfig, self.propagate, "train.propagate")
        self.patch_size = tuple(int(p) for p in self.patch_size)  # type: ignore[assignment]
        if min(self.max_epochs, self.batch_size, self.patches_per_case, self.val_interval) < 1:
            raise ConfigError("train: max_epochs, batch_size, patches_per_case and val_interval must be >= 1")
        if self.num_workers < 0:
            raise ConfigError(f"train.num_workers: {self.num_workers} must be >= 0 (0: cases load in the training "
                              "process)")
        self.recompute_above_megavoxels = float(self.recompute_above_megavoxels)
        if self.recompute_above_megavoxels < 0 and self.recompute_above_megavoxels != -1:
            raise ConfigError(f"train.recompute_above_megavoxels: {self.recompute_above_megavoxels:g} must be >= 0 "
                              "(0: every step recomputes) or -1 (none does)")
        if self.keep_runs < 0:
            raise ConfigError(f"train.keep_runs: {self.keep_runs} must be >= 0 (0: keep every run's folder)")
        if not 0.0 < self.finetune_lr_scale <= 1.0:
            raise ConfigError(f"train.finetune_lr_scale: {self.finetune_lr_scale} must be in (0, 1]")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"train.lr_schedule: {self.lr_schedule!r} must be one of {', '.join(LR_SCHEDULES)}")
        if not 0.0 <= self.fit_tolerance <= 1.0:
            raise ConfigError(f"train.fit_tolerance: {self.fit_tolerance} must be in [0, 1] (a drop in Dice)")


@dataclass
class DataConfig:
    """Where the other modalities of a case live (relative to the studies folder), and the working spacing.

    ``spacing`` (mm along the left-right, back-front and down-up axes, whatever order a series stores its array
    axes in: the network sees every case in RAS order): every case is resampled to it; null keeps the primary
    grid. Predictions are resampled back onto the primary grid. ``register``: align each secondary
    modality to the primary (``rigid``, ``translation`` or ``none``) by mutual information before the network sees
    it; motions over ``register_max_mm`` count as failures and are not applied. ``fov_coverage``: a secondary
    modality whose field of view covers less of the working grid than this fraction (an MR slab on a whole-abdomen
    CT, an ADC shorter than its T2) is partial: training and scoring leave it out of that case; inference segments
    where it has data with it (its edge values carried outward, not zeros) and the rest without it.

    ``weights_spacing`` is not a preset's to set: with ``spacing`` null, inference fills it from the model's weights
    (the voxel size they were trained at, :func:`crossmodal.nets.weights_voxel_mm`), and a case whose voxels differ
    from it by more than :data:`SPACING_TOLERANCE` on an axis is resampled to it (nnU-Net's target spacing). Where
    ``spacing`` is set that far from the weights' record, inference uses the record instead (:func:`served_config`).
    """

    sidecar_dir: str = "modalities"
    spacing: tuple[float, float, float] | None = None
    weights_spacing: tuple[float, float, float] | None = None
    register: str = "translation"
    register_max_mm: float = 20.0
    fov_coverage: float = 0.9

    def __post_init__(self) -> None:
        if self.register not in ("none", "translation", "rigid"):
            raise ConfigError(f"data.register: {self.register!r} is not one of none, translation, rigid")
        if self.spacing is not None:
            if len(self.spacing) != 3 or min(self.spacing) <= 0:
                raise ConfigError(f"data.spacing: {self.spacing} must be three positive numbers (mm) or null")
            self.spacing = tuple(float(v) for v in self.spacing)  # type: ignore[assignment]
        if self.weights_spacing is not None:
            if len(self.weights_spacing) != 3 or min(self.weights_spacing) <= 0:
                raise ConfigError(f"data.weights_spacing: {self.weights_spacing} must be three positive numbers (mm) "
                                  "or null")
            self.weights_spacing = tuple(float(v) for v in self.weights_spacing)  # type: ignore[assignment]
        if not 0.0 <= self.fov_coverage <= 1.0:
            raise ConfigError(f"data.fov_coverage: {self.fov_coverage} must be a fraction in [0, 1] (of the working "
                              "grid a secondary modality must cover to count as covering it)")


SPACING_TOLERANCE = 1.25  # voxel sizes within this factor on every axis count as one (no resampling, no warning)


def far_apart(a: Iterable[float], b: Iterable[float], tolerance: float = SPACING_TOLERANCE) -> bool:
    """Whether two voxel sizes (mm, per axis) differ by more than ``tolerance`` times on an axis.

    Example:
        >>> far_apart([2, 2, 2], [2, 2, 2.4]), far_apart([1, 1, 1], [2, 2, 2])
        (False, True)
    """
    return any(max(x / y, y / x) > tolerance for x, y in zip(a, b, strict=True))


@dataclass
class ActiveConfig:
    """Active learning (``crossmodal.active``): score weights, diversity, the hand-out lock, scoring cost.

    ``cold_scoring_s``: where nothing is scored yet (a fresh datastore, a next-sample request before the start-up
    scoring has stored anything), the request first scores candidates for up to this long itself (0: a random pick).
    """

    weights: dict[str, float] = field(default_factory=lambda: {"disagreement": 1.0, "mc_uncertainty": 0.5})
    diversity: float = 0.3
    mc_samples: int = 2
    scoring_scale: float = 0.5
    handout_window_s: float = 600.0
    refine_sparse: bool = False
    cold_scoring_s: float = 10.0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.weights) - {"disagreement", "mc_uncertainty", "entropy"})
        if unknown:
            raise ConfigError(f"active.weights: unknown scores {unknown}; valid: disagreement, mc_uncertainty, "
                              "entropy")
        if not 0.0 <= self.diversity <= 1.0:
            raise ConfigError(f"active.diversity: {self.diversity} must be in [0, 1]")
        if not 0.0 < self.scoring_scale <= 1.0:
            raise ConfigError(f"active.scoring_scale: {self.scoring_scale} must be in (0, 1]")
        if not self.cold_scoring_s >= 0:
            raise ConfigError(f"active.cold_scoring_s: {self.cold_scoring_s} must be >= 0")
        self.weights = {k: float(v) for k, v in self.weights.items()}


@dataclass
class CrossModalConfig:
    """The whole resolved configuration of one app / experiment."""

    name: str = "crossmodal"
    modalities: list[ModalityConfig] = field(default_factory=lambda: [ModalityConfig("image")])
    labels: LabelConfig = field(default_factory=LabelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    active: ActiveConfig = field(default_factory=ActiveConfig)

    def __post_init__(self) -> None:
        names = self.modality_names
        if not names:
            raise ConfigError("modalities: at least one modality is needed (the first is the primary)")
        if len(set(names)) != len(names):
            raise ConfigError(f"modalities: names {names} must be unique")
        unknown = [n for n in self.model.inputs if n not in names]
        if unknown:
            raise ConfigError(f"model.inputs: {unknown} are not configured modalities {names}")
        self.infer.largest_component = parse_largest_component(self.infer.largest_component, self.labels.foreground,
                                                               "infer.largest_component")
        # the network halves a window per stride: a side that is not a multiple of their product stopped training
        # with a tensor-size RuntimeError deep in the decoder, one of a single voxel at the deepest level with
        # instance norm's "Expected more than 1 spatial element"
        step = math.prod(self.model.strides)
        for key, size in (("train.patch_size", self.train.patch_size), ("infer.roi_size", self.infer.roi_size)):
            if len(size) != 3 or any(v < 2 * step or v % step for v in size):
                raise ConfigError(f"{key}: {list(size)} must be three multiples of {step} (the product of "
                                  f"model.strides {list(self.model.strides)}), each at least {2 * step}")

    @property
    def modality_names(self) -> list[str]:
        return [m.name for m in self.modalities]

    @property
    def primary(self) -> ModalityConfig:
        return self.modalities[0]

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CrossModalConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known - {"extends"})
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}{_meant(unknown, known)}; valid keys are {sorted(known)}")
        kwargs: dict[str, Any] = {}
        if "name" in raw:
            kwargs["name"] = str(raw["name"])
        if "modalities" in raw:
            kwargs["modalities"] = [_build(ModalityConfig, m, "modalities") for m in raw["modalities"]]
        for key, typ in (("labels", LabelConfig), ("model", ModelConfig), ("infer", InferConfig),
                         ("train", TrainConfig), ("data", DataConfig), ("active", ActiveConfig)):
            if key in raw:
                kwargs[key] = _build(typ, raw[key] or {}, key)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _meant(unknown: list[str], known: Iterable[str]) -> str:
    """`` (did you mean 'max_epochs' for 'max_epoch'?)`` where an unknown key nearly is a known one, else ""."""
    typo = near_miss(unknown, known)
    return f" (did you mean {typo[1]!r} for {typo[0]!r}?)" if typo else ""


def _build(typ: type, raw: dict[str, Any], where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    known = {f.name for f in dataclasses.fields(typ)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}{_meant(unknown, known)}; valid keys are {sorted(known)}")
    raw = dict(raw)
    for f in dataclasses.fields(typ):
        if f.name in raw:
            raw[f.name] = _scalar(raw[f.name], str(f.type), f"{where}.{f.name}")
    try:
        return typ(**raw)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from e


def _scalar(value: Any, annotation: str, key: str) -> Any:
    """``value`` of a ``bool`` / ``int`` / ``float`` / ``str`` config key checked (others as they are); a float
    written as YAML reads it as a string (``1e-4``: PyYAML wants ``1.0e-4``) is taken as the number.

    Example:
        >>> _scalar("1e-4", "float", "train.lr"), _scalar(2, "float", "train.lr")
        (0.0001, 2)
        >>> _scalar("maybe", "bool", "model.joint_stem")
        Traceback (most recent call last):
        ...
        crossmodal.config.ConfigError: model.joint_stem: 'maybe' must be true or false
    """
    if annotation == "bool" and not isinstance(value, bool):  # `maybe` or "false" was taken as true
        raise ConfigError(f"{key}: {value!r} must be true or false")
    if annotation == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: {value!r} must be a whole number")
    if annotation == "float":
        number = value
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number):
            raise ConfigError(f"{key}: {value!r} must be a finite number")
        return number
    if annotation == "str" and not isinstance(value, str):
        raise ConfigError(f"{key}: {value!r} must be text")
    return value


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


WHOLE_VALUES = {("labels", "classes")}
"""Mappings an ``extends`` or an override replaces whole: a preset's label classes are a set (merged, a config
extending ``phantom`` could not drop its ``vessel`` class)."""


def merge_dicts(base: dict[str, Any], over: dict[str, Any], at: tuple[str, ...] = ()) -> dict[str, Any]:
    """``over`` merged into ``base``: dicts recursively (except :data:`WHOLE_VALUES`), everything else replaced.

    Example:
        >>> merge_dicts({"labels": {"classes": {"a": 1, "b": 2}, "x": 1}}, {"labels": {"classes": {"a": 1}}})
        {'labels': {'classes': {'a': 1}, 'x': 1}}
    """
    out = dict(base)
    for k, v in over.items():
        whole = (*at, k) in WHOLE_VALUES
        out[k] = merge_dicts(out[k], v, (*at, k)) if isinstance(v, dict) and isinstance(out.get(k), dict) and \
            not whole else v
    return out


def _read_raw(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path in seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle through {[str(p) for p in seen]}")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    parent = raw.pop("extends", None)
    if parent:
        raw = merge_dicts(_read_raw(_parent_of(path, str(parent)), (*seen, path)), raw)
    return raw


def _parent_of(path: Path, parent: str) -> Path:
    """What ``extends: <parent>`` in ``path`` names: a YAML beside it, else one of the shipped presets (a user's own
    config outside ``configs/`` that extends ``phantom`` was refused: "valid presets in <its folder>")."""
    try:
        return resolve_preset(parent, path.parent)
    except ConfigError:
        pass
    try:
        return resolve_preset(parent)
    except ConfigError:
        shipped = sorted(p.stem for p in default_configs_dir().glob("*.yaml"))
        raise ConfigError(f"{path}: extends {parent!r}: no {parent}.yaml beside it, nor a shipped preset of that "
                          f"name ({shipped} in {default_configs_dir()})") from None


def resolve_preset(name_or_path: str, configs_dir: str | os.PathLike[str] | None = None) -> Path:
    """Map a preset name (``brain``) or a path (``configs/brain.yaml``) to an existing YAML file."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate
    base = Path(configs_dir) if configs_dir else default_configs_dir()
    path = base / f"{name_or_path}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in base.glob("*.yaml"))
        raise ConfigError(f"unknown config preset {name_or_path!r}; valid presets in {base}: {names}")
    return path


def default_configs_dir() -> Path:
    """``$CROSSMODAL_CONFIGS`` or the repository's ``configs/`` folder."""
    env = os.environ.get("CROSSMODAL_CONFIGS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "configs"


def served_config(cfg: CrossModalConfig, recorded: Iterable[float] | None,
                  windows: Mapping[str, tuple[float, float] | None] | None = None) -> CrossModalConfig:
    """The preset as a model whose weights record having been trained at ``recorded`` (mm along R, A, S; None: not
    recorded) with these CT ``windows`` (by modality name, from :func:`crossmodal.nets.inputs_of`) reads cases: its
    voxel size and CT windows are the ones it is served at. The voxel size: with ``data.spacing`` null, as
    ``data.weights_spacing`` (a case more than :data:`SPACING_TOLERANCE` off it on an axis is resampled to it); with
    ``data.spacing`` set and that far from the record (the preset edited after the model was trained, a model of
    another preset), as ``data.spacing``: a model trained at 2 mm segments 1 mm cases poorly. A CT window other than
    the recorded one is replaced by it (the phantom's model, trained at -150..250 HU, scores 0.59 mean Dice under
    -1000..1000, 0.93 under its own). Else ``cfg`` itself.

    Example:
        >>> cfg = load_config("phantom")  # data.spacing: [2, 2, 2], CT window -150..250
        >>> served_config(cfg, (2.0, 2.0, 2.2)) is cfg, served_config(cfg, (1.0, 1.0, 1.0)).data.spacing
        (True, (1.0, 1.0, 1.0))
        >>> served_config(cfg, None, {"ct": (-1000.0, 1000.0), "pet": None}).modalities[0].window
        (-1000.0, 1000.0)
    """
    out = cfg
    if recorded:
        a, b, c = (float(v) for v in recorded)
        mm = (a, b, c)
        if cfg.data.spacing:
            if far_apart(cfg.data.spacing, mm):
                out = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, spacing=mm))
        elif cfg.data.weights_spacing != mm:
            out = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, weights_spacing=mm))
    other = other_windows(cfg, windows)
    if other:
        out = dataclasses.replace(out, modalities=[dataclasses.replace(m, window=other[m.name])
                                                   if m.name in other else m for m in out.modalities])
    return out


def other_windows(cfg: CrossModalConfig, windows: Mapping[str, tuple[float, float] | None] | None
                  ) -> dict[str, tuple[float, float]]:
    """The CT modalities of ``cfg`` whose window differs from the one in ``windows`` (by modality name: the windows
    a model's weights record having been trained at), with that window.

    Example:
        >>> other_windows(load_config("phantom"), {"ct": (-1000.0, 1000.0), "pet": None})
        {'ct': (-1000.0, 1000.0)}
    """
    out = {}
    for m in cfg.modalities:
        w = (windows or {}).get(m.name)
        if m.kind == "ct" and w is not None and max(abs(float(a) - b) for a, b in zip(w, m.window, strict=True)) > 1e-3:
            out[m.name] = (float(w[0]), float(w[1]))
    return out


def load_config(name_or_path: str, configs_dir: str | os.PathLike[str] | None = None,
                overrides: dict[str, Any] | None = None) -> CrossModalConfig:
    """Load a preset by name or path, apply nested ``overrides``, validate, return the typed config."""
    raw = _read_raw(resolve_preset(name_or_path, configs_dir).resolve())
    if overrides:
        raw = merge_dicts(raw, overrides)
    return CrossModalConfig.from_dict(raw)


def save_config(cfg: CrossModalConfig, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML atomically."""
    atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN / Inf float (a metric of an empty class, a loss, a client's value) as None: JSON has no
    NaN, and what MONAI Label serves (the train stats in ``GET /info/``, the datastore's infos) failed on one with a
    500 ("Out of range float values are not JSON compliant") as long as it was stored.

    Example:
        >>> json_safe({"loss": float("nan"), "dice": [0.5, float("inf")], "epoch": 2})
        {'loss': None, 'dice': [0.5, None], 'epoch': 2}
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def non_finite_at(obj: Any, where: str = "") -> str | None:
    """The first key path in ``obj`` (dicts and lists) whose value is a NaN / Inf float, or None.

    Example:
        >>> non_finite_at({"a": 1, "b": [0.5, {"c": float("nan")}]}), non_finite_at({"a": [1.0]})
        ('b[1].c', None)
    """
    if isinstance(obj, float):
        return None if math.isfinite(obj) else where
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list | tuple) else ()
    for k, v in items:
        found = non_finite_at(v, f"{where}[{k}]" if isinstance(k, int) else f"{where}.{k}" if where else str(k))
        if found is not None:
            return found
    return None


def written_temp(suffix: str, write: Callable[[str], object], prefix: str = "crossmodal-") -> str:
    """A new temp file ``<prefix>*<suffix>`` in the temp folder, filled by ``write(path)``; the caller removes it. A
    ``write`` that raises (a full disk, an image that does not read) removes it first: no empty file is left behind.

    Example:
        >>> path = written_temp(".txt", lambda p: Path(p).write_text("ok")); Path(path).read_text()
        'ok'
        >>> Path(path).unlink()
        >>> def fail(p): raise OSError(28, "No space left on device")
        >>> before = set(Path(tempfile.gettempdir()).glob("crossmodal-*.txt"))
        >>> written_temp(".txt", fail)
        Traceback (most recent call last):
        OSError: [Errno 28] No space left on device
        >>> set(Path(tempfile.gettempdir()).glob("crossmodal-*.txt")) == before
        True
    """
    fd, path = tempfile.mkstemp(suffix=suffix, prefix=prefix)
    os.close(fd)
    try:
        write(path)
    except BaseException:
        Path(path).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder and ``os.replace``."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
