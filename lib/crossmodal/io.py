"""Multimodal cases on disk: discovery, loading with MONAI readers, validation, atomic writes.

Studies-folder layout (a MONAI Label ``LocalDatastore`` folder)::

    studies/
      case001.nii.gz                  # primary modality: the image viewers show and labels live on
      modalities/case001/t2.nii.gz    # other modalities, any grid; LocalDatastore ignores sub-folders
      modalities/case001/pd.nrrd
      labels/final/case001.nii.gz     # labels, on the primary grid (written by MONAI Label)

A primary file with C > 1 channels (a 4D NIfTI/NRRD) holds all C modalities in config order instead.
Every modality is resampled onto the primary grid in physical (RAS) space.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import nrrd
import numpy as np
import psutil
import slicerio
import torch
from isal import igzip, isal_zlib
from monai.data import ITKWriter, MetaTensor
from monai.transforms import LoadImage, ResampleToMatch
from nibabel.openers import ImageOpener

from crossmodal.config import IMAGE_EXTENSIONS, atomic_write_bytes
from crossmodal.errors import CaseError

logger = logging.getLogger(__name__)

_UMASK = os.umask(0)
os.umask(_UMASK)


def _isal_gzip_open(filename: str, mode: str = "rb", compresslevel: int = 1, mtime: int = 0,
                    keep_open: bool = False) -> igzip.IGzipFile:
    """gzip through ISA-L: same bytes format, 2-3x faster (de)compression than zlib (a CT decompresses in 0.3 s)."""
    return igzip.IGzipFile(filename, mode, compresslevel=min(int(compresslevel), isal_zlib.ISAL_BEST_COMPRESSION),
                           mtime=mtime)


# nibabel's documented hook for openers of image files (MONAI's NibabelReader goes through it)
ImageOpener.compress_ext_map[".gz"] = (_isal_gzip_open, ("mode", "compresslevel", "mtime", "keep_open"))


def publish_mode(tmp: str | os.PathLike[str]) -> None:
    """Give a temp file (``mkstemp`` makes it 0600) the mode a plain ``open`` would have."""
    os.chmod(tmp, 0o666 & ~_UMASK)


def split_ext(path: str | os.PathLike[str]) -> tuple[str, str]:
    """``/a/case1.nii.gz`` -> (``case1``, ``.nii.gz``); unknown extensions give the plain suffix."""
    name = Path(path).name
    for ext in IMAGE_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)], ext
    return Path(name).stem, Path(name).suffix


_UNREAD_SAID: set[Path] = set()  # the .mhd files named in a warning, once a process


def unread_volumes(folder: str | os.PathLike[str]) -> list[Path]:
    """The MetaImage headers (``*.mhd``) directly in ``folder``, which no listing of cases reads, each named once in
    a warning with what to do (they were left out without a word): their voxels lie in a second file (``.raw``,
    ``.zraw``) that an upload, the datastore's copy and the viewers' download of the image would not carry.

    Example:
        >>> root = Path(tempfile.mkdtemp()); _ = (root / "case7.mhd").write_text("ElementDataFile = case7.raw")
        >>> [p.name for p in unread_volumes(root)]
        ['case7.mhd']
    """
    folder = Path(folder)
    found = sorted(p for p in folder.glob("*") if p.suffix.lower() == ".mhd" and p.is_file()) \
        if folder.is_dir() else []
    for p in found:
        if p in _UNREAD_SAID:
            continue
        _UNREAD_SAID.add(p)
        logger.warning(f"{p}: not read: a MetaImage header whose voxels lie in another file; save the volume as one "
                       f".mha file (SimpleITK: sitk.WriteImage(sitk.ReadImage('{p.name}'), '{p.stem}.mha')) and "
                       "remove the pair")
    return found


def case_id_of(path: str | os.PathLike[str]) -> str:
    """A case's id from one of its files' paths: the file name without its image extension."""
    return split_ext(path)[0]


@dataclass
class Case:
    """One multimodal case: the primary image path, other modalities by name (None: absent), a label path;
    ``folder``: the case's own folder, when its files came in one (see :func:`find_case`)."""

    case_id: str
    primary: str
    modalities: dict[str, str | None] = field(default_factory=dict)
    label: str | None = None
    folder: str | None = None


def find_case(image_path: str | os.PathLike[str], modality_names: Sequence[str], sidecar_dir: str = "modalities",
              studies_dir: str | os.PathLike[str] | None = None) -> Case:
    """Find the other modalities of the primary image ``image_path`` in the studies layout; or, for a folder, one
    case's files in it, each named by its modality (``ct.nii.gz``, ``pet.nii.gz``, ...: a MONAI Label session of
    several files; any case), the case id the folder's name; or the secondaries named so beside one other file, the
    primary, whose name is the case id (``phantom005.nii.gz``, ``pet.nii.gz``, ``mr.nii.gz``, as a studies folder
    names them).

    Args:
        image_path: the primary image (a file directly in the studies folder), or one case's folder.
        modality_names: all modality names in config order; the first is the primary.
        sidecar_dir: folder (relative to ``studies_dir``) holding ``<case id>/<modality>.<ext>``.
        studies_dir: defaults to the folder of ``image_path``.

    Raises:
        CaseError: a folder without a file named by the primary modality.
    """
    image_path = Path(image_path)
    if image_path.is_dir():
        volumes = sorted(p for p in image_path.iterdir() if p.is_file() and split_ext(p)[1] in IMAGE_EXTENSIONS)
        named = {name: next((str(p) for ext in IMAGE_EXTENSIONS if (p := image_path / f"{name}{ext}").is_file()), None)
                 for name in modality_names}
        for name in modality_names:  # CT.nii.gz for ct, where nothing matches exactly
            if named[name] is None:
                named[name] = next((str(p) for p in volumes if split_ext(p)[0].lower() == name.lower()), None)
        rest = [p for p in volumes if str(p) not in named.values()]
        if named[modality_names[0]] is None and len(rest) == 1 and all(named[n] for n in modality_names[1:]):
            # the studies layout's names: the case's own file (phantom005.nii.gz) beside pet.nii.gz, mr.nii.gz
            return Case(case_id=split_ext(rest[0])[0], primary=str(rest[0]),
                        modalities={n: named[n] for n in modality_names[1:]}, folder=str(image_path))
        if named[modality_names[0]] is None:
            raise CaseError(image_path.name, image_path,
                            f"a folder of one case needs its {modality_names[0]} image as {modality_names[0]}.nii.gz "
                            f"(or .nii/.nrrd/.mha) and each other modality named by it "
                            f"({', '.join(modality_names[1:])}); "
                            f"it holds {sorted(p.name for p in image_path.iterdir())}")
        return Case(case_id=image_path.name, primary=str(named[modality_names[0]]),
                    modalities={n: named[n] for n in modality_names[1:]}, folder=str(image_path))
    cid = case_id_of(image_path)
    folder = Path(studies_dir) if studies_dir else image_path.parent
    found: dict[str, str | None] = {}
    listing: list[Path] | None = None
    for name in modality_names[1:]:
        found[name] = None
        for ext in IMAGE_EXTENSIONS:
            p = folder / sidecar_dir / cid / f"{name}{ext}"
            if p.is_file():
                found[name] = str(p)
                break
        else:  # PET.nii.gz for pet: the name in another case (a folder made by hand), where nothing matches exactly
            if listing is None:
                side = folder / sidecar_dir / cid
                listing = sorted(side.iterdir()) if side.is_dir() else []
            found[name] = next((str(p) for p in listing if p.is_file() and split_ext(p)[1] in IMAGE_EXTENSIONS
                                and split_ext(p)[0].lower() == name.lower()), None)
    return Case(case_id=cid, primary=str(image_path), modalities=found)


_LOADER = LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32)


def load_volume(path: str | os.PathLike[str], case_id: str | None = None) -> MetaTensor:
    """Read a NIfTI or NRRD file with MONAI's readers as a float32 MetaTensor (C, H, W, D) in RAS.

    Raises:
        CaseError: the file is absent, unreadable, truncated, not 3D/4D or holds NaN/Inf.
    """
    cid = case_id or case_id_of(path)
    if not os.path.isfile(path):
        raise CaseError(cid, path, "file does not exist")
    try:
        layers = slicer_layers(path)
        img = _LOADER(str(path)) if layers is None else layers
    except Exception as e:  # readers raise many types for truncated / corrupt files
        reason = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
        raise CaseError(cid, path, f"cannot be read as NIfTI/NRRD (truncated or corrupt?): {reason}") from e
    if img.ndim != 4:
        raise CaseError(cid, path, f"expected a 3D or 4D volume, got shape {tuple(img.shape)}")
    bad = 0 if torch.isfinite(img.sum()) else int((~torch.isfinite(img)).sum())  # one pass when all is finite
    if bad:
        raise CaseError(cid, path, f"holds {bad} non-finite voxels (NaN/Inf); fix or re-export the image")
    return img


LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def slicer_layers(path: str | os.PathLike[str]) -> MetaTensor | None:
    """A 3D Slicer ``.seg.nrrd`` whose segments lie on several layers (overlapping segments: an NRRD of kinds ``list
    domain domain domain``, which MONAI's reader cannot read) as (L, H, W, D) in RAS, one channel per layer; None
    for any other file."""
    if not str(path).endswith(".seg.nrrd"):
        return None
    try:
        header = nrrd.read_header(str(path))
    except Exception:  # noqa: BLE001 - not NRRD, truncated: MONAI's reader says why
        return None
    if int(header.get("dimension", 0)) != 4 or list(header.get("kinds") or [])[:1] != ["list"]:
        return None
    data, header = nrrd.read(str(path))
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.asarray(header["space directions"], dtype=np.float64)[-3:].T
    ijk_to_lps[:3, 3] = np.asarray(header["space origin"], dtype=np.float64)
    to_ras = LPS_TO_RAS if header.get("space") in ("left-posterior-superior", "LPS") else np.eye(4)
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)),
                      affine=torch.from_numpy(to_ras @ ijk_to_lps))


def metaimage_header(path: str | os.PathLike[str]) -> Any:
    """SimpleITK's reader of the MetaImage file at ``path`` with its header read (size, spacing, components), the
    voxels not; raises what SimpleITK raises for a file it cannot read."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


def volume_channels(path: str | os.PathLike[str]) -> int | None:
    """The channels :func:`load_volume` would give the NIfTI or NRRD file at ``path``, from its header alone (1 for a
    3D volume, C for a 4D one holding every modality); None when the header does not read (loading says why)."""
    try:
        if str(path).endswith(".nrrd"):
            return int(np.prod([int(n) for n in nrrd.read_header(str(path))["sizes"]][3:]))
        if str(path).lower().endswith(".mha"):
            reader = metaimage_header(path)
            return int(np.prod(reader.GetSize()[3:])) * reader.GetNumberOfComponents()
        return int(np.prod(nib.load(str(path)).header.get_data_shape()[3:]))  # type: ignore[attr-defined]
    except Exception:  # absent, truncated or not an image: load_volume's error names the problem
        return None


def format_mm(sizes: Sequence[float] | np.ndarray) -> str:
    """A voxel size (mm, per axis) as messages and tables show it.

    Example:
        >>> format_mm([2.0, 2.0, 3.0]), format_mm((0.6875, 0.6875, 1.25))
        ('2 x 2 x 3', '0.688 x 0.688 x 1.25')
    """
    return " x ".join(f"{float(v):.3g}" for v in sizes)


def voxel_mm(affine: Any) -> list[float]:
    """The voxel size (mm, to 0.001) of a grid's 4 x 4 affine along the RAS axes (left-right, back-front, down-up),
    whatever the order its array axes are stored in (a sagittal series' as an axial one's): the order the network
    sees a case in (nibabel's closest-RAS axes, as :func:`crossmodal.transforms.to_canonical` permutes them), and the
    one ``data.spacing`` and the weights' record are written in.

    Example:
        >>> voxel_mm(np.diag([2.0, -2.0, 3.0, 1.0]))
        [2.0, 2.0, 3.0]
        >>> voxel_mm(torch.tensor([[0.0, 0, 3, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]]))  # stored sagittal
        [3.0, 1.0, 1.0]
    """
    a = np.asarray(affine, dtype=np.float64)
    sizes = [round(float(v), 3) for v in np.sqrt((a[:3, :3] ** 2).sum(0))]
    ornt = nib.orientations.io_orientation(a)
    if not np.isfinite(ornt).all():  # a degenerate axis: its own order
        return sizes
    out = [0.0, 0.0, 0.0]
    for j, axis in enumerate(ornt[:, 0]):
        out[int(axis)] = sizes[j]
    return out


def on_array_axes(ras_mm: Sequence[float], affine: Any) -> tuple[float, float, float]:
    """A voxel size along the RAS axes (``data.spacing``, a weights' record) as it lies on the array axes of the
    grid with this 4 x 4 affine: the size to resample that grid to so that the network, which sees it in RAS order,
    sees ``ras_mm``.

    Example:
        >>> on_array_axes([2.0, 2.0, 3.0], np.diag([1.0, 1.0, 1.0, 1.0]))
        (2.0, 2.0, 3.0)
        >>> on_array_axes([2.0, 2.0, 3.0], np.array([[0.0, 0, 1, 0], [0, 1, 0, 0], [-1, 0, 0, 0], [0, 0, 0, 1]]))
        (3.0, 2.0, 2.0)
    """
    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    if not np.isfinite(ornt).all():
        return float(ras_mm[0]), float(ras_mm[1]), float(ras_mm[2])
    a, b, c = (float(ras_mm[int(axis)]) for axis in ornt[:, 0])
    return a, b, c


def header_affine(path: str | os.PathLike[str]) -> np.ndarray:
    """The 4 x 4 affine (array axes -> mm; world axes in the file's own space, RAS or LPS: their order and the steps'
    lengths are what count) of the NIfTI, NRRD or MetaImage file at ``path``, from its header alone."""
    name = str(path).lower()
    out = np.eye(4)
    if name.endswith(".nrrd"):
        out[:3, :3] = np.asarray(nrrd.read_header(str(path))["space directions"], dtype=np.float64)[-3:].T
    elif name.endswith(".mha"):
        reader = metaimage_header(path)
        direction = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(reader.GetDimension(), -1)
        out[:3, :3] = direction[:3, :3] * np.asarray(reader.GetSpacing()[:3], dtype=np.float64)[None, :]
    else:
        out = np.asarray(nib.load(str(path)).affine, dtype=np.float64)  # type: ignore[attr-defined]
    return out


def header_spacing(path: str | os.PathLike[str]) -> tuple[float, float, float] | None:
    """The voxel size (mm, along the RAS axes as :func:`voxel_mm` gives it) of the NIfTI, NRRD or MetaImage file at
    ``path`` from its header alone; None when the header does not read."""
    try:
        a, b, c = voxel_mm(header_affine(path))
        return a, b, c
    except Exception:  # absent, truncated or not an image: loading it says why
        return None


def volume_3d(vol: MetaTensor, case_id: str, path: str | os.PathLike[str] | None) -> MetaTensor:
    """``vol`` (C, H, W, D) as it was, or a :class:`CaseError` where it is one slice thick along an axis: a 2D image
    (a slice exported alone, a series split into single slices) that a 3D network would segment from padding.

    Example:
        >>> try:
        ...     volume_3d(MetaTensor(torch.zeros(1, 8, 8, 1)), "c1", "c1.nii.gz")
        ... except CaseError as e:
        ...     print(str(e).split(";")[0])
        case 'c1': file c1.nii.gz: is a single slice (grid (8, 8, 1))
    """
    if min(vol.shape[1:]) < 2:
        raise CaseError(case_id, path, f"is a single slice (grid {tuple(vol.shape[1:])}); the app segments 3D "
                                       "volumes: send the whole series (a series split into single slices is read "
                                       "as one case per slice)")
    return vol


def channel_name(index: int, count: int, name: str | None = None) -> str:
    """How a message names channel ``index`` of a ``count``-channel file: ``"channel 1 of 3 ('pet') "``."""
    return f"channel {index} of {count}{f' ({name!r})' if name else ''} "


def blank_message(vol: torch.Tensor, names: Sequence[str] = ()) -> str | None:
    """What is wrong with ``vol`` (C, H, W, D) where a channel holds one value in every voxel (a failed export or
    reconstruction, a series of no signal: nothing for a network to read, and mutual information cannot align it);
    None for an image. A channel of several is named by its number and, given ``names`` (one a channel), its name.

        >>> blank_message(torch.zeros(1, 4, 4, 4)), blank_message(torch.arange(64.0).reshape(1, 4, 4, 4))
        ('holds one value (0) in every voxel: no image (a failed export or reconstruction?)', None)
        >>> blank_message(torch.stack([torch.arange(64.0).reshape(4, 4, 4), torch.ones(4, 4, 4)]), ("ct", "pet"))
        "channel 1 of 2 ('pet') holds one value (1) in every voxel: no image (a failed export or reconstruction?)"
    """
    for i, channel in enumerate(vol):
        lo, hi = torch.aminmax(torch.as_tensor(channel))
        if float(lo) == float(hi):
            which = "" if len(vol) == 1 else channel_name(i, len(vol), names[i] if i < len(names) else None)
            return (f"{which}holds one value ({float(lo):g}) in every voxel: no image (a failed export or "
                    "reconstruction?)")
    return None


def image_volume(vol: MetaTensor, case_id: str, path: str | os.PathLike[str] | None,
                 names: Sequence[str] = ()) -> MetaTensor:
    """``vol`` as it was, or a :class:`CaseError` where it is a single slice (:func:`volume_3d`) or a channel holds
    one value everywhere (:func:`blank_message`, naming it by ``names``): an image a case can be segmented from."""
    problem = blank_message(volume_3d(vol, case_id, path), names)
    if problem:
        raise CaseError(case_id, path, f"{problem}; re-export the series")
    return vol


def one_volume(vol: MetaTensor, case_id: str, path: str | os.PathLike[str] | None) -> MetaTensor:
    """``vol`` (1, H, W, D) as it was, or a :class:`CaseError` where it holds several (a 4D file) where one
    modality's single volume belongs."""
    if vol.shape[0] != 1:
        raise CaseError(case_id, path, f"holds {vol.shape[0]} volumes (a 4D file: frames of a dynamic or gated series, "
                                       f"or channels) on a {tuple(vol.shape[1:])} grid; a modality is one 3D volume: "
                                       "keep the frame to segment with, or their sum")
    return vol


def resample_to(img: MetaTensor, ref: MetaTensor, mode: str = "bilinear") -> MetaTensor:
    """Resample ``img`` (C, ...) onto the grid of ``ref`` in physical space; outside its field of view -> 0."""
    if img.shape[1:] == ref.shape[1:] and torch.allclose(img.affine.double(), ref.affine.double(), atol=1e-4):
        return img
    # align_corners=False is MONAI's voxel-centre convention: exact in physical space (tests/test_io.py)
    out = ResampleToMatch(mode=mode, padding_mode="zeros", align_corners=False, dtype=np.float32)(img, img_dst=ref)
    return out  # type: ignore[return-value]


def same_grid(a: MetaTensor, b: MetaTensor, atol_mm: float = 1e-3) -> bool:
    """True when two volumes have the same spatial shape and affine (within ``atol_mm``)."""
    return tuple(a.shape[1:]) == tuple(b.shape[1:]) and bool(
        torch.allclose(a.affine.double(), b.affine.double(), atol=atol_mm)
    )


def read_label(path: str | os.PathLike[str], ref: MetaTensor, case_id: str) -> np.ndarray:
    """Read a label map and check it lies on the grid of ``ref``; returns int64 (H, W, D)."""
    lab = load_volume(path, case_id)
    if lab.shape[0] != 1:
        raise CaseError(case_id, path, f"a label must be one 3D label map, got {lab.shape[0]} channels on a "
                                       f"{tuple(lab.shape[1:])} grid (a file's 4th axis is read as channels)")
    if not same_grid(lab, ref):
        placed = onto_lattice(lab, ref, case_id, path)
        if placed is None:
            raise CaseError(
                case_id, path,
                f"label grid {tuple(lab.shape[1:])} / affine {np.round(lab.affine.numpy(), 3).tolist()} differs from "
                f"the image grid {tuple(ref.shape[1:])} / {np.round(ref.affine.numpy(), 3).tolist()}; "
                f"export the label on the primary image's grid",
            )
        lab = placed
    arr = lab[0].numpy()
    rounded = np.rint(arr)
    if not np.allclose(arr, rounded, atol=1e-3):
        raise CaseError(case_id, path, "label values must be integers")
    return rounded.astype(np.int64)


def onto_lattice(lab: MetaTensor, ref: MetaTensor, case_id: str, path: str | os.PathLike[str] | None
                 ) -> MetaTensor | None:
    """A label (1, h, w, d) on ``ref``'s voxel lattice (the same axes and spacing, an origin a whole number of voxels
    away) but of another extent, as 3D Slicer saves a segmentation cropped to its segments' extent (or grown past
    the image), placed into ``ref``'s grid (1, H, W, D) exactly: 0 where it holds nothing. None where it is not on
    the lattice; a :class:`CaseError` where labelled voxels lie outside the image.

        >>> ref = MetaTensor(torch.zeros(1, 6, 6, 6), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
        >>> crop = MetaTensor(torch.ones(1, 2, 2, 2), affine=torch.tensor(
        ...     [[2.0, 0, 0, 4], [0, 2, 0, 2], [0, 0, 2, 6], [0, 0, 0, 1]]))  # from voxel (2, 1, 3), 2 x 2 x 2
        >>> placed = onto_lattice(crop, ref, "c1", "c1.seg.nrrd")
        >>> tuple(placed.shape), int(placed.sum()), placed[0, 2:4, 1:3, 3:5].min().item()
        ((1, 6, 6, 6), 8, 1.0)
        >>> onto_lattice(MetaTensor(torch.ones(1, 2, 2, 2), affine=torch.diag(torch.tensor([2.0, 2, 2, 1])) +
        ...     torch.tensor([[0, 0, 0, 1.0], [0] * 4, [0] * 4, [0] * 4])), ref, "c1", None) is None  # half a voxel
        True
    """
    m = np.linalg.inv(ref.affine.double().numpy()) @ lab.affine.double().numpy()
    offset = np.rint(m[:3, 3])
    if not (np.allclose(m[:3, :3], np.eye(3), atol=1e-3) and np.allclose(m[:3, 3], offset, atol=1e-3)):
        return None
    src = lab.as_tensor()
    out = torch.zeros((src.shape[0], *ref.shape[1:]), dtype=src.dtype)
    lo = [int(o) for o in offset]
    dst_sl = tuple(slice(max(0, o), min(n, o + k)) for o, n, k in zip(lo, ref.shape[1:], src.shape[1:], strict=True))
    src_sl = tuple(slice(d.start - o, d.stop - o) for d, o in zip(dst_sl, lo, strict=True))
    if any(d.stop <= d.start for d in dst_sl):
        inside = 0
    else:
        out[(slice(None), *dst_sl)] = src[(slice(None), *src_sl)]
        inside = int(torch.count_nonzero(src[(slice(None), *src_sl)]))
    outside = int(torch.count_nonzero(src)) - inside
    if outside:
        raise CaseError(case_id, path, f"{outside} labelled voxels lie outside the image (the label's grid "
                                       f"{tuple(src.shape[1:])} from voxel {tuple(lo)} of the image's "
                                       f"{tuple(ref.shape[1:])}); draw within the image")
    return MetaTensor(out, affine=ref.affine.clone())


def save_volume(path: str | os.PathLike[str], array: np.ndarray, affine: np.ndarray,
                segments: Mapping[str, int] | None = None, nrrd_fields: Mapping[str, Any] | None = None) -> None:
    """Write a (H, W, D) array with a RAS ``affine`` as NIfTI or NRRD, or a (H, W, D, C) one as NIfTI, atomically.

    ``segments`` {name: label value}: a ``.seg.nrrd`` names them in its header as 3D Slicer's segmentation files do
    (slicerio, :func:`slicer_segmentation`), so Slicer shows the classes by name; other formats ignore them.
    ``nrrd_fields``: header fields of another file written as they are into an NRRD without ``segments`` (e.g. the
    segment fields of a Slicer file moved onto another grid); with them a (H, W, D, L) array is a ``.seg.nrrd`` of L
    layers (overlapping segments, as :func:`slicer_layers` reads them)."""
    path = Path(path)
    _, ext = split_ext(path)
    array = np.asarray(array)
    layered = array.ndim == 4 and ext == ".seg.nrrd" and bool(nrrd_fields)  # a Slicer file's layers, moved
    if array.ndim == 4 and not layered and ext in (".nrrd", ".seg.nrrd", ".mha"):  # MONAI's readers cannot read it back
        raise ValueError(f"{path}: a {array.shape[-1]}-channel volume is written as NIfTI (.nii.gz); NRRD and "
                         "MetaImage hold one 3D volume here")
    if array.dtype in (np.int64, np.uint64):  # NIfTI tools dislike 64-bit integers: use the smallest type that fits
        lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
        array = array.astype(next(t for t in (np.uint8, np.int16, np.int32) if np.iinfo(t).min <= lo
                                  and hi <= np.iinfo(t).max))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=ext)
    os.close(fd)
    try:
        if ext in (".nii.gz", ".nii"):
            img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
            img.set_qform(affine, code=1)
            img.set_sform(affine, code=1)
            nib.save(img, tmp)
        elif ext in (".nrrd", ".seg.nrrd"):
            lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)[:3]
            if segments and ext == ".seg.nrrd":
                ijk_to_lps = np.vstack([lps, [0.0, 0.0, 0.0, 1.0]])
                slicerio.write_segmentation(tmp, slicer_segmentation(np.asarray(array), ijk_to_lps, segments))
            else:
                header = {**(nrrd_fields or {}), "space": "left-posterior-superior",
                          "space directions": lps[:, :3].T.tolist(), "space origin": lps[:, 3].tolist(),
                          "encoding": "gzip"}
                if layered:  # (H, W, D, L) -> Slicer's (L, H, W, D), a layer per segment layer
                    array = np.moveaxis(np.asarray(array), -1, 0)
                    header.update({"kinds": ["list", "domain", "domain", "domain"],
                                   "space directions": [[np.nan] * 3, *header["space directions"]]})
                nrrd.write(tmp, np.asarray(array), header=header)
        elif ext == ".mha":  # MONAI's ITK writer: RAS affine -> ITK's LPS direction, origin and spacing
            writer = ITKWriter(output_dtype=array.dtype, affine_lps_to_ras=True)
            writer.set_data_array(np.asarray(array), channel_dim=None)
            writer.set_metadata({"affine": np.asarray(affine, dtype=np.float64), "spatial_shape": array.shape},
                                resample=False)
            writer.write(tmp, compression=True)
        else:
            raise ValueError(f"{path}: unsupported extension {ext!r}; use one of {IMAGE_EXTENSIONS}")
        publish_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# distinct colours for the segments of a .seg.nrrd, in class order (Slicer picks its own from its terminology)
SEGMENT_COLORS = ((0.85, 0.33, 0.31), (0.36, 0.72, 0.36), (0.26, 0.55, 0.79), (0.94, 0.77, 0.28),
                  (0.60, 0.40, 0.75), (0.30, 0.75, 0.80), (0.95, 0.55, 0.20), (0.70, 0.70, 0.70))


def slicer_segmentation(array: np.ndarray, ijk_to_lps: np.ndarray, segments: Mapping[str, int]) -> dict:
    """A (H, W, D) label map as slicerio's segmentation (what ``slicerio.write_segmentation`` writes as 3D Slicer's
    ``.seg.nrrd``): one layer, a segment per ``segments`` {name: label value}, in order of value, with its name, value
    and a colour (:func:`crossmodal.labels.seg_nrrd_values` reads them back)."""
    ordered = sorted(segments.items(), key=lambda kv: kv[1])
    return {"voxels": array, "ijkToLPS": ijk_to_lps, "containedRepresentationNames": ["Binary labelmap"],
            "segments": [{"id": f"Segment_{value}", "name": name, "labelValue": int(value), "layer": 0,
                          "color": list(SEGMENT_COLORS[i % len(SEGMENT_COLORS)]), "nameAutoGenerated": False,
                          "colorAutoGenerated": False} for i, (name, value) in enumerate(ordered)]}


def write_cached_label(path: Path, label: np.ndarray) -> None:
    """A label map (a small integer type: they shrink ~100x) to ``path`` as a compressed ``.npz``, atomically."""
    buf = io.BytesIO()
    np.savez_compressed(buf, label=label)
    atomic_write_bytes(path, buf.getvalue())


def read_cached_label(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The label map :func:`write_cached_label` wrote to ``path``; ValueError saying what is wrong with the file
    ("is unreadable (...)", "has shape ..., not ...")."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            arr = stored["label"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"is unreadable ({e})") from e
    if arr.shape != tuple(shape):
        raise ValueError(f"has shape {arr.shape}, not {tuple(shape)}")
    return arr


def staging_folder(parent: str | os.PathLike[str], prefix: str) -> Path:
    """A new folder ``<parent>/<prefix><host>-<pid>-<random>`` (hidden where ``prefix`` starts with a dot) to write a
    whole output in before it is moved into place, or to keep copies in while a run lasts; first removes the folders
    of ``prefix`` that a process of this host no longer running (or a zombie) left (killed by SIGKILL, a power cut:
    a whole dataset's copy, hidden, each time), and says so in the log. A folder of a
    running process, or of another host sharing the folder, stays.

        >>> root = Path(tempfile.mkdtemp())
        >>> left = root / f".ds.import-{socket.gethostname()}-999999999-abc"  # no such process
        >>> left.mkdir()
        >>> new = staging_folder(root, ".ds.import-")
        >>> left.exists(), new.name.startswith(f".ds.import-{socket.gethostname()}-{os.getpid()}-")
        (False, True)
        >>> other = root / f".ds.import-{socket.gethostname()}-999999998-999999999-abc"  # host <this host>-999999998
        >>> other.mkdir(); _ = staging_folder(root, ".ds.import-"); other.exists()
        True
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    mine = f"{prefix}{socket.gethostname()}-"
    for old in parent.glob(f"{glob.escape(mine)}*"):
        # <pid>-<mkdtemp's letters, digits, _>: not a host whose name starts with this one's and a "-"
        found = re.fullmatch(r"(\d+)-[A-Za-z0-9_]+", old.name[len(mine):])
        pid = found.group(1) if found else ""
        if pid and old.is_dir() and not _running(int(pid)):  # another user's counts as running
            shutil.rmtree(old, ignore_errors=True)
            logger.warning(f"{old}: removed, left by a process (pid {pid}) killed before it was done with it")
    return Path(tempfile.mkdtemp(prefix=f"{mine}{os.getpid()}-", dir=parent))


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs: a killed one its parent has not reaped yet (a zombie) does not."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # another user's
        return True


def process_identity() -> dict[str, Any]:
    """This process as a record another process can check later with :func:`process_alive`: host, pid and start
    time (a pid alone is reused once its process is gone)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": round(psutil.Process().create_time(), 2)}


def process_alive(identity: Mapping[str, Any]) -> bool | None:
    """Whether the process :func:`process_identity` recorded still runs: True / False on this host, None where that
    cannot be known (another host's, or a record that does not read).

        >>> process_alive(process_identity()), process_alive({**process_identity(), "started": 1.0})
        (True, False)
        >>> process_alive({"host": "elsewhere", "pid": 1, "started": 1.0}) is None
        True
    """
    pid, started = identity.get("pid"), identity.get("started")
    if (identity.get("host") != socket.gethostname() or not isinstance(pid, int) or pid < 1
            or not isinstance(started, (int, float))):
        return None
    try:
        process = psutil.Process(pid)
        # a killed process its parent has not reaped yet (MONAI Label's Stop Training) is a zombie: gone
        return abs(process.create_time() - started) < 0.05 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # another user's: it runs, whether it is that one cannot be told
        return None


def atomic_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy ``src`` to ``dst`` through a temp file in the destination folder and ``os.replace``."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            while chunk := inp.read(1 << 20):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        publish_mode(tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class OutputFolder:
    """A folder a command writes one map per case into (``predict``, ``propagate``), with a JSON manifest beside
    them whose ``files`` lists every map a command wrote there, over its runs. A map may replace only one of those:
    an ``--out`` on a studies folder, its ``truth`` or ``labels/final``, or an nnU-Net ``labelsTs`` would have
    overwritten images or labels.

    Use: :meth:`check` the names before any work; :meth:`writing` a name before its file is written (a run killed
    in between leaves it listed) and :meth:`save` the manifest after each case.
    """

    def __init__(self, path: str | os.PathLike[str], manifest: str) -> None:
        self.path, self.manifest = Path(path), Path(path) / manifest
        self.files = {n for n in self._listed() if (self.path / n).exists()}  # earlier runs' maps still there
        self.summary: dict[str, object] = {}

    def _listed(self) -> set[str]:
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            return {str(n) for n in json.loads(self.manifest.read_text())["files"]}
        return set()

    def check(self, names: Sequence[str], option: str = "--out") -> None:
        """Raises ValueError naming the first of ``names`` that would replace a file no run listed."""
        clash = next((n for n in names if (self.path / n).exists() and n not in self.files), None)
        if clash:
            raise ValueError(f"{option} {self.path}: a map would replace {self.path / clash}, which no earlier run "
                             f"wrote there (not in its {self.manifest.name}); give a new or empty folder")

    def writing(self, name: str) -> Path:
        """``name``'s path, listed in the manifest before the caller writes it."""
        self.files.add(name)
        self.save()
        return self.path / name

    def save(self, **summary: object) -> None:
        """The manifest: ``summary`` (merged over earlier calls') and ``files``, written atomically."""
        self.summary.update(summary)
        atomic_write_bytes(self.manifest, json.dumps({**self.summary, "files": sorted(self.files)}, indent=2).encode())
