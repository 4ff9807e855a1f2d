"""Network registry: ``cfg.model.name`` -> a factory taking the whole config."""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from crossmodal.config import MODALITY_KINDS, ConfigError, CrossModalConfig
from crossmodal.nets.baseline import baseline_unet
from crossmodal.nets.crossmodal_net import CrossModalNet, CrossModalOutput, crossmodal_net

NETWORKS: dict[str, Callable[[CrossModalConfig], nn.Module]] = {
    "baseline_unet": baseline_unet,
    "crossmodal": crossmodal_net,
}

__all__ = ["CLASSES_KEY", "INPUTS_KEY", "NETWORKS", "VOXEL_KEY", "CrossModalNet", "CrossModalOutput",
           "InputRecord", "InputSelect", "ModelFileError", "build_network", "check_weights", "classes_of", "inputs_of",
           "is_record_key", "record_preset", "record_voxel_mm", "unwrap", "voxel_mm_of", "weights_voxel_mm",
           "weights_windows"]

VOXEL_KEY = "voxel_mm"  # the state dict's record of the voxel size (mm, per axis) the weights were trained at
# the state dict's record of the inputs the weights were trained on, "inputs.<modality>" (4,) for each modality the
# network takes: its input channel, its kind (1 + its index in MODALITY_KINDS; 0: not recorded) and a CT's window
# (low, high HU; 0, 0 for MR / PET)
INPUTS_KEY = "inputs"
# and of the classes it segments, "classes.<class>" (1,): 1 + the class's value (its output channel); 0: not recorded
CLASSES_KEY = "classes"


def is_record_key(key: str) -> bool:
    """Whether ``key`` of a state dict is one of the records :func:`build_network` adds (the voxel size, the inputs,
    the classes) rather than a weight."""
    return key == VOXEL_KEY or key.split(".")[0] in (INPUTS_KEY, CLASSES_KEY)


class ModelFileError(ValueError):
    """A weights file that cannot be read, or that does not fit the network it is for: names the file."""


class InputSelect(nn.Module):
    """A network that sees only some input channels: (B, M, ...) -> ``net((B, len(index), ...))``.

    ``present`` (one flag per configured modality), when passed, is narrowed to the selected channels.
    """

    index: torch.Tensor  # (len(index),) long, a buffer

    def __init__(self, net: nn.Module, index: Sequence[int]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("index", torch.as_tensor(list(index), dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor, *args: Any, present: Sequence[bool] | None = None, **kwargs: Any) -> Any:
        if present is not None:
            kwargs["present"] = [bool(present[i]) for i in self.index.tolist()]
        return self.net(x.index_select(1, self.index), *args, **kwargs)


def unwrap(network: nn.Module) -> nn.Module:
    """The network inside DDP / :class:`InputSelect` wrappers."""
    while isinstance(network, InputSelect | nn.parallel.DistributedDataParallel):
        network = network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network.net
    return network


def build_network(cfg: CrossModalConfig) -> nn.Module:
    """Build ``cfg.model.name`` from :data:`NETWORKS`, on ``cfg.model.inputs`` only when that is set, with a
    :data:`VOXEL_KEY` buffer (3,) for the voxel size its weights are trained at (zeros: not known)."""
    try:
        factory = NETWORKS[cfg.model.name]
    except KeyError:
        raise ConfigError(f"model.name {cfg.model.name!r} is unknown; valid names: {sorted(NETWORKS)}") from None
    inputs = list(cfg.model.inputs)
    classes = list(cfg.labels.classes)
    if not inputs or inputs == cfg.modality_names:
        return _with_records(factory(cfg), cfg.modality_names, classes)
    sub = dataclasses.replace(cfg, modalities=[m for m in cfg.modalities if m.name in inputs],
                              model=dataclasses.replace(cfg.model, inputs=()))
    return _with_records(InputSelect(factory(sub), [cfg.modality_names.index(m.name) for m in sub.modalities]),
                         sub.modality_names, classes)


def _buffer_name(name: str) -> str:
    """A class or modality name as a buffer's name (which may hold no dot)."""
    return name.replace(".", "_")


def _with_records(net: nn.Module, names: Sequence[str], classes: Sequence[str]) -> nn.Module:
    """``net`` with persistent buffers of zeros for its records: :data:`VOXEL_KEY` (3,), one (4,) per modality it
    takes under :data:`INPUTS_KEY` and one (1,) per class under :data:`CLASSES_KEY`; weights saved without them
    (before they existed) load as not known, and the records of modalities or classes it does not have (renamed
    since) are let go."""
    net.register_buffer(VOXEL_KEY, torch.zeros(3))
    sizes = {INPUTS_KEY: (names, 4), CLASSES_KEY: ([_buffer_name(c) for c in classes], 1)}
    for key, (keys, size) in sizes.items():
        record = nn.Module()
        for name in keys:
            record.register_buffer(name, torch.zeros(size))
        net.add_module(key, record)

    def fill(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
        state.setdefault(prefix + VOXEL_KEY, torch.zeros(3))
        for key, (keys, size) in sizes.items():
            head = f"{prefix}{key}."
            for gone in [k for k in state if k.startswith(head) and k[len(head):] not in keys]:
                del state[gone]
            for name in keys:
                state.setdefault(head + name, torch.zeros(size))

    net.register_load_state_dict_pre_hook(fill)
    return net


def _outer(network: nn.Module) -> nn.Module:
    return network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network


def record_voxel_mm(network: nn.Module, spacing: Sequence[float] | None) -> None:
    """Record in ``network``'s weights (a :func:`build_network` network, or DDP around one) the voxel size (mm, per
    axis of the primary image) they are trained at; None: not known."""
    buffer = getattr(_outer(network), VOXEL_KEY)
    buffer.copy_(torch.as_tensor(list(spacing) if spacing else [0.0, 0.0, 0.0], dtype=torch.float32))


def record_preset(network: nn.Module, cfg: CrossModalConfig) -> None:
    """Record in ``network``'s weights (a :func:`build_network` network of ``cfg``, or DDP around one) the input
    channel, the kind and, for a CT, the window of each modality it takes (``cfg.model.inputs``, else every one),
    and the value of each class it segments."""
    record = getattr(_outer(network), INPUTS_KEY)
    by_name = {m.name: m for m in cfg.modalities}
    for channel, name in enumerate(list(cfg.model.inputs) or cfg.modality_names):
        m = by_name[name]
        window = m.window if m.kind == "ct" else (0.0, 0.0)
        getattr(record, name).copy_(torch.tensor([channel, MODALITY_KINDS.index(m.kind) + 1, *window]))
    record = getattr(_outer(network), CLASSES_KEY)
    for name, value in cfg.labels.classes.items():
        getattr(record, _buffer_name(name)).fill_(value + 1)


def classes_of(state: dict[str, Any]) -> dict[str, int]:
    """The classes a state dict records having been trained to segment, name -> value (dots in a name as ``_``);
    none recorded (weights from before the record): empty.

    Example:
        >>> classes_of({"classes.background": torch.tensor([1.0]), "classes.organ": torch.tensor([2.0])})
        {'background': 0, 'organ': 1}
    """
    head = f"{CLASSES_KEY}."
    return {k[len(head):]: int(round(float(v))) - 1 for k, v in state.items()
            if k.startswith(head) and torch.is_tensor(v) and v.numel() == 1 and float(v) >= 1}


@dataclasses.dataclass(frozen=True)
class InputRecord:
    """What weights record of one modality they were trained on: its input channel, its kind, a CT's window."""

    channel: int
    kind: str
    window: tuple[float, float] | None


def inputs_of(state: dict[str, Any]) -> dict[str, InputRecord]:
    """The modalities a state dict records having been trained on, by name (:data:`INPUTS_KEY`); none recorded
    (weights from before the record): empty.

    Example:
        >>> rec = inputs_of({"inputs.ct": torch.tensor([0.0, 1, -150, 250]), "inputs.pet": torch.tensor([1, 3, 0, 0])})
        >>> rec["ct"], rec["pet"]
        (InputRecord(channel=0, kind='ct', window=(-150.0, 250.0)), InputRecord(channel=1, kind='pet', window=None))
        >>> inputs_of({"inputs.ct": torch.zeros(4)})
        {}
    """
    out = {}
    head = f"{INPUTS_KEY}."
    for key, value in state.items():
        if not key.startswith(head) or not torch.is_tensor(value) or value.numel() != 4:
            continue
        channel, code, lo, hi = value.tolist()
        if 1 <= int(round(code)) <= len(MODALITY_KINDS):
            kind = MODALITY_KINDS[int(round(code)) - 1]
            out[key[len(head):]] = InputRecord(int(round(channel)), kind, (lo, hi) if kind == "ct" else None)
    return out


def voxel_mm_of(state: dict[str, Any]) -> tuple[float, float, float] | None:
    """The trained-at voxel size a state dict records; None where it records none (weights from before the record,
    or trained without one).

    Example:
        >>> voxel_mm_of({"voxel_mm": torch.tensor([2.0, 2.0, 3.0])}), voxel_mm_of({"voxel_mm": torch.zeros(3)})
        ((2.0, 2.0, 3.0), None)
    """
    value = state.get(VOXEL_KEY)
    if not torch.is_tensor(value) or value.numel() != 3 or not bool((value > 0).all()):
        return None
    a, b, c = (float(v) for v in value.tolist())
    return a, b, c


Records = tuple[tuple[float, float, float] | None, dict[str, InputRecord]]
_RECORDED: OrderedDict[tuple[str, int, int], Records] = OrderedDict()


def _records(path: str | os.PathLike[str] | None) -> Records:
    """The voxel size and inputs the weights file at ``path`` records, read once per version of the file."""
    if not path or not os.path.isfile(path):
        return None, {}
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
    if key not in _RECORDED:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            return None, {}
        state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else {}
        _RECORDED[key] = (voxel_mm_of(state), inputs_of(state)) if isinstance(state, dict) else (None, {})
        while len(_RECORDED) > 16:
            _RECORDED.popitem(last=False)
    return _RECORDED[key]


def weights_voxel_mm(path: str | os.PathLike[str] | None) -> tuple[float, float, float] | None:
    """The voxel size the weights file at ``path`` records (:func:`voxel_mm_of`), read once per version of the file;
    None without a file, a record or a readable checkpoint (loading it says why)."""
    return _records(path)[0]


def weights_windows(path: str | os.PathLike[str] | None) -> dict[str, tuple[float, float]]:
    """The CT windows the weights file at ``path`` records having been trained at (:func:`inputs_of`), by modality
    name, read once per version of the file; empty without a file, a record or a readable checkpoint."""
    return {n: r.window for n, r in _records(path)[1].items() if r.window is not None}


def check_weights(cfg: CrossModalConfig, path: str, state_key: str = "model") -> None:
    """Load ``path`` into a fresh ``build_network(cfg)`` strictly, on the CPU; nothing is kept.

    Raises:
        ModelFileError: the file is not a readable PyTorch checkpoint, or its weights do not fit the network
            (names, counts and an example of the missing, unexpected and differently shaped weights).
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip / pickle / EOF errors of a truncated or foreign file
        reason = str(e).strip().splitlines()[0].split(". ")[0][:200] if str(e).strip() else type(e).__name__
        raise ModelFileError(f"model {path}: cannot be read as a PyTorch checkpoint (truncated or corrupt?): "
                             f"{reason}") from e
    state = ckpt.get(state_key, ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(f"model {path}: holds no state dict of weights")
    want = build_network(cfg).state_dict()
    recorded = {k for k in (*want, *state) if is_record_key(k)}
    missing = [k for k in want if k not in state and k not in recorded]  # weights from before the records load
    unexpected = [k for k in state if k not in want and k not in recorded]  # a renamed modality's record
    shaped = [k for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    trained = classes_of(state)
    if shaped and trained and len(trained) != cfg.labels.num_classes:  # the output layers' shape: say why
        raise ModelFileError(
            f"model {path}: segments {len(trained)} classes ({', '.join(sorted(trained, key=trained.__getitem__))}) "
            f"and preset {cfg.name!r} has {cfg.labels.num_classes} ({', '.join(cfg.labels.classes)}): train a new one "
            "with this preset, or pick the preset the model was trained with (--config; server: preset)")
    if missing or unexpected or shaped:
        parts = [f"{len(v)} {what} (e.g. {v[0]!r})" for what, v in
                 (("missing", missing), ("unexpected", unexpected), ("of another shape", shaped)) if v]
        raise ModelFileError(
            f"model {path}: does not fit {cfg.model.name} on {list(cfg.model.inputs) or cfg.modality_names} "
            f"(preset {cfg.name!r}): weights {', '.join(parts)}; was it trained with another preset or network? "
            "Pick the matching --config / --network (server: preset, pretrained_<model>), or train a new one")
    records = inputs_of(state)
    names = list(cfg.model.inputs) or cfg.modality_names
    kinds = {m.name: m.kind for m in cfg.modalities}
    other = [n for n, r in records.items() if n in kinds and r.kind != kinds[n]]
    if other:
        said = ", ".join(f"{n} of kind {records[n].kind}" for n in other)
        raise ModelFileError(f"model {path}: was trained on {said}"
                             f" and preset {cfg.name!r} has {', '.join(f'{n} of kind {kinds[n]}' for n in other)}: "
                             "another preset's model? Pick the matching --config (server: preset), or train a new one")
    preset = {_buffer_name(n): v for n, v in cfg.labels.classes.items()}
    swapped = [n for n in preset if n in trained and trained[n] != preset[n]]
    if swapped:
        raise ModelFileError(f"model {path}: was trained with {', '.join(f'{n} = {trained[n]}' for n in swapped)} and "
                             f"preset {cfg.name!r} has {', '.join(f'{n} = {preset[n]}' for n in swapped)}: its labels "
                             "would be saved under the wrong names. Give the classes the model's values, or train a "
                             "new one")
    # the cross-modal network takes each modality by its name, in any order; the others by channel
    moved = [n for n in names if n in records and records[n].channel != names.index(n)]
    if moved and cfg.model.name != "crossmodal":
        order = sorted((r.channel, n) for n, r in records.items())
        raise ModelFileError(f"model {path}: {cfg.model.name} was trained on its inputs in the order "
                             f"{', '.join(n for _, n in order)} and preset {cfg.name!r} gives them as "
                             f"{', '.join(names)}: list the modalities in the model's order, or train a new one")
    bad = non_finite_weights(state)
    if bad:  # loads and fits, and segments nothing: every output NaN, every voxel background
        raise ModelFileError(f"model {path}: {len(bad)} of its {len(state)} weight tensors hold NaN / Inf (e.g. "
                             f"{bad[0]!r}): a training that diverged? Train again with a lower learning rate")


def non_finite_weights(state: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold NaN or Inf."""
    return [k for k, v in state.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
