"""Hybrid supervision in one step: dense and sparse labels, unlabelled cases, one forward pass.

A step takes a batch from each source (dense, sparse, unlabelled; each source has its own shuffling loader,
see :class:`MultiSourceLoader`), runs the network once on ``[labelled, unlabelled, augmented unlabelled]`` and
adds, to the partial supervised loss on the labelled samples, ramped label-free terms on everything:
inter-modal consistency (heads vs fused), intra-modal consistency (the prediction of a flipped, intensity-jittered
copy that may also have lost modalities, flipped back, vs the plain prediction as its target) and channel-wise
semantic consistency (pooled modality-independent channels). With dense and unlabelled cases in a step, the
two also swap a cuboid (:func:`copy_paste`; targets from the truth and an :class:`EMATeacher`'s pseudo-labels),
and the mixes join the labelled part.
A case whose file of a secondary modality is absent (``infer.missing_modality: zero_fill``) trains with that
modality left out of its fusion (``present`` masks, (B, M) bool): its zero-filled channel is never read as an image,
and the terms of that modality's head and descriptors skip it.
One forward and one backward per step also keeps DistributedDataParallel happy.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
from monai.data import DataLoader, Dataset, ThreadDataLoader, list_data_collate
from monai.data.thread_buffer import ThreadBuffer
from torch import nn

from crossmodal.config import ConsistencyConfig
from crossmodal.errors import user_error_in
from crossmodal.labels import IGNORE_INDEX
from crossmodal.losses import (
    AugmentationConsistencyLoss,
    ChannelConsistencyLoss,
    InterModalConsistencyLoss,
    Presence,
    SupervisedLoss,
    sigmoid_rampup,
)
from crossmodal.nets import CrossModalOutput
from crossmodal.nets.crossmodal_net import recomputed

B = TypeVar("B")


def take(out: CrossModalOutput | torch.Tensor, start: int, stop: int) -> CrossModalOutput | torch.Tensor:
    """Samples ``start:stop`` of a batched network output."""
    if isinstance(out, torch.Tensor):
        return out[start:stop]
    return CrossModalOutput(fused=out.fused[start:stop],
                            per_modality={k: v[start:stop] for k, v in out.per_modality.items()},
                            independent={k: [d[start:stop] for d in v] for k, v in out.independent.items()})


@dataclass
class Augmentation:
    """A random flip (spatial axes of a (B, M, H, W, D) batch), a per-sample intensity scale and shift, and
    per-sample modality subsets (``present`` (B, M) bool; all True without modality dropout)."""

    axes: tuple[int, ...]
    scale: torch.Tensor  # (B, 1, 1, 1, 1)
    shift: torch.Tensor
    present: torch.Tensor | None = None

    @classmethod
    def sample(cls, batch: int, device: torch.device, generator: torch.Generator | None = None,
               jitter: float = 0.1, modalities: int = 1, modality_dropout: float = 0.0) -> Augmentation:
        """``modality_dropout``: probability that a sample's copy loses a random non-empty proper subset of its
        ``modalities`` (the fused prediction of the rest must match the full one: missing-modality robustness
        learned by consistency, while the plain samples always train with every modality)."""
        flips = torch.rand(3, generator=generator) < 0.5
        if not flips.any():
            flips[torch.randint(3, (1,), generator=generator)] = True
        scale = 1 + jitter * (2 * torch.rand(batch, 1, 1, 1, 1, generator=generator) - 1)
        shift = jitter * (2 * torch.rand(batch, 1, 1, 1, 1, generator=generator) - 1)
        present = torch.ones(batch, modalities, dtype=torch.bool)
        if modalities > 1 and modality_dropout > 0:
            for b in range(batch):
                if float(torch.rand(1, generator=generator)) < modality_dropout:
                    keep = int(torch.randint(1, modalities, (1,), generator=generator))  # 1 .. M-1 stay
                    present[b] = False
                    present[b, torch.randperm(modalities, generator=generator)[:keep]] = True
        return cls(tuple(2 + i for i in range(3) if flips[i]), scale.to(device), shift.to(device), present)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flip(x * self.scale + self.shift, self.axes)

    def invert(self, y: torch.Tensor) -> torch.Tensor:
        """Map a prediction (B, C, H, W, D) of the augmented input back onto the original voxels."""
        return torch.flip(y, self.axes)


class HybridLoss(nn.Module):
    """Supervised partial loss on the labelled part + ramped consistency terms on all parts.

    ``forward`` returns the total loss and its parts (detached floats, for the logs and the viewers' stats).
    """

    def __init__(self, supervised: SupervisedLoss, cfg: ConsistencyConfig) -> None:
        super().__init__()
        self.supervised, self.cfg = supervised, cfg
        self.inter = InterModalConsistencyLoss(cfg.inter_mode, cfg.pseudo_threshold)
        self.intra = AugmentationConsistencyLoss()
        self.channel = ChannelConsistencyLoss()

    @property
    def checkpointing(self) -> bool:
        """Whether every loss term is recomputed in the backward pass (:func:`recomputed`); the supervised loss's
        flag, so the two cannot disagree."""
        return self.supervised.checkpointing

    @checkpointing.setter
    def checkpointing(self, on: bool) -> None:
        self.supervised.checkpointing = on

    def forward(self, out: CrossModalOutput | torch.Tensor, target: torch.Tensor | None, n_labeled: int,
                n_plain: int, aug: Augmentation | None, step: int, present: Presence | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        """``out`` covers ``[labelled (n_labeled), unlabelled (n_plain - n_labeled), augmented copies of the last
        plain samples (the rest): the unlabelled part, or the pseudo-labelled cases ending the labelled one]``;
        ``target`` (n_labeled, 1, H, W, D) with ``IGNORE_INDEX`` off the annotation; ``present`` {modality:
        (>= n_plain,) bool}: the samples that have it (None: all have every modality)."""
        fused = out if isinstance(out, torch.Tensor) else out.fused
        parts: dict[str, torch.Tensor] = {}
        zero = fused.sum() * 0.0

        def first(n: int) -> Presence | None:
            return None if present is None else {k: v[:n] for k, v in present.items()}

        parts["supervised"] = self.supervised(take(out, 0, n_labeled), target, first(n_labeled)) \
            if n_labeled and target is not None else zero
        ramp = sigmoid_rampup(step, self.cfg.rampup_iterations)
        total = parts["supervised"]
        if isinstance(out, CrossModalOutput) and self.cfg.active:
            plain = take(out, 0, n_plain)
            assert isinstance(plain, CrossModalOutput)
            parts["inter"] = recomputed(self.checkpointing, self.inter, plain.fused, plain.per_modality,
                                        first(n_plain)) if self.cfg.inter_weight else zero
            parts["channel"] = self.channel(plain.independent, first(n_plain)) if self.cfg.channel_weight else zero
            n_aug = fused.shape[0] - n_plain
            if aug is not None and n_aug > 0 and self.cfg.intra_weight:  # the plain prediction is the target
                parts["intra"] = recomputed(self.checkpointing, self.intra, fused[n_plain - n_aug : n_plain].detach(),
                                            aug.invert(fused[n_plain:]))
            else:
                parts["intra"] = zero
            total = total + ramp * (self.cfg.inter_weight * parts["inter"] + self.cfg.intra_weight * parts["intra"]
                                    + self.cfg.channel_weight * parts["channel"])
        stats = {k: float(v.detach()) for k, v in parts.items()}
        stats["ramp"] = ramp
        return total, stats


def hybrid_batch(labeled: list[tuple[torch.Tensor, torch.Tensor]], unlabeled: list[torch.Tensor],
                 generator: torch.Generator | None = None, augment: bool = True, modality_dropout: float = 0.0,
                 present: torch.Tensor | None = None, n_augmented: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, int, int, Augmentation | None]:
    """Stack one step's inputs: ``(x, target, n_labeled, n_plain, aug)`` for :class:`HybridLoss`.

    ``labeled``: (image (b, M, ...), target (b, 1, ...)) per labelled source; ``unlabeled``: images. Without an
    unlabelled batch the last labelled sample is the one augmented (intra-modal consistency still applies).
    ``augment=False`` (a plain network, supervised only): no augmented copies, ``aug`` is None.
    ``modality_dropout``: see :meth:`Augmentation.sample`; the network then takes :func:`sample_present`.
    ``present`` (n_plain, M) bool: the modalities the plain samples have; a copy keeps only what its case has
    (a dropout that would leave it nothing leaves it its case's own). ``n_augmented``: copies of the last that
    many samples instead (pseudo-labelled unlabelled cases passed as labelled ones).
    """
    xs = [x for x, _ in labeled]
    ys = [y for _, y in labeled]
    n_labeled = sum(len(x) for x in xs)
    plain = torch.cat(xs + unlabeled) if xs or unlabeled else None
    if plain is None:
        raise ValueError("a step needs at least one labelled or unlabelled sample")
    target = torch.cat(ys) if ys else None
    if not augment:
        return plain, target, n_labeled, len(plain), None
    n_source = n_augmented or sum(len(u) for u in unlabeled) or 1  # copies of the last n_source samples
    source = plain[len(plain) - n_source :]
    aug = Augmentation.sample(len(source), plain.device, generator, modalities=plain.shape[1],
                              modality_dropout=modality_dropout)
    if present is not None and aug.present is not None:  # sample() sets aug.present
        own = present[len(plain) - n_source :].to(torch.bool).cpu()
        kept = own & aug.present
        aug.present = torch.where(kept.any(1, keepdim=True), kept, own)
    x = torch.cat([plain, aug.apply(source)])
    return x, target, n_labeled, len(plain), aug


def sample_present(n_plain: int, aug: Augmentation | None, present: torch.Tensor | None = None
                   ) -> torch.Tensor | None:
    """(B, M) modality mask of a :func:`hybrid_batch` batch: ``present`` (n_plain, M) for the plain samples (None:
    every modality), ``aug.present`` for the copies; None when every sample has every modality (the network's
    ordinary fusion).

    Example:
        >>> sample_present(2, None, torch.tensor([[True, True], [True, False]])).tolist()
        [[True, True], [True, False]]
        >>> sample_present(2, None, torch.ones(2, 2, dtype=torch.bool)) is None
        True
    """
    parts = []
    if present is not None:
        parts.append(present.to(torch.bool).cpu())
    if aug is not None and aug.present is not None:
        parts = parts or [torch.ones(n_plain, aug.present.shape[1], dtype=torch.bool)]
        parts.append(aug.present)
    if not parts or bool(torch.cat(parts).all()):
        return None
    return torch.cat(parts)


def sample_available(n_plain: int, aug: Augmentation | None, present: torch.Tensor | None) -> torch.Tensor | None:
    """(B, M) bool: the modalities the case of each sample of a :func:`hybrid_batch` batch has (a copy: its
    source's), for the network's ``available``; None when ``present`` is (every case has every modality).

    Example:
        >>> aug = Augmentation((2,), torch.ones(1, 1, 1, 1, 1), torch.zeros(1, 1, 1, 1, 1), None)
        >>> sample_available(2, aug, torch.tensor([[True, True], [True, False]])).tolist()
        [[True, True], [True, False], [True, False]]
    """
    if present is None:
        return None
    present = present.to(torch.bool).cpu()
    n_aug = len(aug.scale) if aug is not None else 0
    return torch.cat([present, present[n_plain - n_aug :]]) if n_aug else present


def copy_paste(x_l: torch.Tensor, y_l: torch.Tensor, x_u: torch.Tensor, pseudo: torch.Tensor,
               generator: torch.Generator | None = None, fraction: float = 2 / 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Bidirectional copy-paste (Bai et al., BCP, CVPR 2023): labelled and unlabelled cases swap a random cuboid.

    ``x_l`` (n, M, H, W, D) with target ``y_l`` (n, 1, H, W, D); ``x_u`` (n, M, H, W, D) with its teacher
    ``pseudo``-label (n, 1, H, W, D; ``IGNORE_INDEX`` where not confident). One cuboid of ``fraction`` of each
    side, placed at random (shared by the batch): returns ``x`` (2n, M, ...) = [labelled with the unlabelled
    cuboid inside, unlabelled with the labelled cuboid inside] and its target (2n, 1, ...) assembled likewise, so
    the labelled case's truth is seen in the unlabelled cases' context and vice versa.

    Example:
        >>> x_l, y_l = torch.ones(1, 2, 3, 3, 3), torch.ones(1, 1, 3, 3, 3)
        >>> x, y = copy_paste(x_l, y_l, torch.zeros_like(x_l), torch.zeros_like(y_l), fraction=1 / 3)
        >>> x.shape, int(x[0].sum()), int(x[1].sum()), int(y[0].sum()), int(y[1].sum())  # one voxel swapped
        (torch.Size([2, 2, 3, 3, 3]), 52, 2, 26, 1)
    """
    spatial = x_l.shape[2:]
    mask = torch.zeros(spatial, dtype=torch.bool, device=x_l.device)
    box = []
    for size in spatial:
        side = max(1, round(fraction * size))
        start = int(torch.randint(size - side + 1, (1,), generator=generator))
        box.append(slice(start, start + side))
    mask[tuple(box)] = True
    x = torch.cat([torch.where(mask, x_u, x_l), torch.where(mask, x_l, x_u)])
    y = torch.cat([torch.where(mask, pseudo.to(y_l.dtype), y_l), torch.where(mask, y_l, pseudo.to(y_l.dtype))])
    return x, y


class EMATeacher:
    """An exponential moving average of the student's weights (mean teacher) that gives pseudo-labels."""

    def __init__(self, network: nn.Module, decay: float = 0.99) -> None:
        self.decay = decay
        self.model = copy.deepcopy(getattr(network, "module", network)).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        """teacher <- decay x teacher + (1 - decay) x student (buffers copied)."""
        student = getattr(network, "module", network)
        for t, s in zip(self.model.parameters(), student.parameters(), strict=True):
            t.lerp_(s.detach(), 1.0 - self.decay)
        for t, s in zip(self.model.buffers(), student.buffers(), strict=True):
            t.copy_(s)

    @torch.no_grad()
    def pseudo_label(self, x: torch.Tensor, threshold: float, present: torch.Tensor | None = None) -> torch.Tensor:
        """(n, M, ...) images -> (n, 1, ...) argmax of the fused softmax, ``IGNORE_INDEX`` below ``threshold``;
        ``present`` (n, M) bool: each sample's modalities (None: all)."""
        out = self.model(x) if present is None or bool(present.all()) else self.model(x, sample_present=present)
        fused = out if isinstance(out, torch.Tensor) else out.fused
        conf, label = torch.softmax(fused, 1).max(1, keepdim=True)
        return label.masked_fill(conf < threshold, IGNORE_INDEX)


class MultiSourceLoader:
    """Several data loaders stepped together: each step yields ``{source: batch}`` from every source.

    An epoch lasts as long as the longest loader; a shorter one starts over (reshuffled by its own sampler), so
    every case of every source is seen each epoch - no ``zip`` truncation. ``caps`` bound the steps a source adds
    to the epoch (a large unlabelled pool must not make each epoch hundreds of steps long): a source longer than the
    epoch goes on, next epoch, where it stopped, so its cases are all seen, in turn, over the epochs.
    """

    def __init__(self, loaders: Mapping[str, torch.utils.data.DataLoader], caps: Mapping[str, int] | None = None
                 ) -> None:
        self.loaders = {k: v for k, v in loaders.items() if len(v) > 0}
        if not self.loaders:
            raise ValueError("no data: every source is empty")
        self.caps = {k: max(1, int(v)) for k, v in (caps or {}).items()}
        self._carried: dict[str, Iterator] = {}

    def __len__(self) -> int:
        return max(min(len(v), self.caps.get(k, len(v))) for k, v in self.loaders.items())

    def __iter__(self) -> Iterator[dict[str, object]]:
        """Batches ``{source: batch}``; where one fails (a case error, a bug) or the epoch is abandoned, every
        source's worker processes are stopped there and then: left to the garbage collector (the error's traceback
        and the engines hold reference cycles) each loader's took 5 s to stop, its queue's feeder gone first."""
        steps = len(self)
        iters = {k: self._carried.pop(k) if k in self._carried else iter(v) for k, v in self.loaders.items()}
        try:
            for _ in range(steps):
                batch = {}
                for k, loader in self.loaders.items():
                    try:
                        batch[k] = raise_carried(next(iters[k]))
                    except StopIteration:
                        iters[k] = iter(loader)
                        batch[k] = raise_carried(next(iters[k]))
                yield batch
        except BaseException:
            for it in iters.values():
                stop_workers(it)
            raise
        self._carried = {k: iters[k] for k, v in self.loaders.items() if len(v) > steps}


def stop_workers(iterator: Iterator) -> None:
    """Stops the worker processes of a data loader's ``iterator`` now, not when the garbage collector gets to it:
    torch's multiprocessing iterator shut down; a generator (:class:`RaisingThreadDataLoader`'s) closed, which lets its
    buffer's thread and loader iterator go while nothing else holds them."""
    stop = getattr(iterator, "_shutdown_workers", None) or getattr(iterator, "close", None)  # a generator: closed
    if callable(stop):
        stop()


class CarriedError:
    """A user error (:class:`~crossmodal.errors.CaseError`, ``ConfigError``) met in a loader's worker process,
    sent back as the batch: the worker's own exception reaches this process only as traceback text in a
    ``RuntimeError``, so the case and the file it names would be lost to :func:`crossmodal.errors.user_error_in`."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class CarryUserErrors(Dataset):
    """``dataset`` whose items are a :class:`CarriedError` where loading one raised a user error (anything else,
    a bug, raises as it did)."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        super().__init__(dataset)  # type: ignore[arg-type]  # MONAI's Dataset indexes any sequence-like data

    def __getitem__(self, index: int) -> object:  # type: ignore[override]
        try:
            return self.data[index]
        except Exception as e:
            found = user_error_in(e)
            if found is None:
                raise
            return CarriedError(found)


def collate_carrying(items: list[object]) -> object:
    """MONAI's ``list_data_collate``, or the first :class:`CarriedError` among ``items``."""
    return next((i for i in items if isinstance(i, CarriedError)), None) or list_data_collate(items)


def raise_carried(batch: B) -> B:
    """``batch`` as it is, or the user error a worker carried in it, raised here."""
    if isinstance(batch, CarriedError):
        raise batch.error
    return batch


class _RaisingBuffer(ThreadBuffer):
    """MONAI's ``ThreadBuffer``, raising in the consumer what its thread raised once the items before it are out."""

    error: BaseException | None = None

    def enqueue_values(self) -> None:
        try:
            super().enqueue_values()
        except BaseException as e:  # handed to __iter__; a thread's exception otherwise only reaches stderr
            self.error = e

    def __iter__(self) -> Iterator[object]:
        self.error = None
        yield from super().__iter__()
        if self.error is not None:
            raise self.error


class RaisingThreadDataLoader(ThreadDataLoader):
    """MONAI's ``ThreadDataLoader`` whose epoch fails where a batch fails to load: MONAI's ends the epoch there,
    silently (its buffer thread dies, the iteration stops): a training case that does not read went untrained, a
    held-out one emptied validation (a 500: "the data to aggregate must be PyTorch Tensor, got NoneType")."""

    def __iter__(self) -> Iterator[object]:  # type: ignore[override]  # as MONAI's: a generator of batches
        for batch in _RaisingBuffer(DataLoader.__iter__(self), self.buffer_size, self.buffer_timeout):
            for _ in range(self.repeats):
                yield batch

