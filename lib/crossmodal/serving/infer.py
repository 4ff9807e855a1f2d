"""The app's infer task: all modalities of a case in, a label map on the primary grid out."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from crossmodal.config import CrossModalConfig
from crossmodal.io import CaseError
from crossmodal.serving.datastore import http_error
from crossmodal.transforms import preprocessing
from monai.data import MetaTensor
from monai.inferers import Inferer, SlidingWindowInferer
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from torch import nn


class ArgmaxLabel:
    """``data["pred"]`` logits (C, H, W, D) -> uint8 label (H, W, D) on the primary grid; fills the result JSON."""

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        pred = data["pred"]
        if data.get("keep_probs"):
            data["logits"] = pred.as_tensor() if isinstance(pred, MetaTensor) else pred
        label = torch.argmax(pred, dim=0).to(torch.uint8)
        data["pred"] = MetaTensor(label, affine=data["image"].affine)
        data["result"] = {"case": data.get("case_id"), "modalities_used": data.get("modalities_used", [])}
        return data


class CrossModalInfer(BasicInferTask):
    """Segmentation from every modality of a case; returns which modalities were used.

    Request params: ``missing_modality`` (``error`` / ``zero_fill``), ``device``, ``result_extension``
    (``.nii.gz`` / ``.nrrd``), the usual MONAI Label ones.
    """

    def __init__(self, cfg: CrossModalConfig, network: nn.Module, path: Sequence[str], description: str) -> None:
        super().__init__(
            path=list(path), network=network, type=InferType.SEGMENTATION, labels=cfg.labels.viewer_labels,
            dimension=3, description=description, roi_size=cfg.infer.roi_size, load_strict=True,
            config={"missing_modality": cfg.infer.missing_modality},
        )
        self.cfg = cfg

    def pre_transforms(self, data: dict[str, Any] | None = None) -> Sequence[Callable]:
        missing = (data or {}).get("missing_modality") or self.cfg.infer.missing_modality
        if missing not in ("error", "zero_fill"):
            raise http_error(ValueError(f"missing_modality {missing!r} is not one of ('error', 'zero_fill')"))
        return list(preprocessing(self.cfg, "infer", missing=missing).transforms)

    def inferer(self, data: dict[str, Any] | None = None) -> Inferer:
        c = self.cfg.infer
        return SlidingWindowInferer(roi_size=c.roi_size, sw_batch_size=c.sw_batch_size, overlap=c.overlap,
                                    mode="gaussian")

    def inverse_transforms(self, data: dict[str, Any] | None = None) -> None:
        return None

    def post_transforms(self, data: dict[str, Any] | None = None) -> Sequence[Callable]:
        return [ArgmaxLabel()]

    def __call__(self, request: dict[str, Any], callbacks: Any = None) -> tuple[Any, dict]:
        req = dict(request)
        if not req.get("result_extension"):
            req.pop("result_extension", None)
        req.setdefault("result_dtype", "uint8")
        try:
            return super().__call__(req, callbacks)
        except CaseError as e:
            raise http_error(e) from e
