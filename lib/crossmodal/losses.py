"""Partial (masked) losses: supervision on annotated voxels only (nnU-Net's ignore-label recipe)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from crossmodal.labels import IGNORE_INDEX
from crossmodal.nets.crossmodal_net import CrossModalOutput


def _target_index(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(B, 1, ...) or (B, ...) float/int target -> (B, ...) int64 (a channel dim only when ndim matches logits)."""
    if target.ndim == logits.ndim:
        if target.shape[1] != 1:
            raise ValueError(f"target with a channel dim must have 1 channel, got shape {tuple(target.shape)}")
        target = target[:, 0]
    return target.long()


class PartialCrossEntropyLoss(nn.Module):
    """Cross-entropy averaged over voxels whose target is not ``ignore_index``; 0 when none is annotated.

    Args:
        logits: (B, C, H, W, D). target: (B, 1, H, W, D) or (B, H, W, D) class indices.

    Example:
        >>> logits = torch.zeros(1, 2, 1, 1, 2); target = torch.tensor([[[[0, -1]]]])
        >>> round(PartialCrossEntropyLoss()(logits, target).item(), 4)  # log(2) on the one annotated voxel
        0.6931
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        t = _target_index(target, logits)
        if not (t != self.ignore_index).any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits, t, ignore_index=self.ignore_index)


class PartialDiceLoss(nn.Module):
    """1 - soft Dice over annotated voxels, pooled over the batch, averaged over classes.

    A class absent from the annotated voxels and not predicted there scores Dice 1 (loss 0).

    Example:
        >>> logits = torch.tensor([[[[[9.0, -9.0]]], [[[-9.0, 9.0]]]]])  # confident and right
        >>> target = torch.tensor([[[[[0, 1]]]]])
        >>> PartialDiceLoss()(logits, target).item() < 1e-3
        True
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX, smooth: float = 1e-5) -> None:
        super().__init__()
        self.ignore_index, self.smooth = ignore_index, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        t = _target_index(target, logits)
        mask = (t != self.ignore_index).unsqueeze(1).to(logits.dtype)
        probs = torch.softmax(logits, dim=1) * mask
        onehot = F.one_hot(t.clamp_min(0), logits.shape[1]).movedim(-1, 1).to(logits.dtype) * mask
        dims = [0, *range(2, logits.ndim)]
        inter = (probs * onehot).sum(dims)
        denom = probs.sum(dims) + onehot.sum(dims)
        dice = (2 * inter + self.smooth) / (denom + self.smooth)
        return 1.0 - dice.mean()


class PartialDiceCELoss(nn.Module):
    """``dice_weight`` x :class:`PartialDiceLoss` + ``ce_weight`` x :class:`PartialCrossEntropyLoss`."""

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.dice, self.ce = PartialDiceLoss(ignore_index), PartialCrossEntropyLoss(ignore_index)
        self.dice_weight, self.ce_weight = dice_weight, ce_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice_weight * self.dice(logits, target) + self.ce_weight * self.ce(logits, target)


class SupervisedLoss(nn.Module):
    """Partial Dice + CE on the fused logits, plus ``aux_weight`` x its mean over the per-modality heads.

    Accepts a plain logits tensor (early-fusion networks) or a ``CrossModalOutput``.
    """

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0, aux_weight: float = 0.5) -> None:
        super().__init__()
        self.base = PartialDiceCELoss(dice_weight, ce_weight)
        self.aux_weight = aux_weight

    def forward(self, pred: torch.Tensor | CrossModalOutput, target: torch.Tensor) -> torch.Tensor:
        if isinstance(pred, torch.Tensor):
            return self.base(pred, target)
        loss = self.base(pred.fused, target)
        if self.aux_weight > 0 and pred.per_modality:
            aux = torch.stack([self.base(v, target) for v in pred.per_modality.values()]).mean()
            loss = loss + self.aux_weight * aux
        return loss
