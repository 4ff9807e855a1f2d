"""Network registry: ``cfg.model.name`` -> a factory taking the whole config."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from crossmodal.config import ConfigError, CrossModalConfig
from crossmodal.nets.baseline import baseline_unet
from crossmodal.nets.crossmodal_net import CrossModalNet, CrossModalOutput, crossmodal_net

NETWORKS: dict[str, Callable[[CrossModalConfig], nn.Module]] = {
    "baseline_unet": baseline_unet,
    "crossmodal": crossmodal_net,
}

__all__ = ["NETWORKS", "CrossModalNet", "CrossModalOutput", "build_network"]


def build_network(cfg: CrossModalConfig) -> nn.Module:
    """Build ``cfg.model.name`` from :data:`NETWORKS`."""
    try:
        factory = NETWORKS[cfg.model.name]
    except KeyError:
        raise ConfigError(f"model.name {cfg.model.name!r} is unknown; valid names: {sorted(NETWORKS)}") from None
    return factory(cfg)
