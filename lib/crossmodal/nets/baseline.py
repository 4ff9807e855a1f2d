"""``baseline_unet``: early-fusion MONAI UNet, all modalities stacked as input channels (the named baseline)."""

from __future__ import annotations

from monai.networks.nets import UNet
from torch import nn

from crossmodal.config import CrossModalConfig


def baseline_unet(cfg: CrossModalConfig) -> nn.Module:
    """Early fusion: input (B, M, H, W, D) with M modalities -> logits (B, N classes, H, W, D).

    Spatial sizes must be divisible by the product of ``cfg.model.strides`` (sliding-window ROIs are).
    """
    m = cfg.model
    return UNet(spatial_dims=3, in_channels=len(cfg.modalities), out_channels=cfg.labels.num_classes,
                channels=m.channels, strides=m.strides, num_res_units=m.num_res_units, dropout=m.dropout,
                norm="instance")
