"""Preprocessing, defined once: training, validation and inference all call :func:`preprocessing`.

Per modality, on its own grid: CT is windowed to [0, 1], MR and PET are z-scored; then every modality is
resampled onto the primary grid (outside a modality's field of view the value is 0, its mean after z-score).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, cast

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    MapTransform,
    RandFlipd,
    RandomizableTrait,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropSamplesd,
    ResampleToMatch,
    SpatialPadd,
    SpatialResample,
    Transform,
)

from crossmodal.atlas import usable_cores
from crossmodal.config import CrossModalConfig, ModalityConfig, far_apart
from crossmodal.io import (
    Case,
    CaseError,
    blank_message,
    channel_name,
    find_case,
    format_mm,
    image_volume,
    load_volume,
    on_array_axes,
    one_volume,
    read_label,
    resample_to,
    same_grid,
    volume_3d,
    voxel_mm,
)
from crossmodal.labels import DENSE, IGNORE_INDEX, SPARSE, invalid_values, to_training
from crossmodal.propagate import PropagationCache, grow_checked
from crossmodal.register import MIN_VOXELS, register_rigid
from crossmodal.resample import argmax_channels, axis_map, resample_argmax, separable_resample, working_geometry

logger = logging.getLogger(__name__)


def normalize(img: torch.Tensor, modality: ModalityConfig) -> torch.Tensor:
    """Normalise one modality (1, H, W, D): CT window -> [0, 1]; MR/PET -> zero mean, unit variance."""
    if modality.kind == "ct":
        lo, hi = modality.window
        return ((img.clamp(lo, hi) - lo) / (hi - lo)).to(torch.float32)
    std = img.std()
    return ((img - img.mean()) / (std if std > 1e-6 else 1.0)).to(torch.float32)


def working_spacing(primary: MetaTensor, cfg: CrossModalConfig) -> tuple[float, float, float] | None:
    """The voxel size (mm, on the primary's array axes) a case is resampled to: ``cfg.data.spacing``; with that
    null, the weights' own (``data.weights_spacing``) where the case's differs from it by more than
    :data:`~crossmodal.config.SPACING_TOLERANCE` on an axis; else None (the primary grid as it is). Both are sizes
    along the RAS axes, the order the network sees a case in (:func:`to_canonical`), put onto the primary's axes
    (:func:`~crossmodal.io.on_array_axes`): a sagittally stored series of an axially trained model gets its thick
    axis where the training cases had theirs."""
    src = primary.affine.double().numpy()
    if cfg.data.spacing:
        return on_array_axes(cfg.data.spacing, src)
    if not cfg.data.weights_spacing:
        return None
    trained = on_array_axes(cfg.data.weights_spacing, src)
    return trained if far_apart(np.sqrt((src[:3, :3] ** 2).sum(0)), trained) else None


def working_grid(primary: MetaTensor, cfg: CrossModalConfig) -> MetaTensor:
    """The primary image (C, H, W, D) on the working grid (:func:`working_spacing`, same axes), or unchanged."""
    spacing = working_spacing(primary, cfg)
    if not spacing:
        return primary
    src = primary.affine.double().numpy()
    current = np.sqrt((src[:3, :3] ** 2).sum(0))
    if np.allclose(current, spacing, atol=1e-3):
        return primary
    dst, shape = working_geometry(src, primary.shape[1:], spacing)
    mapping = axis_map(src, dst)
    assert mapping is not None  # same axes by construction
    values = separable_resample(primary.as_tensor().float(), shape, *mapping)
    out = MetaTensor(values, meta=primary.meta)
    out.affine = torch.as_tensor(dst)
    return out


REGISTRATION_VOXELS = 48**3  # registration runs on a coarser twin of larger working grids
_MOTIONS: OrderedDict[tuple, tuple[np.ndarray, float] | None] = OrderedDict()  # found motions, by files and grid
_MOTIONS_LOCK = threading.Lock()


def _file_key(path: str | os.PathLike[str]) -> tuple[str, int, int]:
    """The file at ``path`` as a found motion is remembered by: the file it resolves to (a case linked into several
    studies folders, as the simulation's strategies link theirs, is registered once), its mtime and size."""
    st = os.stat(path)
    return os.path.realpath(path), st.st_mtime_ns, st.st_size


class Aligned(NamedTuple):
    """A secondary modality on the working grid: ``values`` (1, H, W, D), ``shift_mm`` (the motion applied, 0.0 for
    none), ``inside`` (H, W, D) bool where its own field of view lies (the rest is padding)."""

    values: torch.Tensor
    shift_mm: float
    inside: torch.Tensor

    @property
    def coverage(self) -> float:
        """The share of the working grid the modality's field of view covers."""
        return float(self.inside.float().mean()) if self.inside.numel() else 1.0


def onto_grid(source: MetaTensor, target: MetaTensor, min_coverage: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``source`` (1, h, w, d) resampled onto ``target``'s grid -> ``(values (1, H, W, D), inside (H, W, D) bool)``.

    Outside the source's field of view the values are 0; where it covers less than ``min_coverage`` of the grid
    they are its edge values carried outward instead (a partial modality's network input: a large block of zeros
    throws the instance norms of every window off, its own field of view included)."""
    ones = torch.ones_like(source.as_tensor()[:1])
    both = resample_to(MetaTensor(torch.cat([source.as_tensor()[:1], ones]), meta=source.meta), target).as_tensor()
    values, inside = both[:1], both[1] > 0.5
    if float(inside.float().mean()) < min_coverage and bool(inside.any()):
        border = ResampleToMatch(mode="bilinear", padding_mode="border", align_corners=False, dtype=np.float32)
        edge = border(MetaTensor(source.as_tensor()[:1], meta=source.meta), img_dst=target)
        values = cast(MetaTensor, edge).as_tensor()
    return values.contiguous(), inside


def align_to_primary(source: MetaTensor, ref: MetaTensor, cfg: CrossModalConfig, key: tuple | None = None,
                     what: str = "a secondary modality") -> Aligned:
    """Resample one secondary modality onto the working grid, co-registered to the primary (``cfg.data.register``).

    The motion is found on the working grid, or on a coarser twin of it with at most ``REGISTRATION_VOXELS`` voxels
    (a 512 x 512 x 100 CT costs 0.3 s, not 10), and applied in the one resampling of ``source`` onto the grid.
    With a ``key`` (the two files' paths, mtimes and sizes) the motion is remembered in this process, so training
    epochs and repeated requests on a case do not search again; a changed file has a new key.

    Args:
        source: the modality (1, h, w, d) on its own grid (normalised).
        ref: the working grid; ``ref[0]`` is the primary modality.
        what: names the modality in the warning of a motion found over ``cfg.data.register_max_mm`` (not applied).

    Returns:
        :class:`Aligned`: the values (1, H, W, D) (a partial field of view, below ``cfg.data.fov_coverage``, edge
        values carried outward: :func:`onto_grid`), the shift (0.0 when registration is off or found nothing better
        than the identity) and where the modality has data.
    """
    affine = ref.affine.double().numpy()
    shape = tuple(ref.shape[1:])
    cover = cfg.data.fov_coverage

    def onto(matrix: np.ndarray | None, shift: float) -> Aligned:
        target = ref if matrix is None else MetaTensor(torch.empty(1, *shape), affine=torch.as_tensor(matrix @ affine))
        values, inside = onto_grid(source, target, cover)
        return Aligned(values, shift, inside)

    if cfg.data.register == "none":
        return onto(None, 0.0)
    if key is not None:
        key = (*key, cfg.data.register, cfg.data.register_max_mm, shape, affine.round(4).tobytes())
        with _MOTIONS_LOCK:
            seen, known = key in _MOTIONS, _MOTIONS.get(key)
        if seen:
            return onto(None, 0.0) if known is None else onto(known[0], known[1])
    n = int(np.prod(shape))
    coarse = n > REGISTRATION_VOXELS
    if coarse:
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(0)) * (n / REGISTRATION_VOXELS) ** (1 / 3)
        coarse_affine, coarse_shape = working_geometry(affine, shape, spacing)
        coarse = min(coarse_shape) >= min(MIN_VOXELS, min(shape))  # a slab of a few slices: its own grid
    if coarse:
        mapping = axis_map(affine, coarse_affine)
        assert mapping is not None  # same axes by construction
        fixed = separable_resample(ref.as_tensor()[:1].float(), coarse_shape, *mapping)[0]
    else:
        coarse_affine, coarse_shape, fixed = affine, shape, ref.as_tensor()[0]
    grid = MetaTensor(torch.empty(1, *coarse_shape), affine=torch.as_tensor(coarse_affine))
    moving = resample_to(source, grid).as_tensor()[0]
    reg = register_rigid(fixed, moving, coarse_affine, cfg.data.register, cfg.data.register_max_mm)
    shift = round(reg.shift_mm, 2)
    if reg.over_limit_mm:  # once per file version in a process (the motion is remembered below)
        logger.warning(f"{what}: the best alignment to the primary found moves it {reg.over_limit_mm:.1f} mm, more "
                       f"than data.register_max_mm ({cfg.data.register_max_mm:g}): left as it lies. Series acquired "
                       "apart (another day, another position) may be that far off: raise data.register_max_mm")
    if key is not None:
        with _MOTIONS_LOCK:
            _MOTIONS[key] = (reg.matrix, shift) if reg.accepted else None
            while len(_MOTIONS) > 4096:
                _MOTIONS.popitem(last=False)
    return onto(reg.matrix, shift) if reg.accepted else onto(None, 0.0)


def missing_modality_message(case: Case, name: str, cfg: CrossModalConfig) -> str:
    """What a case lacking modality ``name`` is told, by where its files are: a case folder, an image sent alone (an
    upload, a one-file session: no sidecar folder beside it), or a studies folder."""
    names = cfg.modality_names
    if case.folder:
        where = (f"no {name}.nii.gz (or .nii/.nrrd/.mha) in the case's folder {case.folder}; send it with the others, "
                 f"each named by its modality ({', '.join(names)})")
    elif not os.path.isdir(os.path.join(os.path.dirname(case.primary), cfg.data.sidecar_dir)):
        files = ", ".join(f"{n}.nii.gz" for n in names)
        where = (f"{os.path.basename(case.primary)} came alone (no {cfg.data.sidecar_dir}/ folder beside it); send "
                 f"the case's files together, each named by its modality (a session of {files}), or add the case to "
                 "the datastore with each modality")
    else:
        where = (f"expected <studies>/{cfg.data.sidecar_dir}/{case.case_id}/{name}.nii.gz (or .nii/.nrrd/.mha); add "
                 f"it (a running server takes it as PUT /datastore/image?image={case.case_id} with params "
                 f"{{\"modality\": \"{name}\"}})")
    folder = case.folder or os.path.join(os.path.dirname(case.primary), cfg.data.sidecar_dir, case.case_id)
    listed = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    pair = [f for f in listed if f.lower() == f"{name.lower()}.mhd"]
    if pair:  # read by no listing: its voxels lie in another file
        where += (f" ({pair[0]} there is a MetaImage header whose voxels lie in another file: save it as one "
                  f"{name}.mha)")
    return f"modality {name!r} is missing: {where}, or use the case without it (missing_modality zero_fill)"


_RESAMPLED: set[tuple[str, tuple[float, float, float]]] = set()  # (case, the weights' voxel size), logged once


def load_case(case: Case, cfg: CrossModalConfig, missing: str | None = None,
              drop: Sequence[str] = ()) -> tuple[MetaTensor, list[str]]:
    """Load and normalise every modality of ``case`` and resample it onto the working grid.

    The working grid is the primary grid, or the primary grid at :func:`working_spacing` (``cfg.data.spacing`` when
    set, else the weights' own voxel size where the case's is far from it).

    Args:
        case: the case's files.
        cfg: the config (modalities in order, the first one primary).
        missing: ``error`` or ``zero_fill`` for an absent secondary modality; defaults to ``cfg.infer``'s.
        drop: modalities to leave out although present (filled with 0, not in ``used``); the primary's file
            still gives the grid.

    Returns:
        ``(image, used)``: image (M, H, W, D) float32 on the working grid, M = number of configured modalities,
        absent ones filled with 0; ``used`` lists the modalities actually read. ``image.meta["primary_affine"]``
        and ``["primary_shape"]`` keep the primary grid (labels live there); ``["registered_mm"]`` the motion
        (mm) by which each secondary modality was aligned to the primary (0.0: left as it was).

    Raises:
        CaseError: a file is unreadable, non-finite, or a modality is absent under the ``error`` policy.
    """
    policy = missing or cfg.infer.missing_modality
    mods = cfg.modalities
    unknown = sorted(set(drop) - set(cfg.modality_names))
    if unknown:
        raise CaseError(case.case_id, None, f"cannot drop {unknown}: not configured modalities {cfg.modality_names}")
    if len(set(drop)) >= len(mods):
        raise CaseError(case.case_id, None, f"dropping {sorted(drop)} leaves no modality to segment with")
    primary = volume_3d(load_volume(case.primary, case.case_id), case.case_id, case.primary)
    if primary.shape[0] == 1:
        image_volume(primary, case.case_id, case.primary)
    grid = {"primary_affine": primary.affine.clone(), "primary_shape": tuple(primary.shape[1:])}
    trained = None if cfg.data.spacing or not working_spacing(primary, cfg) else cfg.data.weights_spacing
    if trained and (case.case_id, trained) not in _RESAMPLED:
        _RESAMPLED.add((case.case_id, trained))  # once per case and size in a process (training reads it each epoch)
        own = voxel_mm(primary.affine)
        logger.info(f"case {case.case_id!r}: voxels of {format_mm(own)} mm, and the model was "
                    f"trained at {format_mm(trained)} mm (data.spacing not set): resampled to "
                    "it, the labels back onto the case's grid")
    if primary.shape[0] > 1:  # a 4D multi-channel file holds all modalities in config order
        if primary.shape[0] != len(mods):
            raise CaseError(case.case_id, case.primary,
                            f"has {primary.shape[0]} channels but the config names {len(mods)} modalities "
                            f"{cfg.modality_names}")
        drop = [*drop, *blank_channels(primary, case, cfg, policy, drop)]
        chans = [normalize(primary[i : i + 1], m) * (m.name not in drop) for i, m in enumerate(mods)]
        out = to_canonical(working_grid(MetaTensor(torch.cat(chans), meta=primary.meta), cfg))
        shifts, aligned = {}, {}
        if mods[0].name not in drop:
            for i, m in enumerate(mods[1:], start=1):
                if m.name not in drop:
                    chan = MetaTensor(out.as_tensor()[i : i + 1].clone(), affine=out.affine)
                    aligned[m.name] = align_to_primary(chan, out, cfg, what=f"case {case.case_id!r}: {m.name}")
                    out.as_tensor()[i : i + 1], shifts[m.name] = aligned[m.name].values, aligned[m.name].shift_mm
        out.meta.update(grid, registered_mm=shifts, **fields_of_view(aligned, cfg))
        return out, [n for n in cfg.modality_names if n not in drop]
    # in RAS order before the secondaries are registered and resampled onto it: the same case stored in another
    # order then gives the network the same array to the last bit
    ref = to_canonical(working_grid(MetaTensor(normalize(primary.as_tensor(), mods[0]), meta=primary.meta), cfg))
    zeros = torch.zeros_like(ref.as_tensor())
    by_name = {mods[0].name: ref.as_tensor() if mods[0].name not in drop else zeros}
    todo = []
    for m in mods[1:]:
        path = case.modalities.get(m.name)
        if path is None and m.name not in drop and policy == "error":
            raise CaseError(case.case_id, None, missing_modality_message(case, m.name, cfg))
        if path is None or m.name in drop:
            by_name[m.name] = zeros
        else:
            todo.append((m, path))

    def secondary(item: tuple[ModalityConfig, str]) -> Aligned | None:
        m, path = item
        vol = one_volume(volume_3d(load_volume(path, case.case_id), case.case_id, path), case.case_id, path)
        blank = blank_message(vol)
        if blank and policy == "error":
            raise CaseError(case.case_id, path, f"{blank}; re-export the series, or use the case without it "
                                                "(missing_modality zero_fill)")
        if blank:  # as if absent
            logger.warning(f"case {case.case_id!r}: file {path}: {blank}: segmented without {m.name}")
            return None
        vol = MetaTensor(normalize(vol.as_tensor(), m), meta=vol.meta)
        if mods[0].name in drop:  # nothing to register to
            values, inside = onto_grid(vol, ref, cfg.data.fov_coverage)
            return Aligned(values, 0.0, inside)
        return align_to_primary(vol, ref, cfg, key=(_file_key(case.primary), _file_key(path)),
                                what=f"case {case.case_id!r}: {m.name} ({path})")

    # the secondary modalities in parallel: decoding, registration and resampling release the GIL
    with ThreadPoolExecutor(max_workers=max(1, min(len(todo), usable_cores()))) as pool:
        done = list(pool.map(secondary, todo))
    shifts, aligned = {}, {}
    for (m, _), a in zip(todo, done, strict=True):
        if a is None:  # blank: absent
            by_name[m.name] = zeros
            continue
        by_name[m.name], aligned[m.name] = a.values, a
        if mods[0].name not in drop:
            shifts[m.name] = a.shift_mm
    used = ([mods[0].name] if mods[0].name not in drop else []) + [m.name for m, _ in todo if m.name in aligned]
    image = MetaTensor(torch.cat([by_name[m.name] for m in mods]), meta=ref.meta)
    image.meta.update(grid, registered_mm=shifts, **fields_of_view(aligned, cfg))
    return image, used


def blank_channels(primary: MetaTensor, case: Case, cfg: CrossModalConfig, policy: str,
                   drop: Sequence[str] = ()) -> list[str]:
    """The secondary modalities whose channel of the 4D primary ``primary`` (M, H, W, D) holds one value in every
    voxel (:func:`blank_message`), to be left out as missing ones under the ``zero_fill`` ``policy``.

    Raises:
        CaseError: the primary modality's channel is blank (nothing to segment), or a secondary one under ``error``.
    """
    blank = []
    for i, m in enumerate(cfg.modalities):
        problem = None if i and m.name in drop else blank_message(primary[i : i + 1])
        if not problem:
            continue
        problem = channel_name(i, len(cfg.modalities), m.name) + problem
        if i == 0 or policy == "error":
            raise CaseError(case.case_id, case.primary, f"{problem}; re-export the series" + (
                ", or use the case without it (missing_modality zero_fill)" if i else ""))
        logger.warning(f"case {case.case_id!r}: file {case.primary}: {problem}: segmented without {m.name}")
        blank.append(m.name)
    return blank


def fields_of_view(aligned: Mapping[str, Aligned], cfg: CrossModalConfig) -> dict[str, Any]:
    """The image meta of the secondary modalities' fields of view: ``coverage`` {name: share of the working grid}
    and ``fov`` {name: (H, W, D) bool where it has data} of the partial ones (below ``cfg.data.fov_coverage``)."""
    coverage = {name: round(a.coverage, 4) for name, a in aligned.items()}
    return {"coverage": coverage,
            "fov": {name: a.inside for name, a in aligned.items() if coverage[name] < cfg.data.fov_coverage}}


_SAID: set[tuple[str, str, str]] = set()  # (case, modality, partial) of a partial field of view, logged once


CANONICAL = np.array([[0, 1], [1, 1], [2, 1]], dtype=np.int64)  # RAS: array axis i along world axis i, increasing


def to_canonical(image: MetaTensor) -> MetaTensor:
    """``image`` (C, H, W, D) with its axes permuted and flipped into the closest RAS order, as nibabel's
    ``as_closest_canonical`` (no interpolation): the network sees every case in the array order of its training
    cases, however the series was stored (sagittally or coronally acquired, LAS / LPS by its converter). Stored
    sagittally, the demo's brain011 lost 3.3 / 3.2 / 8.6 Dice points (grey / white matter, CSF) before.
    ``meta["working_ornt"]`` ((3, 2): nibabel's orientation of the grid it came from) and
    ``meta["unoriented_affine"]`` let :func:`from_canonical` undo it.

        >>> x = MetaTensor(torch.arange(24.0).reshape(1, 2, 3, 4), affine=torch.tensor(
        ...     [[0.0, 0, 2, 0], [0, -1, 0, 5], [3, 0, 0, 0], [0, 0, 0, 1]]))  # stored as (S, P, R): sagittal
        >>> y = to_canonical(x); tuple(y.shape), y.affine.tolist()[:3]
        ((1, 4, 3, 2), [[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 3.0], [0.0, 0.0, 3.0, 0.0]])
        >>> back, affine = from_canonical(y.as_tensor(), y)
        >>> torch.equal(back, x.as_tensor()), torch.equal(affine, x.affine)
        (True, True)
    """
    import nibabel as nib

    affine = image.affine.double()
    ornt = nib.orientations.io_orientation(affine.numpy()).astype(np.int64)
    values = image.as_tensor()
    if not np.array_equal(ornt, CANONICAL):
        flipped = [1 + i for i in range(3) if ornt[i, 1] < 0]
        values = values.flip(flipped) if flipped else values
        values = values.permute(0, *(1 + int(a) for a in np.argsort(ornt[:, 0]))).contiguous()
        affine = affine @ torch.as_tensor(nib.orientations.inv_ornt_aff(ornt, tuple(image.shape[1:])))
    out = MetaTensor(values, meta=dict(image.meta))
    out.affine = affine.to(image.affine.dtype)
    out.meta.update(working_ornt=torch.as_tensor(ornt), unoriented_affine=image.affine.clone())
    return out


def from_canonical(values: torch.Tensor, image: MetaTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, h, w, d) ``values`` on ``image``'s canonical working grid (:func:`to_canonical`) -> the same values in the
    array order of the grid it came from (the primary's axes), and that grid's affine."""
    ornt, affine = image.meta.get("working_ornt"), image.meta.get("unoriented_affine")
    if ornt is None or affine is None:
        return values, image.affine
    ornt = np.asarray(ornt, dtype=np.int64).reshape(3, 2)
    if np.array_equal(ornt, CANONICAL):
        return values, affine
    back = values.permute(0, *(1 + int(a) for a in ornt[:, 0]))
    flipped = [1 + i for i in range(3) if ornt[i, 1] < 0]
    return (back.flip(flipped) if flipped else back), affine


def to_primary_grid(values: torch.Tensor, image: MetaTensor, mode: str = "bilinear") -> torch.Tensor:
    """Resample (C, h, w, d) values on ``image``'s working grid back onto its primary grid (C, H, W, D)."""
    dst_affine, dst_shape = image.meta.get("primary_affine"), image.meta.get("primary_shape")
    values, src_affine = from_canonical(values, image)
    if dst_affine is None or dst_shape is None or (tuple(dst_shape) == tuple(values.shape[1:])
                              and torch.allclose(src_affine.double(), dst_affine.double(), atol=1e-4)):
        return values
    mapping = axis_map(src_affine.double().numpy(), dst_affine.double().numpy())
    if mapping is not None and mode == "bilinear":
        return separable_resample(values.float(), tuple(int(v) for v in dst_shape), *mapping)
    src = MetaTensor(values.float(), affine=src_affine)
    out = SpatialResample(mode=mode, padding_mode="border", align_corners=False, dtype=np.float32)(
        src, dst_affine=dst_affine, spatial_size=tuple(int(v) for v in dst_shape))
    return cast(MetaTensor, out).as_tensor()


def to_primary_labels(values: torch.Tensor, image: MetaTensor) -> torch.Tensor:
    """Logits (C, h, w, d) on ``image``'s working grid -> uint8 labels (H, W, D) on its primary grid.

    Same labels as ``argmax_channels(to_primary_grid(values, image))``; between axis-aligned grids only the label
    boundaries are interpolated (:func:`crossmodal.resample.resample_argmax`).
    """
    dst_affine, dst_shape = image.meta.get("primary_affine"), image.meta.get("primary_shape")
    oriented, src_affine = from_canonical(values, image)
    mapping = None if dst_affine is None else axis_map(src_affine.double().numpy(), dst_affine.double().numpy())
    if mapping is None or dst_shape is None:
        return argmax_channels(to_primary_grid(values, image))
    return resample_argmax(oriented.float(), tuple(int(v) for v in dst_shape), *mapping)


class LoadCased(MapTransform):
    """``data["image"]`` (primary path) -> (M, H, W, D) tensor; optional ``data["label"]`` path -> (1, H, W, D).

    The label becomes a training map (classes, ``IGNORE_INDEX`` on unannotated voxels) according to
    ``data["label_kind"]`` (default dense). Adds ``data["case_id"]``, ``data["modalities_used"]`` and
    ``data["present"]`` ((M,) bool, configured order: the modalities read; a batch of them collates to (B, M)).

    A secondary modality with a partial field of view (below ``cfg.data.fov_coverage`` of the grid): ``partial``
    ``use`` keeps it and adds ``data["fov"]`` (one (H, W, D) bool mask or None per configured modality: where the
    partial ones have data; the inference's two passes); ``leave_out`` (training) zero-fills it and leaves it out of
    ``present``, as a missing modality. ``walker_key``: with ``leave_out``, a sparse case's image with the partial
    modality kept (edge-filled beyond its field of view, as ``grow_scribbles`` has it) goes there too, for
    :class:`PropagateSparseLabeld` to grow its strokes on (and drop).
    """

    def __init__(self, cfg: CrossModalConfig, image_key: str = "image", label_key: str = "label",
                 missing: str | None = None, drop: Sequence[str] = (), partial: str = "use",
                 walker_key: str | None = None) -> None:
        super().__init__([image_key], allow_missing_keys=True)
        if partial not in ("use", "leave_out"):
            raise ValueError(f"partial {partial!r} is not one of ('use', 'leave_out')")
        self.cfg, self.image_key, self.label_key, self.missing = cfg, image_key, label_key, missing
        self.drop, self.partial, self.walker_key = tuple(drop), partial, walker_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        case = find_case(d[self.image_key], self.cfg.modality_names, self.cfg.data.sidecar_dir)
        image, used = load_case(case, self.cfg, self.missing, self.drop)
        fov = image.meta.pop("fov", {})
        for name in fov:
            if (case.case_id, name, self.partial) not in _SAID:  # once per case and use in a process
                _SAID.add((case.case_id, name, self.partial))
                what = "trained on without it" if self.partial == "leave_out" else \
                    "used where it has data, the rest segmented without it"
                logger.info(f"case {case.case_id!r}: {name} covers {image.meta['coverage'][name]:.0%} of the grid "
                            f"(data.fov_coverage {self.cfg.data.fov_coverage}): {what}")
        if fov and self.partial == "leave_out":
            if self.walker_key and d.get("label_kind") == SPARSE:
                d[self.walker_key] = image.as_tensor().clone()
            for name in fov:
                image.as_tensor()[self.cfg.modality_names.index(name)] = 0.0
            used = [name for name in used if name not in fov]
        elif fov:
            d["fov"] = [fov.get(name) for name in self.cfg.modality_names]
        d[self.image_key] = image
        d["case_id"], d["modalities_used"] = case.case_id, used
        d["present"] = torch.tensor([name in used for name in self.cfg.modality_names])
        if isinstance(d.get(self.label_key), str):
            shape, affine = image.meta["primary_shape"], image.meta["primary_affine"]
            primary = MetaTensor(torch.empty(1, *shape), affine=affine)  # the primary grid, no data needed
            label = load_training_label(d[self.label_key], primary, case.case_id, self.cfg, d.get("label_kind", DENSE))
            label = to_canonical(label)  # the image's axis order (exact): resampled only where the spacing differs
            d[self.label_key] = resample_to(label, image, mode="nearest") if not same_grid(label, image) else label
        return d


class Batchabled(MapTransform):
    """Drop what only an infer response reports and differs in form between cases of one batch (a case without a
    modality: shorter ``modalities_used``, fewer ``registered_mm`` keys in the image's meta), which would not
    collate; ``present`` says which modalities each case has."""

    def __init__(self) -> None:
        super().__init__(["image"], allow_missing_keys=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        d.pop("modalities_used", None)
        d.pop("fov", None)
        if isinstance(d.get("image"), MetaTensor):
            d["image"].meta.pop("registered_mm", None)
            d["image"].meta.pop("coverage", None)
        return d


def load_training_label(path: str, image: MetaTensor, case_id: str, cfg: CrossModalConfig,
                        kind: str) -> MetaTensor:
    """Read a saved label, check its grid and values, map it to a (1, H, W, D) training map."""
    arr = read_label(path, image, case_id)
    bad = invalid_values(arr, cfg.labels)
    if bad:
        raise CaseError(case_id, path, f"label values {bad} are not configured classes "
                                       f"{cfg.labels.classes} or marked_background={cfg.labels.marked_background}")
    target = to_training(arr, kind, cfg.labels)
    return MetaTensor(torch.from_numpy(target[None].astype(np.float32)), affine=image.affine)


class PropagateSparseLabeld(MapTransform):
    """A sparse label (``data["label_kind"] == "sparse"``) grown over the image by
    :func:`crossmodal.propagate.propagate_labels` (``cfg.train.propagate``); other labels pass unchanged.

    ``data["image"]`` (M, H, W, D), ``data["label"]`` (1, H, W, D) with ``IGNORE_INDEX`` -> the same, grown.
    With ``cache_dir`` the grown labels are kept there (:class:`crossmodal.propagate.PropagationCache`), so a
    label is walked once however often its case is read. ``walker_key``: an image to walk on instead of
    ``data[image_key]`` where the case has one (:class:`LoadCased`'s: a partial modality the network leaves out),
    removed from the data either way.
    """

    def __init__(self, cfg: CrossModalConfig, image_key: str = "image", label_key: str = "label",
                 cache_dir: str | os.PathLike[str] | None = None, walker_key: str | None = None) -> None:
        super().__init__([label_key])
        self.cfg, self.image_key, self.label_key, self.walker_key = cfg, image_key, label_key, walker_key
        self.cache = PropagationCache(cache_dir) if cache_dir is not None else None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        walk_on = d.pop(self.walker_key, None) if self.walker_key else None
        p = self.cfg.train.propagate
        if p.method == "none" or d.get("label_kind") != SPARSE or not isinstance(d.get(self.label_key), torch.Tensor):
            return d
        label = d[self.label_key]
        start = time.perf_counter()
        plain = label.as_tensor() if isinstance(label, MetaTensor) else label
        image = torch.as_tensor(d[self.image_key] if walk_on is None else walk_on)
        case_id = str(d.get("case_id", "case"))
        if self.cache is not None:
            grown, hit = self.cache.propagate(case_id, image, plain, p.beta, p.threshold, p.max_voxels,
                                              p.min_heldout_accuracy)
        else:
            grown, hit = grow_checked(image, plain, p.beta, p.threshold, p.max_voxels, p.min_heldout_accuracy,
                                      case_id)[0], False
        before, after = float((plain != IGNORE_INDEX).float().mean()), float((grown != IGNORE_INDEX).float().mean())
        logger.info(f"{case_id}: sparse label grown by the random walker from {before:.1%} to {after:.1%} of the "
                    f"voxels in {time.perf_counter() - start:.1f} s{' (cached)' if hit else ''}")
        d[self.label_key] = MetaTensor(grown, meta=label.meta) if isinstance(label, MetaTensor) else grown
        return d


class PseudoLabeld(MapTransform, RandomizableTrait):
    """An unlabelled case's current pseudo-label from ``store`` (``{case_id: (1, H, W, D)}``, filled during
    training) as ``data["label"]``; all ``IGNORE_INDEX`` while the store has none for the case (``keep_missing``:
    the case's own label then stays).

    A :class:`~monai.transforms.RandomizableTrait`, so a ``CacheDataset`` never caches it: every epoch reads the
    store as it is then.
    """

    def __init__(self, store: Mapping[str, torch.Tensor], image_key: str = "image", label_key: str = "label",
                 keep_missing: bool = False) -> None:
        super().__init__([image_key])
        self.store, self.image_key, self.label_key = store, image_key, label_key
        self.keep_missing = keep_missing

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        label = self.store.get(str(d.get("case_id")))
        if label is None or tuple(label.shape[1:]) != tuple(image.shape[1:]):
            if self.keep_missing:
                return d
            label = torch.full((1, *image.shape[1:]), float(IGNORE_INDEX))
        d[self.label_key] = MetaTensor(label.float(), affine=image.affine) if isinstance(image, MetaTensor) else label
        return d


WALKER_KEY = "walker_image"  # a sparse training case's image with its partial modalities, for the strokes' walker


def preprocessing(cfg: CrossModalConfig, stage: str, missing: str | None = None, drop: Sequence[str] = (),
                  cache_dir: str | os.PathLike[str] | None = None,
                  pseudo_labels: Mapping[str, torch.Tensor] | None = None, partial: str | None = None) -> Compose:
    """The one transform factory. ``stage``: ``train`` (random patches + augmentation, image and label),
    ``unlabeled`` (the same for an image alone), ``val`` or ``infer``. ``cache_dir``: where ``train`` keeps the
    propagated sparse labels (:class:`PropagateSparseLabeld`). ``pseudo_labels``: ``unlabeled`` then also crops
    each case's entry of this store (:class:`PseudoLabeld`) as its ``label``; ``train`` takes a case's entry, where
    it has one, instead of its saved label. ``partial``: what :class:`LoadCased` does with a modality of a partial
    field of view (default ``use`` for ``infer``, ``leave_out`` for the others)."""
    if stage not in ("train", "unlabeled", "val", "infer"):
        raise ValueError(f"stage {stage!r} is not one of ('train', 'unlabeled', 'val', 'infer')")
    walker = WALKER_KEY if stage == "train" else None  # a partial modality's data for the strokes' walker
    steps: list[Transform] = [LoadCased(cfg, missing=missing, drop=drop,
                                        partial=partial or ("use" if stage == "infer" else "leave_out"),
                                        walker_key=walker)]
    if stage != "infer":
        steps.append(Batchabled())
    if pseudo_labels is not None and stage in ("train", "unlabeled"):
        steps.append(PseudoLabeld(pseudo_labels, keep_missing=stage == "train"))
    if stage == "train":  # after the stored labels: strokes carried from other cases grow too
        steps.append(PropagateSparseLabeld(cfg, cache_dir=cache_dir, walker_key=walker))
    if stage in ("train", "unlabeled"):
        t = cfg.train
        labelled = stage == "train" or pseudo_labels is not None
        keys = ["image", "label"] if labelled else ["image"]
        steps += [SpatialPadd(keys=["image"], spatial_size=t.patch_size)]
        if labelled:
            steps += [SpatialPadd(keys=["label"], spatial_size=t.patch_size, value=IGNORE_INDEX)]
        steps += [
            RandSpatialCropSamplesd(keys=keys, roi_size=t.patch_size, num_samples=t.patches_per_case,
                                    random_size=False),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=2),
            RandScaleIntensityd(keys=["image"], factors=0.1, prob=0.5),
            RandShiftIntensityd(keys=["image"], offsets=0.1, prob=0.5),
        ]
    return Compose(steps)
