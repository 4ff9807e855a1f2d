"""Atlas pseudo-labels: the dense labels carried onto an unlabelled case by deformable registration (SimpleITK).

Where the cases of a pool share an anatomy (brain tissue maps, organs of one region), a case with a dense label is
an atlas: registering its primary image onto an unlabelled case's primary image (an affine by Mattes mutual
information, then symmetric-forces demons on the histogram-matched images) and warping its label gives that case a
pseudo-label that knows the label's convention, which the network's own predictions from a few cases do not. With
several atlases the warped labels vote; a voxel whose winning class has less than ``min_agreement`` of the votes
stays unlabelled. Not for structures that differ from case to case (lesions): nothing in one case says where they
are in another. Registrations run on one thread each (so they repeat exactly) and side by side on ``workers``
threads (:func:`in_parallel`). With a :class:`WarpCache` a pair registered before is read back instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import SimpleITK as sitk
import torch

from crossmodal.io import read_cached_label, write_cached_label
from crossmodal.labels import IGNORE_INDEX
from crossmodal.register import single_threaded, sitk_image

T = TypeVar("T")
R = TypeVar("R")
logger = logging.getLogger(__name__)


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def in_parallel(fn: Callable[[T], R], items: Sequence[T], workers: int) -> Iterator[R]:
    """``fn(item)`` for each item, in order, on up to ``workers`` threads (one: in this thread, one at a time).

    For registrations: SimpleITK lets go of the GIL while a filter runs and :func:`single_threaded` keeps each on
    one thread, so ``workers`` of them fill ``workers`` cores and give what one at a time gives. A result is handed
    on (and can be dropped) before the later ones are done.

    Example:
        >>> list(in_parallel(lambda x: x * x, [1, 2, 3], workers=2))
        [1, 4, 9]
    """
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(min(workers, len(items))) as pool:
        yield from pool.map(fn, items)


def split_workers(workers: int, tasks: int) -> tuple[int, int]:
    """``workers`` threads shared by ``tasks`` tasks that each run parts: (tasks at once, threads per task).

    Example:
        >>> split_workers(16, 2), split_workers(2, 10), split_workers(8, 3)
        ((2, 8), (2, 1), (3, 2))
    """
    outer = max(1, min(workers, tasks))
    return outer, max(1, workers // outer)


def _affine(fixed: sitk.Image, moving: sitk.Image) -> sitk.Transform:
    """Affine transform (fixed point -> moving point) maximising Mattes mutual information, from the moments (on one
    thread, inside :func:`single_threaded`)."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2, seed=1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 200)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([1, 0])
    init = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg.SetInitialTransform(init, inPlace=False)
    return reg.Execute(fixed, moving)


def warp_label(fixed: np.ndarray, fixed_affine: np.ndarray, moving: np.ndarray, moving_affine: np.ndarray,
               moving_label: np.ndarray, iterations: int = 100, sigma: float = 2.5) -> np.ndarray:
    """``moving_label`` (on ``moving``'s grid) carried onto ``fixed``'s grid; arrays (H, W, D), affines voxel -> mm.

    The moving image is aligned by an affine, histogram-matched to the fixed one, then deformed by symmetric-forces
    demons (``iterations``, displacement smoothing ``sigma`` voxels); its label follows by nearest neighbour.
    Returns an int64 (H, W, D) label on ``fixed``'s grid, ``IGNORE_INDEX`` where the moving image does not reach;
    the same on every call (:func:`single_threaded`).
    """
    with single_threaded():
        return _warp_label(fixed, fixed_affine, moving, moving_affine, moving_label, iterations, sigma)


def _warp_label(fixed: np.ndarray, fixed_affine: np.ndarray, moving: np.ndarray, moving_affine: np.ndarray,
                moving_label: np.ndarray, iterations: int, sigma: float) -> np.ndarray:
    # intensities from 0 up (normalised images go negative): the moments that start the affine are of mass
    f, m = sitk_image(fixed - fixed.min(), fixed_affine), sitk_image(moving - moving.min(), moving_affine)
    # shifted so that 0 means "outside the moving image" after resampling
    lab = sitk.Cast(sitk_image(moving_label.astype(np.float32) - IGNORE_INDEX, moving_affine), sitk.sitkInt32)
    aff = _affine(f, m)
    matched = sitk.HistogramMatching(sitk.Resample(m, f, aff, sitk.sitkLinear, 0.0), f, 256, 7, True)
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(iterations)
    demons.SetStandardDeviations(sigma)
    field = demons.Execute(f, matched)
    warp = sitk.CompositeTransform([aff, sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))])
    out = sitk.GetArrayFromImage(sitk.Resample(lab, f, warp, sitk.sitkNearestNeighbor, 0)).transpose(2, 1, 0)
    return out.astype(np.int64) + IGNORE_INDEX


class WarpCache:
    """Warped labels on disk: ``<folder>/<key>.npz`` (int16, compressed), ``key`` a digest of everything
    :func:`warp_label` reads (both images, their affines, the label, the settings), written atomically; at most
    ``max_files`` of them, the least recently used removed first. A registration repeats to the last voxel
    (:func:`single_threaded`), so a label read back is the one a new registration would give.

    Example:
        >>> import tempfile
        >>> x = np.zeros((16, 16, 16), np.float32); x[4:12, 4:12, 4:12] = 1.0
        >>> y = np.where(x > 0, 1, -1)
        >>> cache = WarpCache(tempfile.mkdtemp())
        >>> (first, hit), (again, hit_again) = [cache.warp(x, np.eye(4), x, np.eye(4), y, 10, 2.5) for _ in "ab"]
        >>> hit, hit_again, bool((first == again).all())
        (False, True, True)
    """

    def __init__(self, folder: str | os.PathLike[str], max_files: int = 4096) -> None:
        self.folder, self.max_files = Path(folder), max_files
        self.counts = {"read": 0, "registered": 0}  # this object's calls (thread-safe: ``_lock``)
        self._lock = threading.Lock()

    @staticmethod
    def key(*arrays: np.ndarray, iterations: int, sigma: float) -> str:
        """A digest of ``arrays`` (values, shapes and types) and the settings."""
        h = hashlib.blake2b(repr(("warp_label", 1, iterations, float(sigma))).encode(), digest_size=16)
        for a in arrays:
            a = np.ascontiguousarray(a)
            h.update(repr((a.shape, a.dtype.str)).encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def warp(self, fixed: np.ndarray, fixed_affine: np.ndarray, moving: np.ndarray, moving_affine: np.ndarray,
             moving_label: np.ndarray, iterations: int = 100, sigma: float = 2.5) -> tuple[np.ndarray, bool]:
        """:func:`warp_label` through the cache: the (H, W, D) int64 label and whether it was read back."""
        key = self.key(fixed, fixed_affine, moving, moving_affine, moving_label, iterations=iterations, sigma=sigma)
        path = self.folder / f"{key}.npz"
        if path.is_file():
            try:
                arr = read_cached_label(path, fixed.shape)
                os.utime(path)  # recently used
                self._count("read")
                return arr.astype(np.int64), True
            except (OSError, ValueError) as e:  # OSError: removed meanwhile by another thread's pruning
                logger.warning(f"warped label {path} {e}; registering again")
        label = warp_label(fixed, fixed_affine, moving, moving_affine, moving_label, iterations, sigma)
        write_cached_label(path, label.astype(np.int16))
        self._prune()
        self._count("registered")
        return label, False

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def _prune(self) -> None:
        files = list(self.folder.glob("*.npz"))
        if len(files) <= self.max_files:
            return

        def used(f: Path) -> float:
            try:
                return f.stat().st_mtime
            except FileNotFoundError:  # removed by another thread meanwhile
                return float("inf")
        for old in sorted(files, key=used)[: len(files) - self.max_files]:
            old.unlink(missing_ok=True)


def _carried(fixed: np.ndarray, affine: np.ndarray, case: tuple[torch.Tensor, torch.Tensor, np.ndarray],
             iterations: int, sigma: float, cache: WarpCache | None = None) -> np.ndarray:
    """``case``'s (image (M, H', W', D'), label (1, H', W', D'), affine) label on ``fixed``'s (H, W, D) grid, registered
    on the primary channel (:func:`warp_label`, through ``cache`` if given)."""
    image, label, case_affine = case
    args = (fixed, np.asarray(affine, dtype=np.float64), image[0].float().cpu().numpy(),
            np.asarray(case_affine, dtype=np.float64), label[0].cpu().numpy().round().astype(np.int64))
    if cache is None:
        return warp_label(*args, iterations, sigma)
    return cache.warp(*args, iterations, sigma)[0]


def atlas_pseudo_label(image: torch.Tensor, affine: np.ndarray,
                       atlases: list[tuple[torch.Tensor, torch.Tensor, np.ndarray]], num_classes: int,
                       min_agreement: float = 0.5, iterations: int = 100, sigma: float = 2.5,
                       workers: int = 1, cache: WarpCache | None = None) -> torch.Tensor:
    """A pseudo-label (1, H, W, D) for ``image`` (M, H, W, D, grid ``affine``) from ``atlases`` [(image
    (M, H', W', D'), label (1, H', W', D'), affine)], registered on the primary channel (``workers`` at once, through
    ``cache`` if given): the majority vote of the warped labels, ``IGNORE_INDEX`` where the winning class has less
    than ``min_agreement`` of the atlases' votes.

    Example:
        >>> x = torch.zeros(1, 24, 24, 24); x[:, 6:18, 6:18, 6:18] = 1.0; x[:, 9:15, 9:15, 9:15] = 2.0
        >>> y = (x > 0).float() + (x > 1).float()
        >>> pseudo = atlas_pseudo_label(x, np.eye(4), [(x, y, np.eye(4))], num_classes=3)
        >>> bool((pseudo == y).float().mean() > 0.99)
        True
    """
    if not atlases:
        raise ValueError("atlas_pseudo_label needs at least one atlas (a case with a dense label)")
    fixed = image[0].float().cpu().numpy()
    votes = np.zeros((num_classes, *fixed.shape), dtype=np.int32)
    for warped in in_parallel(lambda atlas: _carried(fixed, affine, atlas, iterations, sigma, cache), atlases,
                              workers):
        for c in range(num_classes):
            votes[c] += warped == c
    best, count = votes.argmax(0), votes.max(0)
    out = np.where(count >= max(1, min_agreement * len(atlases)), best, IGNORE_INDEX)
    return torch.from_numpy(out[None].astype(np.float32))


def transfer_strokes(image: torch.Tensor, affine: np.ndarray, label: torch.Tensor,
                     others: list[tuple[torch.Tensor, torch.Tensor, np.ndarray]], iterations: int = 100,
                     sigma: float = 2.5, workers: int = 1, cache: WarpCache | None = None) -> torch.Tensor:
    """A sparse training label (1, H, W, D; ``IGNORE_INDEX`` where nothing was drawn) of ``image`` (M, H, W, D,
    grid ``affine``) with the strokes of ``others`` [(image (M, H', W', D'), sparse label (1, H', W', D'), affine)]
    added: each other case is registered onto this one on the primary channel (:func:`warp_label`, ``workers`` at
    once, through ``cache`` if given) and its strokes follow; a voxel nothing was drawn on takes the class the
    carried strokes give it where they all agree. The drawn voxels stay as drawn.

    Example:
        >>> x = torch.zeros(1, 24, 24, 24); x[:, 6:18, 6:18, 6:18] = 1.0
        >>> mine = torch.full((1, 24, 24, 24), float(IGNORE_INDEX)); mine[0, 12, 12, 12] = 1
        >>> theirs = torch.full((1, 24, 24, 24), float(IGNORE_INDEX)); theirs[0, 8:16, 10, 10] = 1
        >>> out = transfer_strokes(x, np.eye(4), mine, [(x, theirs, np.eye(4))])
        >>> int((out == 1).sum()), int(out[0, 12, 12, 12])  # its own stroke and the other case's 8 voxels
        (9, 1)
    """
    fixed = image[0].float().cpu().numpy()
    own = label[0].cpu().numpy().round().astype(np.int64)
    first = np.full(own.shape, IGNORE_INDEX, dtype=np.int64)  # the class carried there first
    agree = np.ones(own.shape, dtype=bool)
    for warped in in_parallel(lambda other: _carried(fixed, affine, other, iterations, sigma, cache), others,
                              workers):
        drawn = warped != IGNORE_INDEX
        agree &= ~drawn | (first == IGNORE_INDEX) | (first == warped)
        first = np.where((first == IGNORE_INDEX) & drawn, warped, first)
    out = np.where(own != IGNORE_INDEX, own, np.where(agree, first, IGNORE_INDEX))
    return torch.from_numpy(out[None].astype(np.float32))
