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

__all__ = ["NETWORKS", "CrossModalNet", "CrossModalOutput", "InputSelect", "build_network", "unwrap"]


class InputSelect(nn.Module):
    """A network that sees only some input channels: (B, M, ...) -> ``net((B, len(index), ...))``.

    ``present`` (one flag per configured modality), when passed, is narrowed to the selected channels.
    """

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
