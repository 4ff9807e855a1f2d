"""Simulated sparse annotation: what annotators really draw, made from a dense label.

* ``scribbles``: per slice along ``axis``, each class mask (background included) is eroded a random number of
  times and skeletonised, as in the scribble literature (DMSPS, WORD); background strokes become
  ``marked_background``.
* ``slices``: every ``step``-th slice painted in full (its background as ``marked_background``).

Both return a saved-label map in the viewer convention of :mod:`crossmodal.labels` (0 = not annotated).
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_erosion
from skimage.morphology import skeletonize

from crossmodal.config import LabelConfig

MODES = ("scribbles", "slices")


def scribbles(label: np.ndarray, cfg: LabelConfig, rng: np.random.Generator, axis: int = 2, step: int = 1,
              erosion: tuple[int, int] = (1, 4)) -> np.ndarray:
    """Skeleton scribbles of every class on every ``step``-th slice along ``axis`` (H, W, D) -> (H, W, D)."""
    out = np.zeros(label.shape, dtype=np.uint8 if cfg.marked_background < 256 else np.uint16)
    lab = np.moveaxis(label, axis, 0)
    view = np.moveaxis(out, axis, 0)
    for z in range(0, lab.shape[0], step):
        sl = lab[z]
        for value in np.unique(sl):
            mask = sl == value
            iters = int(rng.integers(erosion[0], erosion[1] + 1))
            eroded = binary_erosion(mask, iterations=iters)
            if not eroded.any():  # small structure on this slice: erode less, keep what survives
                eroded = binary_erosion(mask, iterations=1) if mask.sum() > 8 else mask
            skel = skeletonize(eroded)
            view[z][skel] = cfg.marked_background if value == 0 else value
    return out


def painted_slices(label: np.ndarray, cfg: LabelConfig, axis: int = 2, step: int = 5,
                   offset: int = 0) -> np.ndarray:
    """Every ``step``-th slice along ``axis`` (from ``offset``) painted in full, the rest left blank."""
    out = np.zeros(label.shape, dtype=np.uint8 if cfg.marked_background < 256 else np.uint16)
    src = np.moveaxis(label, axis, 0)
    view = np.moveaxis(out, axis, 0)
    for z in range(offset, src.shape[0], step):
        view[z] = np.where(src[z] == 0, cfg.marked_background, src[z])
    return out


def sparsify(label: np.ndarray, cfg: LabelConfig, mode: str, rng: np.random.Generator, axis: int = 2,
             step: int | None = None) -> np.ndarray:
    """Dispatch to :func:`scribbles` (``step`` default 1) or :func:`painted_slices` (``step`` default 5)."""
    if mode == "scribbles":
        return scribbles(label, cfg, rng, axis=axis, step=step or 1)
    if mode == "slices":
        return painted_slices(label, cfg, axis=axis, step=step or 5)
    raise ValueError(f"sparse mode {mode!r} is not one of {MODES}")


def annotated_fraction(sparse: np.ndarray) -> float:
    """Fraction of voxels an annotator drew (non-zero in the saved map)."""
    return float((sparse != 0).mean())
