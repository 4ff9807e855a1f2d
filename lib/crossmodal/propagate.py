"""Sparse labels grown along the images' edges before training: a multi-channel random walker (Grady, 2006).

Scribbles mark a few per cent of a case, mostly away from boundaries, so a partial loss learns where structures
are but not where they end; thin structures (vessels) get a handful of voxels. A random walker over all the
modalities of the case (edge weights from the summed squared gradients of every channel) gives each voxel the
probability that a walker starting there first reaches a scribble of each class; voxels where one class reaches
``threshold`` join the label, the rest stay unannotated (``IGNORE_INDEX``), and the drawn voxels are kept as
drawn. It runs once per case (a cached transform), on a coarser grid for cases over ``max_voxels``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from skimage.segmentation import random_walker

from crossmodal.labels import IGNORE_INDEX


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
    seeds = target[0].long()
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
    return out[None].to(target.dtype)
