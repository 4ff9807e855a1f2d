"""Network registry: ``cfg.model.name`` -> a factory taking the whole config."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from crossmodal.config import ConfigError, CrossModalConfig
from crossmodal.nets.baseline import baseline_unet
from crossmodal.nets.crossmodal_net import CrossModalNet, CrossModalOutput, crossmodal_net

NETWORKS: dict[str, Callable[[CrossModalConfig], nn.Module]] = {
    "baseline_unet": baseline_unet,
    "crossmodal": crossmodal_net,
}

__all__ = ["NETWORKS", "CrossModalNet", "CrossModalOutput", "InputSelect", "ModelFileError", "build_network",
           "check_weights", "unwrap"]


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
    """Build ``cfg.model.name`` from :data:`NETWORKS`, on ``cfg.model.inputs`` only when that is set."""
    try:
        factory = NETWORKS[cfg.model.name]
    except KeyError:
        raise ConfigError(f"model.name {cfg.model.name!r} is unknown; valid names: {sorted(NETWORKS)}") from None
    inputs = list(cfg.model.inputs)
    if not inputs or inputs == cfg.modality_names:
        return factory(cfg)
    sub = dataclasses.replace(cfg, modalities=[m for m in cfg.modalities if m.name in inputs],
                              model=dataclasses.replace(cfg.model, inputs=()))
    return InputSelect(factory(sub), [cfg.modality_names.index(m.name) for m in sub.modalities])


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
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    shaped = [k for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or shaped:
        parts = [f"{len(v)} {what} (e.g. {v[0]!r})" for what, v in
                 (("missing", missing), ("unexpected", unexpected), ("of another shape", shaped)) if v]
        raise ModelFileError(
            f"model {path}: does not fit {cfg.model.name} on {list(cfg.model.inputs) or cfg.modality_names} "
            f"(preset {cfg.name!r}): weights {', '.join(parts)}; was it trained with another preset or network? "
            "Pick the matching --config / --network (server: preset, pretrained_<model>), or train a new one")
    bad = non_finite_weights(state)
    if bad:  # loads and fits, and segments nothing: every output NaN, every voxel background
        raise ModelFileError(f"model {path}: {len(bad)} of its {len(state)} weight tensors hold NaN / Inf (e.g. "
                             f"{bad[0]!r}): a training that diverged? Train again with a lower learning rate")


def non_finite_weights(state: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold NaN or Inf."""
    return [k for k, v in state.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
