"""Rigid co-registration of a secondary modality to the primary one (Mattes mutual information, SimpleITK).

Modalities of one patient are rarely perfectly aligned (PET/CT table motion, MR series minutes apart). Before the
network sees them, each secondary modality, already resampled onto the working grid, is aligned to the primary by
a translation (the default) or a rigid transform that maximises their mutual information; the transform is then
applied to the secondary's original file in one resampling (no second interpolation). A result is kept only when
it raises the mutual information and moves no more than ``max_shift_mm``; otherwise the identity stays. ``rigid``
refines the translation with a rotation only where that raises the mutual information further; on blurred or
anisotropic images it can still take a spurious degree or two, hence translation by default.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch


@dataclass
class Registration:
    """A rigid transform in world coordinates (4 x 4, fixed point -> moving point) and how it was found."""

    matrix: np.ndarray
    metric_before: float  # Mattes MI (negative; lower is better) at the identity
    metric_after: float
    accepted: bool
    over_limit_mm: float = 0.0  # a motion that raised the mutual information but moved more than allowed (mm)

    @property
    def shift_mm(self) -> float:
        """Largest displacement of the transform over a 100 mm ball around its centre (translation + rotation)."""
        rot = np.linalg.norm(self.matrix[:3, :3] - np.eye(3), 2) * 100.0
        return float(np.linalg.norm(self.matrix[:3, 3]) + rot)


def sitk_image(values: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """(H, W, D) array on a grid with ``affine`` (voxel index -> world mm) -> a SimpleITK image in that frame."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(values.transpose(2, 1, 0), dtype=np.float32))
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(v) for v in affine[:3, 3]])
    img.SetDirection([float(v) for v in (affine[:3, :3] / spacing).ravel()])
    return img


def _matrix(tx: sitk.Euler3DTransform | sitk.TranslationTransform) -> np.ndarray:
    """A SimpleITK Euler3D / translation transform -> its 4 x 4 matrix (fixed point -> moving point)."""
    out = np.eye(4)
    if isinstance(tx, sitk.Euler3DTransform):
        rot = np.asarray(tx.GetMatrix()).reshape(3, 3)
        centre = np.asarray(tx.GetCenter())
        out[:3, :3] = rot
        out[:3, 3] = np.asarray(tx.GetTranslation()) + centre - rot @ centre
    else:
        out[:3, 3] = np.asarray(tx.GetOffset())
    return out


class _OneThread:
    """Callers inside :func:`single_threaded`, in any thread; the default they replaced."""

    lock = threading.Lock()
    inside = 0
    before = 1


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Every SimpleITK filter made inside on one thread (the global default restored after). ITK splits a
    registration's threaded sums differently from run to run: the translation found here differed in its last digits
    (1e-15 mm) from call to call, and an atlas's affine + demons registration carried such differences into a warped
    label (seen in the brain simulation's round 0); on one thread neither does (the atlas's at twice the time).
    The default is the process's, so callers share it: the first one in sets 1 and the last one out restores what
    was there; threads inside at once run their registrations side by side (SimpleITK lets go of the GIL while a
    filter runs: :func:`crossmodal.atlas.in_parallel`). A filter made meanwhile outside it (another request's) runs on
    one thread too. Re-entrant."""
    with _OneThread.lock:
        if _OneThread.inside == 0:
            _OneThread.before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
        _OneThread.inside += 1
    try:
        yield
    finally:
        with _OneThread.lock:
            _OneThread.inside -= 1
            if _OneThread.inside == 0:
                sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(_OneThread.before)


def register_rigid(fixed: torch.Tensor, moving: torch.Tensor, affine: np.ndarray, mode: str = "rigid",
                   max_shift_mm: float = 20.0, samples: int = 20000, seed: int = 1) -> Registration:
    """Find the rigid transform aligning ``moving`` to ``fixed``, both (H, W, D) on one grid with ``affine``.

    Args:
        fixed, moving: intensities on the same grid (any scale; mutual information needs no common one).
        affine: (4, 4) voxel index -> world mm of that grid.
        mode: ``rigid`` (rotation + translation) or ``translation``.
        max_shift_mm: larger motions are rejected as failures (the identity stays).
        samples: voxels sampled for the metric per level (cost is independent of the volume size).
        seed: the sampling seed, >= 1 (the result is reproducible, on one thread: :func:`single_threaded`; SimpleITK
            reads 0 as the wall clock).

    Returns:
        :class:`Registration`; ``matrix`` is the identity unless ``accepted``.

    Example:
        >>> g = torch.zeros(40, 40, 40); g[12:28, 10:26, 14:30] = 1.0; g[16:20, 14:18, 18:22] = 2.0
        >>> r = register_rigid(g, torch.roll(g, 2, 0), np.diag([2.0, 2.0, 2.0, 1.0]), "translation")
        >>> r.accepted, (np.round(r.matrix[:3, 3], 0) + 0.0).tolist()  # moving sits 2 voxels = 4 mm further along x
        (True, [4.0, 0.0, 0.0])
    """
    if mode not in ("translation", "rigid"):
        raise ValueError(f"registration mode {mode!r} is not one of ('translation', 'rigid')")
    with single_threaded():
        return _register(fixed, moving, affine, mode, max_shift_mm, samples, seed)


MIN_VOXELS = 4  # a grid thinner than this along an axis is not registered (a slab of a few slices)


def _register(fixed: torch.Tensor, moving: torch.Tensor, affine: np.ndarray, mode: str, max_shift_mm: float,
              samples: int, seed: int) -> Registration:
    """:func:`register_rigid`'s search (on one thread)."""
    affine = np.asarray(affine, dtype=np.float64)
    if min(fixed.shape) < MIN_VOXELS:  # ITK's Gaussian smoothing of the metric needs 4 voxels along each axis
        return Registration(np.eye(4), float("nan"), float("nan"), False)
    f = sitk_image(fixed.detach().cpu().float().numpy(), affine)
    m = sitk_image(moving.detach().cpu().float().numpy(), affine)
    n = int(np.prod(fixed.shape))
    # coarsest level keeps >= 16 voxels per axis
    shrinks = [s for s in (4, 2, 1) if min(fixed.shape) // s >= 16] or [1]

    def method() -> sitk.ImageRegistrationMethod:
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(min(1.0, samples / n), seed)
        reg.SetInterpolator(sitk.sitkLinear)
        return reg

    def metric(tx: sitk.Transform) -> float:
        probe = method()
        probe.SetInitialTransform(tx, inPlace=False)
        try:
            return probe.MetricEvaluate(f, m)
        except RuntimeError:  # a flat image: its histogram has no bins ("Zero-valued spacing is not supported")
            return float("nan")

    def optimise(init: sitk.Transform, levels: list[int]) -> sitk.Transform | None:
        reg = method()
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=0.01, numberOfIterations=80,
                                                     relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel(levels)
        reg.SetSmoothingSigmasPerLevel([max(0, s - 1) for s in levels])
        reg.SetInitialTransform(init, inPlace=False)
        try:
            out = reg.Execute(f, m)
        except RuntimeError:  # too few overlapping samples, a flat image
            return None
        return out.GetNthTransform(0) if isinstance(out, sitk.CompositeTransform) else out

    before = metric(sitk.TranslationTransform(3))
    if not np.isfinite(before):  # nothing to measure an alignment by
        return Registration(np.eye(4), before, before, False)
    # translation first; rigid refines it and is kept only where the rotation raises the mutual information
    found = optimise(sitk.TranslationTransform(3), shrinks)
    if found is None:
        return Registration(np.eye(4), before, before, False)
    found = sitk.TranslationTransform(found)
    after = metric(found)
    if mode == "rigid":
        euler = sitk.Euler3DTransform(sitk.CenteredTransformInitializer(
            f, m, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.GEOMETRY))
        euler.SetTranslation(found.GetOffset())
        refined = optimise(euler, shrinks[-2:])
        if refined is not None:
            refined = sitk.Euler3DTransform(refined)
            value = metric(refined)
            if value < after:
                found, after = refined, value
    reg_out = Registration(_matrix(found), before, after, True)
    if not after < before:
        return Registration(np.eye(4), before, after, False)
    if reg_out.shift_mm > max_shift_mm:
        return Registration(np.eye(4), before, after, False, over_limit_mm=reg_out.shift_mm)
    return reg_out
