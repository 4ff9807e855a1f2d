"""Fast resampling between axis-aligned grids (the primary grid and its working-spacing twin).

Trilinear interpolation done as three 1D passes (gather + lerp per axis) instead of a 3D ``grid_sample``: on a
512 x 512 x 100 CT with 4 logit channels this takes a fraction of a second on two cores.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def axis_map(src_affine: np.ndarray, dst_affine: np.ndarray,
             atol: float = 1e-4) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, offset) with src_index = scale * dst_index + offset per axis, or None when the grids are rotated
    or permuted against each other."""
    m = np.linalg.inv(np.asarray(src_affine, dtype=np.float64)) @ np.asarray(dst_affine, dtype=np.float64)
    lin = m[:3, :3]
    if np.abs(lin - np.diag(np.diag(lin))).max() > atol * max(1.0, np.abs(lin).max()):
        return None
    return np.diag(lin).copy(), m[:3, 3].copy()


def separable_resample(values: torch.Tensor, dst_shape: Sequence[int], scale: Sequence[float],
                       offset: Sequence[float]) -> torch.Tensor:
    """Trilinear resampling of (C, h, w, d) to (C, *dst_shape); source index = scale * dst index + offset.

    Outside the source the border value is repeated.

    Example:
        >>> x = torch.arange(4.0).reshape(1, 4, 1, 1)
        >>> separable_resample(x, (7, 1, 1), (0.5, 1, 1), (0, 0, 0))[0, :, 0, 0].tolist()
        [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    """
    out = values
    for axis in range(3):
        n_src, n_dst = out.shape[axis + 1], int(dst_shape[axis])
        s, o = float(scale[axis]), float(offset[axis])
        if n_src == n_dst and abs(s - 1) < 1e-9 and abs(o) < 1e-9:
            continue
        coords = (torch.arange(n_dst, dtype=torch.float64) * s + o).clamp(0, n_src - 1)
        i0 = coords.floor().long().clamp(max=max(n_src - 2, 0))
        i1 = (i0 + 1).clamp(max=n_src - 1)
        w = (coords - i0).to(out.dtype)
        shape = [1, 1, 1, 1]
        shape[axis + 1] = n_dst
        a = out.index_select(axis + 1, i0)
        b = out.index_select(axis + 1, i1)
        out = b.sub_(a).mul_(w.view(shape)).add_(a)
        del a
    return out


def working_geometry(affine: np.ndarray, shape: Sequence[int], spacing: Sequence[float]) -> tuple[np.ndarray, tuple]:
    """The grid with the same axes and centre as (affine, shape) and voxel size ``spacing`` (mm)."""
    affine = np.asarray(affine, dtype=np.float64)
    current = np.sqrt((affine[:3, :3] ** 2).sum(0))
    new_shape = tuple(max(1, int(round(n * c / s))) for n, c, s in zip(shape, current, spacing, strict=True))
    out = affine.copy()
    out[:3, :3] = affine[:3, :3] / current * np.asarray(spacing)
    centre = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2) + affine[:3, 3]
    out[:3, 3] = centre - out[:3, :3] @ ((np.asarray(new_shape) - 1) / 2)
    return out, new_shape


def argmax_channels(values: torch.Tensor) -> torch.Tensor:
    """``values.argmax(0)`` as uint8 for (C, ...) with C < 256, by a running maximum over channels.

    ``torch.argmax`` over the outer dimension of a large volume is slow on CPU (5 s for 4 x 512 x 512 x 100);
    this takes a few element-wise passes. Ties go to the lower channel, as with ``argmax``.

    Example:
        >>> argmax_channels(torch.tensor([[0.0, 2.0, 1.0], [1.0, 2.0, 0.0]])).tolist()
        [1, 0, 0]
    """
    best = values[0].clone()
    index = torch.zeros(values.shape[1:], dtype=torch.uint8, device=values.device)
    for c in range(1, values.shape[0]):
        better = values[c] > best
        index.masked_fill_(better, c)
        torch.maximum(best, values[c], out=best)
    return index
