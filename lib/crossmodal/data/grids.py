"""Grids and spatial transforms in physical (RAS, mm) space, shared by the phantom and brain generators."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import map_coordinates, zoom


def grid_affine(spacing: Sequence[float], shape: Sequence[int],
                center: np.ndarray | None = None, rotation: np.ndarray | None = None) -> np.ndarray:
    """4x4 voxel-to-RAS affine of a grid with ``spacing`` (mm), centred on ``center``, axes ``rotation``."""
    rot = np.eye(3) if rotation is None else rotation
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(spacing)
    mid = (np.asarray(shape, dtype=np.float64) - 1) / 2
    a[:3, 3] = (np.zeros(3) if center is None else center) - a[:3, :3] @ mid
    return a


def world_points(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """RAS coordinates (3, H, W, D) of every voxel centre of a grid."""
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    return np.einsum("ij,j...->i...", affine[:3, :3].astype(np.float32), ijk) + affine[:3, 3, None, None, None]


def rotation_matrix(angles_deg: np.ndarray) -> np.ndarray:
    """Rotation about x, then y, then z by ``angles_deg`` (3,)."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def rigid(rng: np.random.Generator, shift_mm: float, max_rot_deg: float = 0.0) -> np.ndarray:
    """A 4x4 rigid transform: a translation of exactly ``shift_mm`` in a random direction, small rotation."""
    a = np.eye(4)
    a[:3, :3] = rotation_matrix(rng.uniform(-max_rot_deg, max_rot_deg, 3))
    direction = rng.normal(size=3)
    a[:3, 3] = shift_mm * direction / np.linalg.norm(direction)
    return a


def apply(points: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Apply a 4x4 transform to points (3, ...)."""
    return np.einsum("ij,j...->i...", transform[:3, :3], points) + transform[:3, 3].reshape(3, *[1] * (points.ndim - 1))


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], amplitude: float, coarse: int = 4) -> np.ndarray:
    """A smooth random field of ``shape`` with values in about [-amplitude, amplitude] (cubic upsampling)."""
    c = rng.uniform(-amplitude, amplitude, size=(coarse,) * len(shape))
    return zoom(c, [s / coarse for s in shape], order=3, mode="nearest")[tuple(slice(0, s) for s in shape)]


def sample(volume: np.ndarray, affine: np.ndarray, points: np.ndarray, order: int = 1,
           cval: float = 0.0) -> np.ndarray:
    """Sample ``volume`` (with voxel-to-RAS ``affine``) at RAS ``points`` (3, ...)."""
    ijk = apply(points, np.linalg.inv(affine))
    return map_coordinates(volume, ijk.reshape(3, -1), order=order, mode="constant", cval=cval,
                           prefilter=False).reshape(points.shape[1:])
