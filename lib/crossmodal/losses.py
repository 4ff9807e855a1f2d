"""Partial (masked) losses: supervision on annotated voxels only (nnU-Net's ignore-label recipe).

The per-modality terms take an optional ``present`` mask, ``{modality: (B,) bool}``: a sample whose file of that
modality is absent (trained with it left out of the fusion) has no head or descriptor of it to supervise.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from crossmodal.labels import IGNORE_INDEX
from crossmodal.nets.crossmodal_net import CrossModalOutput, recomputed


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


Presence = Mapping[str, torch.Tensor]  # {modality: (B,) bool}: which samples have that modality


def present_rows(present: Presence | None, name: str, batch: int) -> torch.Tensor | None:
    """The (B,) bool rows of ``present`` for modality ``name``; None when every sample has it.

    Example:
        >>> present_rows({"pet": torch.tensor([True, False])}, "pet", 2).tolist(), present_rows(None, "pet", 2)
        ([True, False], None)
    """
    if present is None or name not in present:
        return None
    rows = present[name].to(torch.bool).reshape(-1)  # on the batch's device (masks and indexes it)
    if rows.numel() != batch:
        raise ValueError(f"present[{name!r}] has {rows.numel()} samples, the batch {batch}")
    return None if bool(rows.all()) else rows


class SupervisedLoss(nn.Module):
    """Partial Dice + CE on the fused logits, plus ``aux_weight`` x its mean over the per-modality heads.

    Accepts a plain logits tensor (early-fusion networks) or a ``CrossModalOutput``. ``present``: a head is
    supervised on the samples that have its modality only (none: left out of the mean).

    Example:
        >>> from crossmodal.nets.crossmodal_net import CrossModalOutput
        >>> right = torch.tensor([[[[[9.0]]], [[[-9.0]]]]])  # (1, 2 classes, 1, 1, 1): class 0, confident
        >>> out = CrossModalOutput(fused=right, per_modality={"ct": right, "pet": -right}, independent={})
        >>> t = torch.zeros(1, 1, 1, 1, 1)
        >>> loss = SupervisedLoss(aux_weight=1.0)
        >>> round(loss(out, t).item(), 2), round(loss(out, t, {"pet": torch.tensor([False])}).item(), 2)
        (9.5, 0.0)
    """

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0, aux_weight: float = 0.5,
                 checkpointing: bool = False) -> None:
        super().__init__()
        self.base = PartialDiceCELoss(dice_weight, ce_weight)
        self.aux_weight = aux_weight
        self.checkpointing = checkpointing  # each output's loss recomputed in the backward pass (:func:`recomputed`)

    def _base(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return recomputed(self.checkpointing, self.base, logits, target)

    def forward(self, pred: torch.Tensor | CrossModalOutput, target: torch.Tensor,
                present: Presence | None = None) -> torch.Tensor:
        if isinstance(pred, torch.Tensor):
            return self._base(pred, target)
        loss = self._base(pred.fused, target)
        if self.aux_weight > 0 and pred.per_modality:
            terms = []
            for name, head in pred.per_modality.items():
                rows = present_rows(present, name, len(head))
                if rows is None:
                    terms.append(self._base(head, target))
                elif rows.any():
                    terms.append(self._base(head[rows], target[rows]))
            if terms:
                loss = loss + self.aux_weight * torch.stack(terms).mean()
        return loss


def sigmoid_rampup(step: float, length: float) -> float:
    """Laine & Aila's ramp ``exp(-5 (1 - t)^2)``, t = step / length clipped to [0, 1]; 1 when ``length`` <= 0.

    Example:
        >>> [round(sigmoid_rampup(s, 10), 3) for s in (0, 5, 10, 20)]
        [0.007, 0.287, 1.0, 1.0]
    """
    if length <= 0:
        return 1.0
    t = min(max(float(step) / float(length), 0.0), 1.0)
    return float(torch.exp(torch.tensor(-5.0 * (1.0 - t) ** 2)))


def soft_dice_distance(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 - soft Dice between two probability maps (B, C, ...), per sample and class, averaged: a scalar.

    Example:
        >>> p = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (1, 2 classes, 2 voxels)
        >>> round(soft_dice_distance(p, p).item(), 4), round(soft_dice_distance(p, p.flip(1)).item(), 4)
        (0.0, 1.0)
    """
    dims = tuple(range(2, p.ndim))
    inter = (p * q).sum(dims)
    denom = p.sum(dims) + q.sum(dims)
    return 1.0 - ((2 * inter + eps) / (denom + eps)).mean()


class InterModalConsistencyLoss(nn.Module):
    """The per-modality heads and the fused output agree on the same voxels (labels not needed).

    ``mode="dice"``: mean over the heads of 1 - soft Dice(softmax(head), softmax(fused)), gradients to both.
    ``mode="pseudo"``: the mean softmax of fused and heads (no gradient) gives a pseudo-label where its top
    probability is at least ``threshold``; cross-entropy of the fused output and of every head against it, on
    those voxels only (0 when none is confident).

    Args (forward):
        fused: (B, C, ...) logits. per_modality: {name: (B, C, ...)} logits of the present modalities.
        present: a head takes part on the samples that have its modality only.

    Example:
        >>> f = torch.tensor([[[4.0, -4.0], [-4.0, 4.0]]])  # (1, 2 classes, 2 voxels)
        >>> round(InterModalConsistencyLoss()(f, {"ct": f}).item(), 4)  # agreement: nearly 0
        0.0007
        >>> round(InterModalConsistencyLoss()(f, {"ct": -f}).item(), 4)  # full disagreement
        0.9993
        >>> round(InterModalConsistencyLoss()(f, {"ct": f, "pet": -f}, {"pet": torch.tensor([False])}).item(), 4)
        0.0007
    """

    def __init__(self, mode: str = "dice", threshold: float = 0.8) -> None:
        super().__init__()
        if mode not in ("dice", "pseudo"):
            raise ValueError(f"consistency mode {mode!r} is not one of ('dice', 'pseudo')")
        self.mode, self.threshold = mode, threshold

    def forward(self, fused: torch.Tensor, per_modality: dict[str, torch.Tensor],
                present: Presence | None = None) -> torch.Tensor:
        rows = {name: present_rows(present, name, len(fused)) for name in per_modality}
        heads = {name: h for name, h in per_modality.items() if (r := rows[name]) is None or bool(r.any())}
        if not heads:
            return fused.sum() * 0.0
        if self.mode == "dice":
            pf = torch.softmax(fused, 1)
            return torch.stack([soft_dice_distance(torch.softmax(h, 1), pf) if (r := rows[n]) is None else
                                soft_dice_distance(torch.softmax(h[r], 1), pf[r])
                                for n, h in heads.items()]).mean()
        shape = (len(fused),) + (1,) * (fused.ndim - 1)
        with torch.no_grad():
            probs = torch.stack([torch.softmax(t, 1) for t in (fused, *heads.values())])
            if all(rows[n] is None for n in heads):
                mean = probs.mean(0)
            else:  # each sample's mean over the fused output and the heads of the modalities it has
                every = torch.ones(len(fused), dtype=torch.bool, device=fused.device)
                w = torch.stack([every] + [every if (r := rows[n]) is None else r.to(fused.device) for n in heads])
                w = w.to(fused.dtype).view(len(w), *shape)
                mean = (probs * w).sum(0) / w.sum(0)
            conf, pseudo = mean.max(1)
            pseudo = pseudo.masked_fill(conf < self.threshold, IGNORE_INDEX)
        ce = PartialCrossEntropyLoss()
        terms = [ce(fused, pseudo)]
        for n, h in heads.items():  # a head is scored on its modality's samples only
            terms.append(ce(h, pseudo) if (r := rows[n]) is None else
                         ce(h, pseudo.masked_fill(~r.view(shape[:1] + shape[2:]), IGNORE_INDEX)))
        return torch.stack(terms).mean()


class AugmentationConsistencyLoss(nn.Module):
    """Intra-modal regularisation: predictions of a case and of its augmented copy (mapped back) agree.

    1 - soft Dice between the two softmax maps; both get gradients.

    Example:
        >>> a = torch.tensor([[[3.0, -3.0], [-3.0, 3.0]]])
        >>> round(AugmentationConsistencyLoss()(a, a).item(), 4)  # soft maps: 1 - sum p^2 / sum p, not 0
        0.0049
        >>> round(AugmentationConsistencyLoss()(a, -a).item(), 4)
        0.9951
    """

    def forward(self, logits: torch.Tensor, logits_augmented: torch.Tensor) -> torch.Tensor:
        return soft_dice_distance(torch.softmax(logits, 1), torch.softmax(logits_augmented, 1))


class ChannelConsistencyLoss(nn.Module):
    """Channel-wise semantic consistency: a case's modality-independent channels agree across its modalities.

    Works on spatially pooled per-channel descriptors (B, K) per level, so it needs no voxel alignment and its
    memory is linear in the channels: for every pair of present modalities and every level, 1 - cosine similarity
    of the channel-centred descriptors, averaged. 0 with a single modality.

    Args (forward):
        independent: {name: [(B, K_level), ...]} as in ``CrossModalOutput.independent``.
        present: a pair of modalities is compared on the samples that have both only.

    Example:
        >>> d = {"ct": [torch.tensor([[1.0, 2.0, 3.0]])], "mr": [torch.tensor([[2.0, 4.0, 6.0]])]}
        >>> round(ChannelConsistencyLoss()(d).item(), 4)  # same pattern, other scale
        0.0
        >>> d["mr"] = [torch.tensor([[3.0, 2.0, 1.0]])]
        >>> round(ChannelConsistencyLoss()(d).item(), 4)  # reversed pattern
        2.0
        >>> round(ChannelConsistencyLoss()(d, {"mr": torch.tensor([False])}).item(), 4)  # no MR: no pair
        0.0
    """

    def forward(self, independent: dict[str, list[torch.Tensor]], present: Presence | None = None) -> torch.Tensor:
        names = list(independent)
        if len(names) < 2:
            first = independent[names[0]][0] if names else torch.zeros(())
            return first.sum() * 0.0
        batch = len(independent[names[0]][0])
        rows = {n: present_rows(present, n, batch) for n in names}
        terms = []
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                ri, rj = rows[names[i]], rows[names[j]]
                both = ri if rj is None else rj if ri is None else ri & rj
                if both is not None and not bool(both.any()):
                    continue
                for a, b in zip(independent[names[i]], independent[names[j]], strict=True):
                    if both is not None:
                        a, b = a[both], b[both]
                    a = a - a.mean(1, keepdim=True)
                    b = b - b.mean(1, keepdim=True)
                    terms.append(1.0 - F.cosine_similarity(a, b, dim=1, eps=1e-6).mean())
        if not terms:
            return independent[names[0]][0].sum() * 0.0
        return torch.stack(terms).mean()
