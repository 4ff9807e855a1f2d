"""A MONAI Label radiology-style pipeline, kept only as the infer benchmark's reference.

Like the radiology sample app's ``segmentation_spleen``: the primary image alone, RAS orientation, 1.5 mm
spacing, intensity scaling, a UNet (16-256 channels, 2 residual units, batch norm), sliding window 160^3, and the
label restored onto the input grid. Registered only with ``--conf benchmark_pipelines true``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from crossmodal.config import CrossModalConfig
from monai.data import MetaTensor
from monai.inferers import Inferer, SlidingWindowInferer
from monai.networks.nets import UNet
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialResample,
)
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask


def radiology_unet(cfg: CrossModalConfig) -> UNet:
    """The radiology sample's UNet on one input channel."""
    return UNet(spatial_dims=3, in_channels=1, out_channels=cfg.labels.num_classes, channels=(16, 32, 64, 128, 256),
                strides=(2, 2, 2, 2), num_res_units=2, norm="batch")


class RestoreToInput:
    """Label (1, h, w, d) on the 1.5 mm RAS grid -> (H, W, D) on the input image's grid (nearest)."""

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        image = data["image"]
        label = MetaTensor(data["pred"].float(), affine=image.affine)
        out = SpatialResample(mode="nearest", dtype=np.float32)(
            label, dst_affine=image.meta["original_affine"], spatial_size=tuple(image.meta["spatial_shape"]))
        data["pred"] = MetaTensor(out[0].to(torch.uint8), affine=image.meta["original_affine"])
        return data


class RadiologyInfer(BasicInferTask):
    """The reference pipeline (random weights are enough for timing)."""

    def __init__(self, cfg: CrossModalConfig) -> None:
        super().__init__(path=None, network=radiology_unet(cfg), type=InferType.SEGMENTATION,
                         labels=cfg.labels.foreground, dimension=3, roi_size=(160, 160, 160),
                         description="Radiology-style reference: primary image only, 1.5 mm, window 160^3")
        self.cfg = cfg

    def pre_transforms(self, data: dict[str, Any] | None = None) -> Sequence[Callable]:
        primary = self.cfg.primary
        scale = (ScaleIntensityRanged(keys="image", a_min=primary.window[0], a_max=primary.window[1], b_min=0.0,
                                      b_max=1.0, clip=True) if primary.kind == "ct"
                 else NormalizeIntensityd(keys="image"))
        return [LoadImaged(keys="image", image_only=False), EnsureChannelFirstd(keys="image"),
                Orientationd(keys="image", axcodes="RAS"), Spacingd(keys="image", pixdim=(1.5, 1.5, 1.5)),
                scale, EnsureTyped(keys="image")]

    def inferer(self, data: dict[str, Any] | None = None) -> Inferer:
        return SlidingWindowInferer(roi_size=(160, 160, 160), sw_batch_size=1, overlap=0.25)

    def post_transforms(self, data: dict[str, Any] | None = None) -> Sequence[Callable]:
        return [EnsureTyped(keys="pred"), Activationsd(keys="pred", softmax=True),
                AsDiscreted(keys="pred", argmax=True), RestoreToInput()]
