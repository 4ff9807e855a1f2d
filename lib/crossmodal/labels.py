"""The label convention shared by 3D Slicer, OHIF, scripted clients and the trainer.

A saved label map holds, on the primary image's grid:

* ``0``: nothing drawn here;
* ``1..N-1``: the configured classes;
* ``marked_background`` (default 255, segment name ``marked_background``): background painted on purpose.

A label is **sparse** (scribbles, a few painted slices) when it contains at least one ``marked_background``
voxel: then only drawn voxels count and ``0`` means *not annotated*. Otherwise it is **dense**: ``0`` is
background everywhere. The rule needs no custom client (Slicer and OHIF save whatever segments exist) and never
calls a dense label of a small structure sparse, however few slices it covers. Scripted clients may say
``{"label_kind": "dense" | "sparse"}`` in the save request's params to override the rule.

For training, :func:`to_training` maps a label to class indices with ``IGNORE_INDEX`` on unannotated voxels.
"""

from __future__ import annotations

import numpy as np

from crossmodal.config import LabelConfig

DENSE, SPARSE = "dense", "sparse"
LABEL_KINDS = (DENSE, SPARSE)
IGNORE_INDEX = -1


def invalid_values(label: np.ndarray, cfg: LabelConfig) -> list[int]:
    """Values in ``label`` that are neither a class, 0, nor the marked-background value."""
    allowed = np.array(sorted({*cfg.classes.values(), cfg.marked_background}))
    present = np.unique(label)
    return [int(v) for v in present if v not in allowed]


def classify(label: np.ndarray, cfg: LabelConfig, override: str | None = None) -> str:
    """``dense`` or ``sparse`` by the rule above, or ``override`` when given.

    Example:
        >>> cfg = LabelConfig(classes={"background": 0, "lesion": 1})
        >>> small = np.zeros((8, 8, 8), int); small[4, 4, 4] = 1
        >>> classify(small, cfg), classify(np.where(small == 0, 0, 255), cfg)
        ('dense', 'sparse')
    """
    if override is not None:
        if override not in LABEL_KINDS:
            raise ValueError(f"label_kind {override!r} is not one of {LABEL_KINDS}")
        return override
    return SPARSE if bool((label == cfg.marked_background).any()) else DENSE


def to_training(label: np.ndarray, kind: str, cfg: LabelConfig) -> np.ndarray:
    """Class index map for the losses: sparse ``0`` -> ``IGNORE_INDEX``, ``marked_background`` -> 0."""
    out = label.astype(np.int64, copy=True)
    if kind == SPARSE:
        out[label == 0] = IGNORE_INDEX
    elif kind != DENSE:
        raise ValueError(f"label kind {kind!r} is not one of {LABEL_KINDS}")
    out[label == cfg.marked_background] = 0
    return out


def from_training(target: np.ndarray, cfg: LabelConfig) -> np.ndarray:
    """Inverse of :func:`to_training`: a training map with ``IGNORE_INDEX`` -> a saved (viewer) label map."""
    if not (target == IGNORE_INDEX).any():
        return target.astype(np.uint8 if cfg.marked_background < 256 else np.uint16)
    out = np.where(target == 0, cfg.marked_background, target)
    out[target == IGNORE_INDEX] = 0
    return out.astype(np.uint8 if cfg.marked_background < 256 else np.uint16)


def annotated_fraction(label: np.ndarray, kind: str) -> float:
    """Fraction of voxels that carry supervision: 1.0 for dense labels, drawn voxels for sparse ones."""
    return 1.0 if kind == DENSE else float((label != 0).mean())
