"""Synthetic multimodal phantoms: an organ, a lesion and a vessel, each clear in one modality only.

Contrast by modality kind (regions: air, body, organ, lesion, vessel):

* CT: organ and vessel clear, lesion nearly invisible (10 HU);
* PET: lesion bright, vessel invisible, blurred and noisy;
* MR: organ and lesion clear, vessel weak; multiplicative bias field.

The primary modality lies on an isotropic grid centred on the origin; every other modality has its own
spacing, size, origin and orientation, and can be rigidly misregistered by a given distance (mm).

A case is ``typical`` or one of the atypical :data:`VARIANTS` a clinical pool also holds (for active learning):
``cold_lesion``, a lesion that takes up no tracer (seen in MR only), and ``other_mr_weighting``, an MR sequence of
another weighting (organ darker than the body, lesion and vessel bright).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from crossmodal.config import CrossModalConfig
from crossmodal.data.grids import apply, grid_affine, rigid, rotation_matrix, smooth_field, world_points

# Mean intensity per region (air, body, organ, lesion, vessel) and noise sd, by modality kind.
CONTRAST = {
    "ct": (np.array([-1000.0, 20.0, 60.0, 70.0, 220.0]), 12.0),
    "pet": (np.array([0.0, 1.0, 2.0, 9.0, 1.15]), 0.35),
    "mr": (np.array([0.0, 300.0, 480.0, 640.0, 270.0]), 25.0),
}
STRUCTURES = ("organ", "lesion", "vessel")
# Atypical variants: per modality kind, the region means that replace CONTRAST's.
VARIANTS = {
    "typical": {},
    "cold_lesion": {"pet": np.array([0.0, 1.0, 2.0, 2.0, 1.15])},
    "other_mr_weighting": {"mr": np.array([0.0, 420.0, 260.0, 560.0, 620.0])},
}


@dataclass
class Volume:
    """An array with its voxel-to-RAS affine."""

    array: np.ndarray
    affine: np.ndarray


@dataclass
class SyntheticCase:
    """Images by modality name (the first is primary) and the dense truth on the primary grid."""

    images: dict[str, Volume]
    label: Volume
    variant: str = "typical"


def _anatomy(rng: np.random.Generator, half: np.ndarray) -> dict[str, np.ndarray | float]:
    """Random structures inside a field of view of half-extent ``half`` (3,) mm."""
    organ_c = rng.uniform(-0.15, 0.15, 3) * half
    organ_r = np.array([0.5, 0.42, 0.46]) * half * rng.uniform(0.85, 1.1, 3)
    lesion_r = 0.17 * half.min() * rng.uniform(0.8, 1.25)
    lesion_c = organ_c + rng.uniform(-0.35, 0.35, 3) * (organ_r - lesion_r)
    direction = np.array([rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), 1.0])
    return {
        "body_r": np.array([0.85, 0.75, 0.92]) * half * rng.uniform(0.92, 1.04, 3),
        "organ_c": organ_c, "organ_r": organ_r, "organ_rot": rotation_matrix(rng.uniform(-25, 25, 3)),
        "lesion_c": lesion_c, "lesion_r": lesion_r,
        "vessel_p": organ_c + np.array([organ_r[0] * rng.choice([-1, 1]) * 1.05, rng.uniform(-0.2, 0.2) * half[1], 0]),
        "vessel_d": direction / np.linalg.norm(direction), "vessel_r": 0.1 * half.min() * rng.uniform(0.8, 1.2),
    }


def _regions(points: np.ndarray, a: dict) -> np.ndarray:
    """Region index per point (3, ...) -> (...): 0 air, 1 body, 2 organ, 3 lesion, 4 vessel."""
    body = (((points / a["body_r"].reshape(3, 1, 1, 1)) ** 2).sum(0)) <= 1
    local = np.einsum("ji,j...->i...", a["organ_rot"], points - a["organ_c"].reshape(3, 1, 1, 1))
    organ = (((local / a["organ_r"].reshape(3, 1, 1, 1)) ** 2).sum(0)) <= 1
    lesion = ((points - a["lesion_c"].reshape(3, 1, 1, 1)) ** 2).sum(0) <= a["lesion_r"] ** 2
    rel = points - a["vessel_p"].reshape(3, 1, 1, 1)
    along = np.einsum("i,i...->...", a["vessel_d"], rel)
    vessel = ((rel - a["vessel_d"].reshape(3, 1, 1, 1) * along) ** 2).sum(0) <= a["vessel_r"] ** 2
    reg = body.astype(np.uint8)
    reg[body & organ] = 2
    reg[body & organ & lesion] = 3
    reg[body & vessel] = 4
    return reg


def make_phantom(cfg: CrossModalConfig, rng: np.random.Generator, size: int = 48, spacing: float = 2.0,
                 misregistration_mm: float = 0.0, shape: tuple[int, int, int] | None = None,
                 spacing_xyz: tuple[float, float, float] | None = None, variant: str = "typical") -> SyntheticCase:
    """One phantom case with a modality for every entry of ``cfg.modalities`` (kinds ct / pet / mr).

    Args:
        cfg: names and kinds of the modalities; label values come from ``cfg.labels.classes`` by the names
            ``organ``, ``lesion``, ``vessel`` (absent names are background).
        rng: random generator (the case's anatomy, grids, noise).
        size: primary grid size per axis (voxels); ``shape`` overrides it with a (3,) shape.
        spacing: primary spacing (mm); ``spacing_xyz`` overrides it with a (3,) spacing.
        misregistration_mm: rigid shift of every secondary modality against the primary (mm), random direction.
        variant: ``typical`` or an atypical entry of :data:`VARIANTS` (the same anatomy draws, other contrasts).

    Raises:
        ValueError: an unknown ``variant``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown phantom variant {variant!r}; choose from {sorted(VARIANTS)}")
    shape0 = tuple(int(v) for v in shape) if shape else (size,) * 3
    sp0 = np.asarray(spacing_xyz if spacing_xyz else (spacing,) * 3, dtype=np.float64)
    extent = np.asarray(shape0) * sp0
    anatomy = _anatomy(rng, extent / 2)
    images: dict[str, Volume] = {}
    label = None
    for i, mod in enumerate(cfg.modalities):
        if i == 0:
            grid = shape0
            affine = grid_affine(tuple(sp0), grid)
            motion = np.eye(4)
        else:
            sp = np.array([2.5, 2.5, 3.5]) if i % 2 else np.array([3.0, 3.0, 3.0])
            grid = tuple(int(np.ceil(e * 1.1 / s)) for e, s in zip(extent, sp, strict=True))
            rot = rotation_matrix(np.array([0.0, 0.0, 90.0 * i])) @ rotation_matrix(rng.uniform(-5, 5, 3))
            affine = grid_affine(tuple(sp), grid, center=rng.uniform(-4, 4, 3), rotation=rot)
            motion = rigid(rng, misregistration_mm, max_rot_deg=0.0)
        pts = apply(world_points(grid, affine), motion)
        regions = _regions(pts, anatomy)
        if i == 0:
            names = ("", "", "organ", "lesion", "vessel")
            lut = np.array([0, 0] + [cfg.labels.classes.get(n, 0) for n in names[2:]], dtype=np.uint8)
            label = Volume(lut[regions], affine)
        means, sd = CONTRAST[mod.kind]
        means = VARIANTS[variant].get(mod.kind, means)
        img = means[regions].astype(np.float32)
        if mod.kind == "pet":
            img = gaussian_filter(img, 1.2)
        if mod.kind in ("mr", "pet"):
            img *= 1.0 + smooth_field(rng, grid, 0.2)
        img += rng.normal(0.0, sd, grid).astype(np.float32) * (img > 0 if mod.kind == "pet" else 1)
        # a CT holds integer Hounsfield units (int16), as scanners write it
        images[mod.name] = Volume(np.rint(img).astype(np.int16) if mod.kind == "ct" else img.astype(np.float32),
                                  affine)
    assert label is not None
    return SyntheticCase(images=images, label=label, variant=variant)
