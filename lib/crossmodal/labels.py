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

3D Slicer numbers the segments it exports 1, 2, ... in the order of the segmentation, whatever their names: its
MONAI Label module sends their names in that order as ``label_info`` with the save, and a ``.seg.nrrd`` names its
segments in its header. :func:`slicer_values` and :func:`seg_nrrd_values` turn those into the configured values.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from crossmodal.config import SLICER_RESERVED_NAMES, LabelConfig

DENSE, SPARSE = "dense", "sparse"
LABEL_KINDS = (DENSE, SPARSE)
IGNORE_INDEX = -1


def name_key(name: str) -> str:
    """A segment or class name without case, spaces and punctuation.

    Example:
        >>> name_key("Grey Matter") == name_key("grey_matter") == name_key("grey-matter ")
        True
    """
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def _configured(name: str, cfg: LabelConfig, where: str) -> int:
    values = {name_key(n): v for n, v in {**cfg.classes, cfg.marked_background_name: cfg.marked_background}.items()}
    if name_key(name) not in values:
        named = [n for n, v in cfg.classes.items() if v] + [cfg.marked_background_name]
        raise ValueError(f"segment {name!r} ({where}) is not a class of this app: {named}; rename the segment "
                         "to one of them, or delete it, and save again")
    return values[name_key(name)]


def slicer_values(label_info: Any, cfg: LabelConfig, scribbled: str | None = None) -> dict[int, int] | None:
    """{value in the file: configured value} of a labelmap 3D Slicer exported, from the ``label_info`` list its
    MONAI Label module sends with the save (``[{"name": "csf", "idx": 1}, ...]``, one entry a saved segment, in
    the order Slicer numbered them 1, 2, ...; its ``idx`` counts the segments left out too, so the order is what
    holds). None when ``label_info`` is not such a list (another client: the values are taken as they are).
    ``scribbled``: the class a scribbles request is for (Slicer's scribbles panel sends every segment, its
    ``foreground_scribbles`` meaning that class and its ``background_scribbles`` and a ``background`` segment
    marked background).

    Example:
        >>> from crossmodal.config import LabelConfig
        >>> cfg = LabelConfig(classes={"background": 0, "gm": 1, "wm": 2, "csf": 3})
        >>> slicer_values([{"name": "csf", "idx": 2}, {"name": "marked_background", "idx": 3}], cfg)
        {0: 0, 1: 3, 2: 255}

    Raises:
        ValueError: a segment that is no configured class (named).
    """
    if not isinstance(label_info, list) or not label_info or not all(
            isinstance(e, dict) and isinstance(e.get("name"), str) for e in label_info):
        return None
    out = {0: 0}
    for n, entry in enumerate(label_info):
        key = name_key(entry["name"])
        if scribbled is not None and key == "foreground_scribbles":
            out[n + 1] = _configured(scribbled, cfg, "the label the scribbles are for")
        elif scribbled is not None and key in ("background_scribbles", "background"):
            out[n + 1] = cfg.marked_background
        else:
            out[n + 1] = _configured(entry["name"], cfg, f"value {n + 1} in the file")
    return out


def seg_nrrd_values(header: dict[str, Any], cfg: LabelConfig) -> dict[int, int] | None:
    """{value in the file: configured value} of a 3D Slicer segmentation file (``.seg.nrrd``), from the segments its
    header names (``Segment<i>_Name``, ``_LabelValue``, ``_Layer``); ``background`` and the scribble segments map
    to 0, as Slicer's save drops them. None when the header names no segment.

    Raises:
        ValueError: a segment that is no configured class, or segments on several layers (overlapping).
    """
    out = {0: 0}
    layers = set()
    n = 0
    while f"Segment{n}_Name" in header:
        name = str(header[f"Segment{n}_Name"])
        value = int(header.get(f"Segment{n}_LabelValue", n + 1))
        layers.add(str(header.get(f"Segment{n}_Layer", "0")))
        dropped = name_key(name) in SLICER_RESERVED_NAMES
        out[value] = 0 if dropped else _configured(name, cfg, f"value {value} in the file")
        n += 1
    if len(layers) > 1:
        raise ValueError(f"its {n} segments overlap (they lie on {len(layers)} layers); save them without "
                         "overlap (Segment Editor: masking, 'Modify other segments: Overwrite all')")
    return out if n else None


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
