"""Sliding-window inference over any network of the registry (a logits tensor or a ``CrossModalOutput``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.inferers import Inferer, SlidingWindowInferer
from torch import nn

from crossmodal.config import InferConfig
from crossmodal.nets import CrossModalNet, CrossModalOutput


def predict(network: nn.Module, x: torch.Tensor, present: Sequence[bool] | None = None,
            heads: bool = True, mc_dropout: bool = False) -> dict[str, torch.Tensor]:
    """One forward: ``{"fused": (B, N, ...)}`` plus ``{"<modality>": ...}`` for a cross-modal network.

    ``present`` marks the modalities to use (absent ones are left out of the fusion, not fed as zeros);
    ``heads=False`` skips the per-modality heads.
    """
    if isinstance(network, CrossModalNet):
        out = network(x, present=present, heads=heads, mc_dropout=mc_dropout)
    else:
        out = network(x)
    return out.as_dict() if isinstance(out, CrossModalOutput) else {"fused": out}


class NetworkInferer(Inferer):
    """MONAI ``SlidingWindowInferer`` around :func:`predict`; returns the dict, or the fused logits only."""

    def __init__(self, cfg: InferConfig, present: Sequence[bool] | None = None, fused_only: bool = False,
                 roi_size: Sequence[int] | None = None, heads: bool = True, mc_dropout: bool = False) -> None:
        super().__init__()
        self.present, self.fused_only, self.heads = present, fused_only, heads and not fused_only
        self.mc_dropout = mc_dropout
        self.window = SlidingWindowInferer(roi_size=tuple(roi_size or cfg.roi_size), sw_batch_size=cfg.sw_batch_size,
                                           overlap=cfg.overlap, mode="gaussian")

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs):  # type: ignore[override]
        if self.fused_only:
            return self.window(inputs, lambda x: predict(network, x, self.present, False, self.mc_dropout)["fused"])
        return self.window(inputs, lambda x: predict(network, x, self.present, self.heads, self.mc_dropout))


def configure_threads() -> int:
    """On a CPU-only machine use every core this process may run on (cgroup / affinity aware); returns the count."""
    if torch.cuda.is_available():
        return torch.get_num_threads()
    import os

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, n))
    return n
