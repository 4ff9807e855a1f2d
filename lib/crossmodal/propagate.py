"""Sparse labels grown along the images' edges before training: a multi-channel random walker (Grady, 2006).

Scribbles mark a few per cent of a case, mostly away from boundaries, so a partial loss learns where structures
are but not where they end; thin structures (vessels) get a handful of voxels. A random walker over all the
modalities of the case (edge weights from the summed squared gradients of every channel) gives each voxel the
probability that a walker starting there first reaches a scribble of each class; voxels where one class reaches
``threshold`` join the label, the rest stay unannotated (``IGNORE_INDEX``), and the drawn voxels are kept as
drawn. Cases over ``max_voxels`` are propagated on a coarser grid. Whether the walker can be trusted on a case is
checked on the case itself (:func:`heldout_accuracy`: grow every other stroke, score the strokes left out); a case
that fails keeps its drawn voxels only. :class:`PropagationCache` keeps each grown label
on disk under a key of the label, the image and the settings, so a training that reads its cases every epoch, and
the next training of the annotate-retrain loop, walk only the labels that changed.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from skimage.segmentation import random_walker

from crossmodal.io import read_cached_label, write_cached_label
from crossmodal.labels import IGNORE_INDEX

logger = logging.getLogger(__name__)


def propagate_labels(image: torch.Tensor, target: torch.Tensor, beta: float = 130.0, threshold: float = 0.5,
                     max_voxels: int = 2_000_000) -> torch.Tensor:
    """Grow a sparse training label over the voxels the random walker assigns with confidence.

    Args:
        image: (M, H, W, D) normalised modalities of the case.
        target: (1, H, W, D) class indices, ``IGNORE_INDEX`` where nothing was drawn.
        beta: edge sensitivity of the walker (larger: stops harder at intensity edges).
        threshold: probability a voxel's best class needs to be labelled.
        max_voxels: cases with more voxels are propagated on a grid coarsened by a whole factor per axis.

    Returns:
        (1, H, W, D) like ``target``: drawn voxels unchanged, confident ones filled in, the rest ``IGNORE_INDEX``.
        Unchanged when fewer than two classes are drawn (one class alone would claim the whole case) or when
        nothing is left unannotated.

    Example:
        >>> img = torch.zeros(1, 8, 8, 8); img[:, 4:] = 1.0
        >>> t = torch.full((1, 8, 8, 8), -1.0); t[0, 1, 4, 4] = 0; t[0, 6, 4, 4] = 1
        >>> out = propagate_labels(img, t)
        >>> int((out[0, :4] == 0).sum()), int((out[0, 4:] == 1).sum())  # each half takes its scribble's class
        (256, 256)
    """
    device = target.device
    image, seeds = image.detach().cpu(), target[0].detach().cpu().long()  # the walker runs on the CPU (SciPy)
    drawn = seeds != IGNORE_INDEX
    classes = torch.unique(seeds[drawn])
    if len(classes) < 2 or bool(drawn.all()):
        return target
    shape = tuple(seeds.shape)
    factor = max(1, math.ceil((math.prod(shape) / max_voxels) ** (1 / 3)))
    small = tuple(math.ceil(s / factor) for s in shape)
    data, marks = image.float(), seeds
    if factor > 1:  # average the images; a coarse voxel keeps a scribble when exactly one class is drawn in it
        data = F.interpolate(image[None].float(), size=small, mode="area")[0]
        hits = torch.stack([F.adaptive_max_pool3d((seeds == c).float()[None, None], small)[0, 0] for c in classes])
        marks = torch.where(hits.sum(0) == 1, classes[hits.argmax(0)], torch.full(small, IGNORE_INDEX))
    rw_seeds = (marks + 1).numpy().astype(np.int32)  # random_walker: 0 = to solve, k + 1 = class k
    present = np.unique(rw_seeds[rw_seeds > 0])
    if len(present) < 2:
        return target
    with warnings.catch_warnings():  # the CG solver's probabilities overshoot [0, 1] by its tolerance
        warnings.simplefilter("ignore", UserWarning)
        prob = random_walker(np.moveaxis(data.numpy(), 0, -1), rw_seeds, beta=beta, mode="cg_j", tol=1e-3,
                             channel_axis=-1, return_full_prob=True)
    prob_t = torch.from_numpy(np.ascontiguousarray(prob, dtype=np.float32))
    if factor > 1:
        prob_t = F.interpolate(prob_t[None], size=shape, mode="trilinear", align_corners=False)[0]
    best, idx = prob_t.max(0)
    grown = torch.from_numpy(present - 1)[idx]
    out = torch.where(best >= threshold, grown, torch.full_like(grown, IGNORE_INDEX))
    out = torch.where(drawn, seeds, out)
    return out[None].to(device=device, dtype=target.dtype)


def refine_segmentation(image: torch.Tensor, segmentation: torch.Tensor, num_classes: int, erode: int = 1,
                        beta: float = 130.0, threshold: float = 0.5, max_voxels: int = 2_000_000,
                        confidence: torch.Tensor | None = None, keep_confident: float = 1.0) -> torch.Tensor:
    """A network's segmentation re-decided along the images' edges: a pseudo-label for an unlabelled case.

    Every class keeps the interior of its predicted region (eroded by ``erode`` voxels); the band around every
    predicted boundary is left to the random walker (:func:`propagate_labels`), which moves each boundary to the
    images' edges. A network trained on a few cases finds the structures but blurs where they end; the walker
    needs the structures found but places their ends.

    Args:
        image: (M, H, W, D) normalised modalities. segmentation: (1, H, W, D) or (H, W, D) class indices.
        num_classes: classes of the segmentation, background included.
        erode: voxels taken off every predicted region (a region thinner than 2 x ``erode`` + 1 keeps its voxels
            and is not re-decided).
        confidence: (H, W, D) the network's top class probability; voxels where it reaches ``keep_confident`` keep
            the predicted class (only the unsure part of each band is re-decided; 1.0: the whole band).

    Returns:
        (1, H, W, D) float class indices, ``IGNORE_INDEX`` where the walker stays below ``threshold``.

    Example:
        >>> img = torch.zeros(1, 12, 12, 12); img[:, 6:] = 1.0  # the edge lies between rows 5 and 6
        >>> seg = torch.zeros(12, 12, 12, dtype=torch.long); seg[5:] = 1  # the network's boundary: a row early
        >>> out = refine_segmentation(img, seg, 2)
        >>> int((out[0, :6] == 0).sum()), int((out[0, 6:] == 1).sum())  # back on the edge
        (864, 864)
    """
    seg = segmentation.reshape(segmentation.shape[-3:]).detach().cpu().long()
    seeds = torch.full(seg.shape, IGNORE_INDEX, dtype=torch.long)
    for c in range(num_classes):
        region = (seg == c).float()[None, None]
        inner = region
        if erode > 0:  # erosion = 1 - dilation of the complement (3 x 3 x 3 neighbourhood)
            inner = 1.0 - F.max_pool3d(1.0 - region, 2 * erode + 1, stride=1, padding=erode)
        inner_b = inner[0, 0] > 0.5
        if not bool(inner_b.any()):
            inner_b = region[0, 0] > 0.5  # too thin to erode: kept as predicted
        seeds[inner_b] = c
    if confidence is not None and keep_confident < 1.0:
        sure = confidence.reshape(seg.shape).detach().cpu() >= keep_confident
        seeds[sure] = seg[sure]
    return propagate_labels(image, seeds[None].float(), beta, threshold, max_voxels)


def heldout_accuracy(image: torch.Tensor, target: torch.Tensor, beta: float = 130.0, threshold: float = 0.5,
                     max_voxels: int = 2_000_000) -> float | None:
    """How right the walker is on this case, measured on its own strokes: along the axis the strokes were drawn on
    (the one whose fewest slices hold drawn voxels, among those where the slices kept still hold every class of the
    slices left out), every other drawn slice is left out, the rest grown, and the left-out drawn voxels it labels
    are scored against their drawn class.

    Args: as :func:`propagate_labels`; ``target`` (1, H, W, D).

    Returns:
        The fraction right in [0, 1]; None when no axis gives such a split or the walk labels none of the left-out
        voxels.
    """
    seeds = target[0].detach().cpu().long()
    drawn = seeds != IGNORE_INDEX
    splits = []
    for axis in range(3):
        slices = torch.nonzero(drawn.movedim(axis, 0).flatten(1).any(1), as_tuple=True)[0]
        held = torch.zeros_like(drawn)
        held.movedim(axis, 0)[slices[1::2]] = True
        held &= drawn
        kept_classes = set(torch.unique(seeds[drawn & ~held]).tolist())
        if len(slices) >= 2 and len(kept_classes) >= 2 and set(torch.unique(seeds[held]).tolist()) <= kept_classes:
            splits.append((len(slices), held))  # every class left out is still drawn on the slices kept
    if not splits:
        return None
    held = min(splits, key=lambda x: x[0])[1]  # the drawing axis: strokes on the fewest slices
    kept = torch.where(held, torch.full_like(seeds, IGNORE_INDEX), seeds)
    grown = propagate_labels(image, kept[None].to(target.dtype), beta, threshold, max_voxels)[0].long()
    scored = held & (grown != IGNORE_INDEX)
    if not bool(scored.any()):
        return None
    return float((grown[scored] == seeds[scored]).float().mean())


def grow_checked(image: torch.Tensor, target: torch.Tensor, beta: float = 130.0, threshold: float = 0.5,
                 max_voxels: int = 2_000_000, min_heldout_accuracy: float = 0.0,
                 case_id: str = "case") -> tuple[torch.Tensor, float | None]:
    """:func:`propagate_labels` if :func:`heldout_accuracy` reaches ``min_heldout_accuracy`` (or cannot be measured,
    or the minimum is 0), else ``target`` unchanged (with a warning naming ``case_id``); returns the (1, H, W, D)
    label and the measured accuracy."""
    accuracy = heldout_accuracy(image, target, beta, threshold, max_voxels) if min_heldout_accuracy > 0 else None
    if accuracy is not None and accuracy < min_heldout_accuracy:
        logger.warning(f"{case_id}: the random walker labels only {accuracy:.1%} of the held-out strokes right "
                       f"(train.propagate.min_heldout_accuracy {min_heldout_accuracy}); training on the drawn voxels "
                       f"only")
        return target, accuracy
    return propagate_labels(image, target, beta, threshold, max_voxels), accuracy


def cache_key(image: torch.Tensor, target: torch.Tensor, **settings: float) -> str:
    """A digest of (M, H, W, D) ``image``, (1, H, W, D) ``target`` and the propagation settings."""
    h = hashlib.blake2b(digest_size=12)
    h.update(repr((tuple(image.shape), sorted(settings.items()))).encode())
    h.update(torch.as_tensor(target).detach().cpu().to(torch.int16).contiguous().numpy().tobytes())
    h.update(torch.as_tensor(image).detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()


class PropagationCache:
    """Grown labels on disk: ``<folder>/<case_id>.<key>.npz`` (int8, compressed: labels shrink ~100x), written
    atomically, one file per case
    (a new label of a case replaces its older file).

    Example:
        >>> import tempfile
        >>> img = torch.zeros(1, 8, 8, 8); img[:, 4:] = 1.0
        >>> t = torch.full((1, 8, 8, 8), -1.0); t[0, 1, 4, 4] = 0; t[0, 6, 4, 4] = 1
        >>> cache = PropagationCache(tempfile.mkdtemp())
        >>> first, hit = cache.propagate("case0", img, t)
        >>> second, hit_again = cache.propagate("case0", img, t)
        >>> hit, hit_again, bool((first == second).all())
        (False, True, True)
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def path(self, case_id: str, key: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in case_id)
        return self.folder / f"{safe}.{key}.npz"

    def propagate(self, case_id: str, image: torch.Tensor, target: torch.Tensor, beta: float = 130.0,
                  threshold: float = 0.5, max_voxels: int = 2_000_000,
                  min_heldout_accuracy: float = 0.0) -> tuple[torch.Tensor, bool]:
        """:func:`grow_checked` through the cache; returns the (1, H, W, D) label and whether it was read from the
        cache."""
        key = cache_key(image, target, beta=beta, threshold=threshold, max_voxels=max_voxels,
                        min_heldout_accuracy=min_heldout_accuracy)
        path = self.path(case_id, key)
        if path.is_file():
            try:
                arr = read_cached_label(path, tuple(target.shape))
                return torch.from_numpy(arr.astype(np.float32)).to(device=target.device, dtype=target.dtype), True
            except ValueError as e:
                logger.warning(f"{case_id}: cached propagation {path} {e}; propagating again")
        grown, _ = grow_checked(image, target, beta, threshold, max_voxels, min_heldout_accuracy, case_id)
        small = torch.int8 if int(grown.max()) < 128 else torch.int16  # IGNORE_INDEX -1 and the classes
        self._store(path, grown.detach().cpu().to(small).numpy())
        return grown, False

    def _store(self, path: Path, arr: np.ndarray) -> None:
        write_cached_label(path, arr)
        stem = path.name.split(".")[0]
        for old in self.folder.glob(f"{stem}.*.npz"):
            if old != path and len(old.name.split(".")) == 3:
                old.unlink(missing_ok=True)
