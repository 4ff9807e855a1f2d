"""CrossModalNet: modality-specific encoders, order-free fusion of modality-independent channels, one decoder.

After CmFNet (Meng et al. 2025: modality-specific + cross-modal feature learning) and CMC (Zhou et al. 2024:
modality-independent knowledge merged in a unified fusion layer), with what neither has: any number of
modalities, any subset present (the fusion is a mean / max / normalised sum over the present modalities, so it
depends on neither their order nor their number), a CPU budget (narrow encoders; no convolution at full
resolution except the output layer), Monte-Carlo dropout and modality dropout.

Per level i, each present modality m gives features ``f_m`` (B, E_i, ...) from its own encoder, split into
modality-independent channels ``f_m[:, :K_i]`` and modality-specific ones ``f_m[:, K_i:]``. The fusion stream at
level i is ``act(norm(W [mean_m ind_m, max_m ind_m] + 1/n sum_m P_m spec_m))`` with ``P_m`` a 1x1 convolution of
modality m; a U-Net decoder over the fusion stream gives the fused logits; a 1x1 head on each modality's first
level gives its own logits (for consistency losses and active learning).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from crossmodal.config import CrossModalConfig


def recomputed(enabled: bool, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``; when ``enabled`` and gradients are recorded, its intermediate tensors are not kept for the
    backward pass but recomputed there (activation checkpointing: the same values and gradients, less memory, one
    more forward of ``fn``)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


@dataclass
class CrossModalOutput:
    """Fused logits (B, N, H, W, D); per-modality logits of the present modalities, same shape; per-level pooled
    modality-independent descriptors (B, K_i) of each present modality; optional MC-dropout fused samples."""

    fused: torch.Tensor
    per_modality: dict[str, torch.Tensor] = field(default_factory=dict)
    independent: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    mc_samples: torch.Tensor | None = None  # (T, B, N, H, W, D) with ``forward(mc_samples=T)``

    def as_dict(self) -> dict[str, torch.Tensor]:
        """``{"fused": ..., "<modality>": ...}``, the shape MONAI's sliding-window inferer stitches."""
        return {"fused": self.fused, **self.per_modality}


def _block(cin: int, cout: int, stride: int, convs: int = 1) -> nn.Sequential:
    """``convs`` x (3x3x3 convolution, instance norm, leaky ReLU); the first one strided."""
    layers: list[nn.Module] = []
    for j in range(convs):
        layers += [nn.Conv3d(cin if j == 0 else cout, cout, 3, stride=stride if j == 0 else 1, padding=1, bias=False),
                   nn.InstanceNorm3d(cout, affine=True), nn.LeakyReLU(0.01, inplace=True)]
    return nn.Sequential(*layers)


class ModalityEncoder(nn.Module):
    """One modality (B, 1, H, W, D) -> features per level; level i has ``channels[i]`` channels."""

    def __init__(self, channels: Sequence[int], strides: Sequence[int]) -> None:
        super().__init__()
        cins = [1, *channels[:-1]]
        self.levels = nn.ModuleList(_block(ci, co, s) for ci, co, s in zip(cins, channels, strides, strict=True))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for level in self.levels:
            x = level(x)
            feats.append(x)
        return feats


class FusionLevel(nn.Module):
    """Order- and number-free fusion of the present modalities at one level -> (B, width, ...)."""

    def __init__(self, names: Sequence[str], enc: int, independent: int, width: int) -> None:
        super().__init__()
        self.k = independent
        self.shared = nn.Conv3d(2 * independent, width, 1, bias=False)
        self.specific = nn.ModuleDict({n: nn.Conv3d(enc - independent, width, 1, bias=False) for n in names})
        self.norm = nn.InstanceNorm3d(width, affine=True)
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, feats: Mapping[str, torch.Tensor], weights: torch.Tensor | None = None,
                joint: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``weights`` (n, B), 1 / 0 per modality of ``feats`` and sample: fuse only each sample's present ones.
        ``joint``: per modality (B, width, ...) terms added to its specific projection (the joint stem's)."""
        ind = torch.stack([f[:, : self.k] for f in feats.values()])
        spec = torch.stack([self.specific[n](f[:, self.k :]) + (joint[n] if joint is not None else 0)
                            for n, f in feats.items()])
        if weights is None:
            shared = self.shared(torch.cat([ind.mean(0), ind.amax(0)], dim=1))
            return self.act(self.norm(shared + spec.mean(0)))
        w = weights.to(ind.dtype).view(*weights.shape, *[1] * (ind.ndim - 2))
        n = w.sum(0).clamp_min(1.0)
        mean = (ind * w).sum(0) / n
        top = ind.masked_fill(w == 0, torch.finfo(ind.dtype).min).amax(0)
        shared = self.shared(torch.cat([mean, top], dim=1))
        return self.act(self.norm(shared + (spec * w).sum(0) / n))


class CrossModalNet(nn.Module):
    """Cross-modal segmentation network for any non-empty subset of ``modalities``.

    Args:
        modalities: modality names; a tensor input's channels follow this order.
        num_classes: output classes N (background included).
        channels: widths of the fusion stream / decoder per level (e.g. 16, 32, 64, 128).
        strides: stride into each level but the last (MONAI UNet convention; the last level keeps the size).
        encoder_channels: widths of each modality's encoder per level (default: half of ``channels``).
        independent_fraction: share of each encoder level's channels that is modality-independent.
        dropout: dropout before each decoder level; active in training, or at inference with ``mc_dropout``.
        modality_dropout: in training, probability of dropping each modality of a batch (one always stays).
        joint_stem: add each raw modality's strided convolution to the first fusion level (see ``stem``).
        head_levels: encoder levels a per-modality head reads: 1, a 1x1 convolution on the first level; L > 1,
            the first L levels (deeper ones upsampled) concatenated, a 3x3x3 block, then the 1x1 convolution.
        checkpointing: in a forward that records gradients, recompute each encoder, fusion level and decoder
            level in the backward pass instead of keeping its activations (:func:`recomputed`).

    Example:
        >>> net = CrossModalNet(["ct", "pet"], num_classes=3, channels=(8, 16), strides=(2,)).eval()
        >>> out = net(torch.randn(1, 2, 16, 16, 16))
        >>> tuple(out.fused.shape), sorted(out.per_modality), tuple(out.independent["ct"][-1].shape)
        ((1, 3, 16, 16, 16), ['ct', 'pet'], (1, 4))
        >>> tuple(net({"pet": torch.randn(1, 1, 16, 16, 16)}).fused.shape)  # CT missing
        (1, 3, 16, 16, 16)
    """

    def __init__(self, modalities: Sequence[str], num_classes: int, channels: Sequence[int] = (16, 32, 64, 128),
                 strides: Sequence[int] = (2, 2, 2), encoder_channels: Sequence[int] | None = None,
                 independent_fraction: float = 0.5, dropout: float = 0.1, modality_dropout: float = 0.0,
                 joint_stem: bool = False, head_levels: int = 1, checkpointing: bool = False) -> None:
        super().__init__()
        if not modalities or len(set(modalities)) != len(modalities):
            raise ValueError(f"modalities {list(modalities)} must be unique and non-empty")
        if len(strides) != len(channels) - 1:
            raise ValueError(f"strides {tuple(strides)} needs len(channels) - 1 = {len(channels) - 1} entries")
        enc = list(encoder_channels) if encoder_channels else [max(2, c // 2) for c in channels]
        if len(enc) != len(channels):
            raise ValueError(f"encoder_channels {enc} needs {len(channels)} entries")
        if not 0.0 < independent_fraction < 1.0:
            raise ValueError(f"independent_fraction {independent_fraction} must be in (0, 1)")
        self.modalities = list(modalities)
        self.modality_dropout = modality_dropout
        self.checkpointing = checkpointing
        self.mc_dropout = False
        level_strides = [*strides, 1]
        self.encoders = nn.ModuleDict({m: ModalityEncoder(enc, level_strides) for m in self.modalities})
        ks = [max(1, min(e - 1, round(e * independent_fraction))) for e in enc]
        self.fusion = nn.ModuleList(FusionLevel(self.modalities, e, k, c) for e, k, c in zip(enc, ks, channels,
                                                                                          strict=True))
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in range(len(channels) - 2, -1, -1):  # deepest-but-one level up to level 0
            s = level_strides[i + 1]
            self.up.append(nn.ConvTranspose3d(channels[i + 1], channels[i], s, stride=s) if s > 1
                           else nn.Conv3d(channels[i + 1], channels[i], 1))
            self.dec.append(_block(2 * channels[i], channels[i], 1))
        self.dropout = float(dropout)
        s0 = level_strides[0]
        self.head = nn.ConvTranspose3d(channels[0], num_classes, s0, stride=s0) if s0 > 1 \
            else nn.Conv3d(channels[0], num_classes, 1)
        if not 1 <= head_levels <= len(channels):
            raise ValueError(f"head_levels {head_levels} must be in 1..{len(channels)} (the encoder levels)")
        self.head_levels = head_levels
        self.aux = nn.ModuleDict({m: nn.Conv3d(enc[0], num_classes, 1) if head_levels == 1 else
                                  nn.Sequential(_block(sum(enc[:head_levels]), enc[0], 1),
                                                nn.Conv3d(enc[0], num_classes, 1)) for m in self.modalities})
        self.first_stride = s0
        # joint stem: a strided 3x3x3 convolution of each raw modality into the first fusion level, averaged over
        # the present ones (early fusion's first layer, zero-filled for a missing modality): voxel-wise joint
        # intensities reach the fusion stream before any per-modality non-linearity
        self.stem = nn.ModuleDict({m: nn.Conv3d(1, channels[0], 3, stride=s0, padding=1, bias=False)
                                   for m in self.modalities}) if joint_stem else None

    def _split(self, x: torch.Tensor | Mapping[str, torch.Tensor], present: Sequence[bool] | None,
               available: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if isinstance(x, Mapping):
            unknown = sorted(set(x) - set(self.modalities))
            if unknown:
                raise ValueError(f"unknown modalities {unknown}; the network knows {self.modalities}")
            inputs = {m: x[m] for m in self.modalities if m in x}
        else:
            if x.shape[1] != len(self.modalities):
                raise ValueError(f"input has {x.shape[1]} channels, the network expects {len(self.modalities)} "
                                 f"({self.modalities})")
            inputs = {m: x[:, i : i + 1] for i, m in enumerate(self.modalities)}
        if present is not None:
            if len(present) != len(self.modalities):
                raise ValueError(f"present has {len(present)} entries for {len(self.modalities)} modalities")
            kept = {m for m, p in zip(self.modalities, present, strict=True) if p}
            inputs = {m: t for m, t in inputs.items() if m in kept}
        if self.training and self.modality_dropout > 0 and len(inputs) > 1:
            keep = torch.rand(len(inputs)) >= self.modality_dropout
            if not keep.any():
                keep[torch.randint(len(inputs), (1,))] = True
            if available is not None:  # every sample keeps one of the modalities its case has (its first)
                has = available[:, [self.modalities.index(m) for m in inputs]].cpu()
                for row in has:
                    if row.any() and not (row & keep).any():
                        keep[int(row.nonzero()[0])] = True
            inputs = {m: t for (m, t), k in zip(inputs.items(), keep.tolist(), strict=True) if k}
        if not inputs:
            raise ValueError("at least one modality must be present")
        return inputs

    def forward(self, x: torch.Tensor | Mapping[str, torch.Tensor], present: Sequence[bool] | None = None,
                heads: bool = True, mc_dropout: bool | None = None, mc_samples: int = 0,
                sample_present: torch.Tensor | None = None, available: torch.Tensor | None = None
                ) -> CrossModalOutput:
        """x: (B, M, H, W, D) in ``modalities`` order, or {name: (B, 1, H, W, D)} for any subset.

        H, W, D must be divisible by the product of the strides. ``heads=False`` skips the per-modality heads
        (``per_modality`` stays empty), for a fused-only inference. ``mc_dropout=True`` samples dropout in eval mode
        for this call only (thread-safe, unlike setting the ``mc_dropout`` attribute). ``mc_samples=T`` adds T
        Monte-Carlo dropout samples of the fused logits (T, B, N, H, W, D) that share one encoder and fusion pass
        (dropout sits in the decoder only) and one decoder pass with the plain output (batch (T + 1) B: meant for
        the scoring scale's small inputs), for uncertainty at a fraction of T full forwards.
        ``sample_present`` (B, M) bool, M in ``modalities`` order: per-sample modality subsets in one batch (each
        sample's fused output sees only its marked modalities; training's per-sample modality dropout). The
        per-modality heads are computed for every sample regardless. ``available`` (B, M) bool: the modalities each
        sample's case has (default: all); a sample whose marked ones the batch's ``modality_dropout`` left out falls
        back to those of the rest it has, never to a zero-filled absent one.
        """
        inputs = self._split(x, present, available)
        feats = {m: self._run(self.encoders[m], t) for m, t in inputs.items()}
        weights = None
        if sample_present is not None:
            if not bool(sample_present.any(1).all()):
                raise ValueError("sample_present leaves a sample without any modality")
            idx = [self.modalities.index(m) for m in inputs]
            weights = sample_present[:, idx].T.to(next(iter(inputs.values())).device)  # (n, B)
            empty = ~weights.any(0)  # its modalities were all left out of this batch: keep the rest (it has)
            weights[:, empty] = True if available is None else available[empty.cpu()][:, idx].T.to(weights.device)
        levels = len(self.fusion)
        joint = {m: self._run(self.stem[m], t) for m, t in inputs.items()} if self.stem is not None else None
        fused = [self._run(self.fusion[i], {m: f[i] for m, f in feats.items()}, weights, joint if i == 0 else None)
                 for i in range(levels)]
        mc = self.mc_dropout if mc_dropout is None else mc_dropout
        drop = self.dropout > 0 and (self.training or mc)
        if mc_samples:
            decoded = self._decode_batched(fused, [drop, *[True] * mc_samples])
            logits, samples = decoded[0], decoded[1:]
        else:
            logits, samples = self._decode(fused, drop), None
        size = logits.shape[2:]
        per_mod = {m: F.interpolate(self.aux[m](self._head_input(f)), size=size, mode="trilinear",
                                    align_corners=False) for m, f in feats.items()} if heads else {}
        independent = {m: [lvl[:, : self.fusion[i].k].mean(dim=(2, 3, 4)) for i, lvl in enumerate(f)]
                       for m, f in feats.items()}
        return CrossModalOutput(fused=logits, per_modality=per_mod, independent=independent, mc_samples=samples)

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return recomputed(self.checkpointing, fn, *args)

    def _head_input(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """A modality's first ``head_levels`` encoder levels on the first level's grid, concatenated (B, sum E_i,
        ...)."""
        if self.head_levels == 1:
            return feats[0]
        size = feats[0].shape[2:]
        return torch.cat([feats[0], *[F.interpolate(f, size=size, mode="trilinear", align_corners=False)
                                      for f in feats[1 : self.head_levels]]], 1)

    def _decode(self, fused: list[torch.Tensor], drop: bool) -> torch.Tensor:
        """The decoder over the fusion stream's levels; ``drop`` samples dropout before each level."""
        y = fused[-1]
        for j, (up, dec) in enumerate(zip(self.up, self.dec, strict=True)):
            i = len(fused) - 2 - j
            y = self._run(_up_level, up, dec, y, fused[i], self.dropout if drop else 0.0)
        return self.head(y)

    def _decode_batched(self, fused: list[torch.Tensor], drops: Sequence[bool]) -> torch.Tensor:
        """``len(drops)`` decodes of the fusion stream (B, ...) per level in one batched decoder pass -> (n, B, N,
        ...); decode t samples dropout where ``drops[t]``. The dropout masks are drawn beforehand in the order that
        ``n`` calls of :meth:`_decode` would draw them (decode by decode, level by level), so the result is theirs,
        for a fraction of the calls on small inputs (the scoring scale's)."""
        n, b, p = len(drops), fused[-1].shape[0], self.dropout
        ref = fused[-1]
        shapes = [(b, int(up.in_channels), 1, 1, 1) for up in self.up]  # type: ignore[arg-type]
        masks = [[torch.empty(shape, dtype=ref.dtype, device=ref.device).bernoulli_(1 - p).div_(1 - p)
                  if drop and p > 0 else torch.ones(shape, dtype=ref.dtype, device=ref.device)
                  for shape in shapes] for drop in drops]  # F.dropout3d's feature noise, drawn as it draws it
        y = ref.repeat(n, *[1] * (ref.ndim - 1))
        for j, (up, dec) in enumerate(zip(self.up, self.dec, strict=True)):
            skip = fused[len(fused) - 2 - j]
            noise = torch.cat([m[j] for m in masks])
            y = self._run(_up_level_masked, up, dec, y, skip.repeat(n, *[1] * (skip.ndim - 1)), noise)
        out = self.head(y)
        return out.view(n, b, *out.shape[1:])


def _up_level_masked(up: nn.Module, dec: nn.Module, y: torch.Tensor, skip: torch.Tensor,
                     noise: torch.Tensor) -> torch.Tensor:
    """:func:`_up_level` with its dropout given as the feature noise (B, C, 1, 1, 1) that multiplies ``y``."""
    return dec(torch.cat([up(y * noise), skip], dim=1))


def _up_level(up: nn.Module, dec: nn.Module, y: torch.Tensor, skip: torch.Tensor, dropout: float) -> torch.Tensor:
    """One decoder level: dropout (if > 0), upsample ``y``, concatenate the skip, convolve."""
    y = F.dropout3d(y, dropout, training=True) if dropout > 0 else y
    return dec(torch.cat([up(y), skip], dim=1))


def crossmodal_net(cfg: CrossModalConfig) -> CrossModalNet:
    """Build :class:`CrossModalNet` from ``cfg.model`` for ``cfg.modalities`` and ``cfg.labels``."""
    m = cfg.model
    return CrossModalNet(cfg.modality_names, cfg.labels.num_classes, channels=m.channels, strides=m.strides,
                         encoder_channels=m.encoder_channels or None, independent_fraction=m.independent_fraction,
                         dropout=m.dropout, modality_dropout=m.modality_dropout, joint_stem=m.joint_stem,
                         head_levels=m.head_levels)
