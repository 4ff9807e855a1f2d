"""DICOM in and out: volumes as image series, label maps as DICOM SEG, and SEG back onto the primary grid.

Volumes here are NIfTI-style: ``array[i, j, k]`` with a RAS ``affine`` (voxel -> mm). DICOM speaks LPS; a slice
``k`` is written with its columns along ``i`` and its rows along ``j`` (``PixelSpacing = [dj, di]``), so
SimpleITK's/GDCM's series reader gives back the same grid (tested by a round trip).

SEG files are made by dcmqi's ``itkimage2segimage`` through MONAI Label's converter (the ``dcmqi`` wheel puts it
on PATH; nothing is downloaded at run time), and by highdicom on an enhanced (multi-frame) image, which dcmqi
cannot reference. Segments carry the class names of the label config, so reading a SEG maps segment numbers back
to label values by name, whatever numbering the writer chose.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from crossmodal.config import CrossModalConfig, LabelConfig, written_temp
from crossmodal.labels import name_key, overlay

if TYPE_CHECKING:
    from crossmodal.serving.dicomweb import Series

logger = logging.getLogger(__name__)

SOP_CLASS = {  # DICOM Modality -> image storage SOP class
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "PT": "1.2.840.10008.5.1.4.1.1.128",
}
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
SEG_DESCRIPTION = "crossmodal {kind} label"


def _int16(array: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Stored int16 values and (slope, intercept) with ``value = stored * slope + intercept``."""
    if np.issubdtype(array.dtype, np.integer) and array.min() >= -32768 and array.max() <= 32767:
        return array.astype(np.int16), 1.0, 0.0
    lo, hi = float(array.min()), float(array.max())
    intercept = (hi + lo) / 2
    slope = max((hi - lo) / 2 / 32000, 1e-6)
    stored = np.clip(np.rint((array - intercept) / slope), -32768, 32767).astype(np.int16)
    return stored, slope, intercept


def volume_to_series(array: np.ndarray, affine: np.ndarray, modality: str, study: Dataset, series_number: int,
                     description: str, window: tuple[float, float] | None = None,
                     uid_seed: str | None = None) -> list[Dataset]:
    """One DICOM image series (one instance per slice ``k``) of ``array`` (I, J, K) with RAS ``affine`` (4, 4).

    Args:
        modality: DICOM Modality (``CT``, ``MR``, ``PT``).
        study: patient/study attributes shared by the study's series (``StudyInstanceUID``, ``PatientID``, ...).
        window: (low, high) display window for viewers; default the 0.5 / 99.5 percentiles of the volume.
        uid_seed: the series, frame of reference and instance UIDs derived from it (the same seed, the same UIDs:
            a PACS keeps one copy of a series stored twice); default fresh random UIDs.
    """
    if array.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {array.shape}")
    if modality not in SOP_CLASS:
        raise ValueError(f"DICOM Modality {modality!r} is not one of {sorted(SOP_CLASS)}")
    a = LPS @ np.asarray(affine, dtype=np.float64)
    di, dj, dk = np.sqrt((a[:3, :3] ** 2).sum(0))
    row_dir, col_dir = a[:3, 0] / di, a[:3, 1] / dj
    array = np.asarray(array)
    if modality == "MR" and not np.issubdtype(array.dtype, np.integer):
        # MR signal is in arbitrary units: written as a 12-bit scanner does (0..4095-ish integers, slope 1), since
        # viewers round display windows to whole units and a 0..1 float range would show as one grey level
        array = np.rint(array * (4000.0 / max(float(np.abs(array).max()), 1e-6))).astype(np.int16)
    stored, slope, intercept = _int16(array)
    lo, hi = window or tuple(float(v) for v in np.percentile(array, [0.5, 99.5]))
    def uid(*what: str) -> UID:
        return generate_uid(entropy_srcs=[uid_seed, *what]) if uid_seed else generate_uid()

    series_uid, frame_uid = uid("series"), uid("frame of reference")
    now = _dt.datetime.now()
    out = []
    for k in range(array.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(SOP_CLASS[modality])
        meta.MediaStorageSOPInstanceUID = uid("instance", str(k))
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.is_little_endian, ds.is_implicit_VR = True, False
        for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
                    "StudyDate", "StudyTime", "StudyDescription", "AccessionNumber", "ReferringPhysicianName"):
            if key in study:
                setattr(ds, key, study[key].value)
        ds.SOPClassUID, ds.SOPInstanceUID = SOP_CLASS[modality], meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = modality, series_uid, series_number
        ds.SeriesDescription, ds.FrameOfReferenceUID = description, frame_uid
        ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [float(v) for v in (a @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [float(dj), float(di)]
        ds.SliceThickness = float(dk)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(array.shape[1]), int(array.shape[0])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{intercept:.10g}"
        ds.WindowCenter, ds.WindowWidth = f"{(lo + hi) / 2:.6g}", f"{max(hi - lo, 1e-3):.6g}"
        if modality == "PT":
            ds.Units, ds.DecayCorrection, ds.CorrectedImage = "BQML", "START", ["ATTN", "DECY"]
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        out.append(ds)
    return out


def new_study(case_id: str, description: str = "crossmodal demo", uid: str | None = None) -> Dataset:
    """Patient/study attributes for one case (PatientID = case id; StudyInstanceUID ``uid``, default a fresh one)."""
    ds = Dataset()
    today = _dt.date.today().strftime("%Y%m%d")
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = case_id, case_id, "", "O"
    ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = uid or generate_uid(), case_id[-16:], ""
    ds.StudyDate, ds.StudyTime, ds.StudyDescription, ds.ReferringPhysicianName = today, "120000", description, ""
    return ds


def write_series(datasets: Iterable[Dataset], folder: str | os.PathLike[str]) -> list[Path]:
    """Write instances as ``<folder>/<SOPInstanceUID>.dcm``; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        p = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(p, write_like_original=False)
        paths.append(p)
    return paths


def segment_info(cfg: LabelConfig, values: Sequence[int]) -> list[dict]:
    """MONAI Label ``label_info`` (one entry per present non-zero value, ascending) naming the segments."""
    names = {v: k for k, v in cfg.classes.items()}
    names[cfg.marked_background] = cfg.marked_background_name
    out = []
    for v in values:
        name = names[int(v)]
        out.append({"name": name, "segmentAttribute": {
            "labelID": int(v), "SegmentLabel": name, "SegmentDescription": name,
            "SegmentAlgorithmType": "MANUAL",
            "SegmentedPropertyCategoryCodeSequence": {"CodeValue": "91723000", "CodingSchemeDesignator": "SCT",
                                                      "CodeMeaning": "Anatomical Structure"},
            "SegmentedPropertyTypeCodeSequence": {"CodeValue": "85756007", "CodingSchemeDesignator": "SCT",
                                                  "CodeMeaning": "Tissue"},
            "recommendedDisplayRGBValue": [int(c) for c in _color(int(v))]}})
    return out


def _color(v: int) -> tuple[int, int, int]:
    palette = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180)]
    return (128, 128, 128) if v >= 255 else palette[(v - 1) % len(palette)]


def label_to_seg(label_file: str | os.PathLike[str], series_dir: str | os.PathLike[str], cfg: LabelConfig,
                 kind: str) -> Path:
    """A DICOM SEG file (temp path) of a NIfTI/NRRD label map on the grid of the image series in ``series_dir``:
    written by dcmqi's itkimage2segimage on single-frame series, by highdicom on an enhanced (multi-frame) one, in
    one file or split over several.

    Raises:
        ValueError: the label has no non-zero voxel (DICOM SEG cannot hold an empty segmentation).
        RuntimeError: dcmqi or highdicom failed (its message is included).
    """
    from monailabel.datastore.utils.convert import nifti_to_dicom_seg

    from crossmodal.io import load_volume, save_volume

    vol = load_volume(label_file)  # NIfTI or (Slicer's .seg.)NRRD, in RAS
    arr = np.rint(vol[0].numpy()).astype(np.uint16)
    values = [int(v) for v in np.unique(arr) if v != 0]
    if not values:
        raise ValueError("the label is empty (all 0): DICOM SEG needs at least one segment")
    files = sorted(f for f in Path(series_dir).iterdir() if f.is_file())
    heads = [pydicom.dcmread(str(files[0]), stop_before_pixels=True)] if files else []
    if heads and "PerFrameFunctionalGroupsSequence" in heads[0]:  # enhanced: one multi-frame file, or several
        heads += [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files[1:]]
        source, frames_of = _merged_source(heads) if len(heads) > 1 else (heads[0], None)
        return _multiframe_seg(arr, vol.affine.double().numpy(), source, cfg, values, kind, frames_of)
    _dcmqi_on_path()
    info = segment_info(cfg, values)
    info[0]["model_name"] = SEG_DESCRIPTION.format(kind=kind)
    nii = written_temp(".nii.gz", lambda p: save_volume(p, arr, vol.affine.double().numpy()))
    try:
        out = nifti_to_dicom_seg(str(series_dir), nii, info)
    except Exception as e:
        raise RuntimeError(f"dcmqi itkimage2segimage failed: {e}") from e
    finally:
        Path(nii).unlink(missing_ok=True)
    if not out or not os.path.isfile(out) or os.path.getsize(out) == 0:
        raise RuntimeError("dcmqi itkimage2segimage wrote no DICOM SEG")
    return Path(out)


def _merged_source(heads: Sequence[Dataset]) -> tuple[Dataset, list[tuple[Dataset, int]]]:
    """The headers of a series split over several multi-frame files as one multi-frame header (highdicom references
    one multi-frame source image): the files' frames one after the other, each frame's plane position, orientation
    and pixel spacing its own. Returns it and, per frame of it, (the file's header, the frame's number there)."""
    import copy

    merged = copy.deepcopy(heads[0])
    groups, frames_of = [], []
    for head in heads:
        shared = (head.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
        for n, group in enumerate(head.get("PerFrameFunctionalGroupsSequence") or [Dataset()] * _frames(head)):
            own = copy.deepcopy(group)
            for key in ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence"):
                if key not in own and key in shared:
                    own[key] = copy.deepcopy(shared[key])
            groups.append(own)
            frames_of.append((head, n + 1))
    merged.PerFrameFunctionalGroupsSequence = groups
    merged.NumberOfFrames = len(groups)
    return merged, frames_of


def _instance(head: Dataset) -> Dataset:
    """A reference to the SOP instance ``head`` (class and instance UID)."""
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = head.SOPClassUID, head.SOPInstanceUID
    return item


def _multiframe_seg(arr: np.ndarray, affine: np.ndarray, source: Dataset, cfg: LabelConfig, values: Sequence[int],
                    kind: str, frames_of: Sequence[tuple[Dataset, int]] | None = None) -> Path:
    """DICOM SEG (temp path) of label map ``arr`` (I, J, K; RAS ``affine``) on the frames of one multi-frame image
    ``source`` (an Enhanced CT / MR / PET file), written with highdicom: dcmqi's itkimage2segimage references
    single-frame series only. Each frame's pixels take the label of the voxel at their position (the frame's own
    plane position, orientation and pixel spacing, else the shared ones); one segment per value in ``values``.
    ``frames_of``: for a series split over several files (:func:`_merged_source`), the file and frame each frame
    of ``source`` comes from; the SEG's references then name those.

    Raises:
        RuntimeError: a frame lies off the label's grid, or highdicom refused the SEG (its message is included).
    """
    import highdicom as hd
    from pydicom.sr.coding import Code

    for key in ("PatientBirthDate", "PatientSex", "ReferringPhysicianName", "AccessionNumber", "StudyID",
                "StudyDate", "StudyTime"):
        if key not in source:  # type 2 attributes a SEG copies: present, maybe empty, as a scanner leaves them
            setattr(source, key, "")
    shared = (source.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    rows, cols = int(source.Rows), int(source.Columns)
    to_index = np.linalg.inv(LPS @ np.asarray(affine, dtype=np.float64))
    number = {v: n + 1 for n, v in enumerate(values)}  # segment numbers 1..n in the order of the label values
    lut = np.zeros(int(arr.max()) + 1, dtype=np.uint16)
    for v, n in number.items():
        lut[v] = n
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    frames = np.zeros((int(source.NumberOfFrames), rows, cols), dtype=np.uint16)
    for f, group in enumerate(source.PerFrameFunctionalGroupsSequence):
        iop = _functional(group, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
        ipp = _functional(group, shared, "PlanePositionSequence", "ImagePositionPatient")
        spacing = _functional(group, shared, "PixelMeasuresSequence", "PixelSpacing")
        if iop is None or ipp is None or spacing is None:
            raise RuntimeError(f"frame {f + 1} of the image has no plane position, orientation or pixel spacing")
        along_row, along_col = np.asarray(iop, float).reshape(2, 3)
        world = (np.asarray(ipp, float)[:, None, None] + along_row[:, None, None] * (c * float(spacing[1]))
                 + along_col[:, None, None] * (r * float(spacing[0])))
        ijk = np.rint(np.einsum("ab,bxy->axy", to_index[:3, :3], world) + to_index[:3, 3, None, None]).astype(int)
        inside = [(0 <= ijk[a]) & (ijk[a] < arr.shape[a]) for a in range(3)]
        if not (inside[0] & inside[1] & inside[2]).all():
            raise RuntimeError(f"frame {f + 1} of the image at {[float(v) for v in ipp]} mm is not on the label's "
                               f"grid {tuple(arr.shape)}")
        frames[f] = lut[arr[ijk[0], ijk[1], ijk[2]]]
    if "SharedFunctionalGroupsSequence" not in source:
        source.SharedFunctionalGroupsSequence = [shared]
    for key in ("PixelMeasuresSequence", "PlaneOrientationSequence"):  # highdicom reads the SEG's plane geometry
        first = source.PerFrameFunctionalGroupsSequence[0]              # from the shared group only
        if key not in shared and key in first:  # (the first frame's: a volume's frames share them)
            shared[key] = first[key]
    names = {v: k for k, v in cfg.classes.items()}
    names[cfg.marked_background] = cfg.marked_background_name
    anatomy, tissue = Code("91723000", "SCT", "Anatomical Structure"), Code("85756007", "SCT", "Tissue")
    segments = [hd.seg.SegmentDescription(segment_number=n, segment_label=names[v], segmented_property_category=anatomy,
                                          segmented_property_type=tissue, algorithm_type="MANUAL")
                for v, n in number.items()]
    try:
        seg = hd.seg.Segmentation(
            source_images=[source], pixel_array=frames, segmentation_type="BINARY", segment_descriptions=segments,
            series_instance_uid=hd.UID(), series_number=300,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="crossmodal",
            manufacturer_model_name="crossmodal", software_versions=f"highdicom {hd.__version__}",
            device_serial_number="0", series_description=SEG_DESCRIPTION.format(kind=kind))
    except (ValueError, TypeError, AttributeError) as e:
        raise RuntimeError(f"highdicom could not write DICOM SEG on the multi-frame image: {e}") from e
    if frames_of is not None:  # references to the merged header -> to the file and frame each frame came from
        for group in seg.PerFrameFunctionalGroupsSequence:
            for derivation in group.get("DerivationImageSequence") or []:
                for ref in derivation.get("SourceImageSequence") or []:
                    head, frame = frames_of[int(ref.ReferencedFrameNumber) - 1]
                    ref.ReferencedSOPInstanceUID, ref.ReferencedFrameNumber = head.SOPInstanceUID, frame
        heads = list({str(h.SOPInstanceUID): h for h, _ in frames_of}.values())
        seg.SourceImageSequence = [_instance(h) for h in heads]
        seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence = [_instance(h) for h in heads]
    seg.SeriesDate, seg.SeriesTime = seg.ContentDate, seg.ContentTime  # the newest SEG of a case is the label
    return Path(written_temp(".dcm", seg.save_as))


def _dcmqi_on_path() -> None:
    """MONAI Label runs ``itkimage2segimage`` by name: the ``dcmqi`` wheel puts it beside this Python."""
    if shutil.which("itkimage2segimage"):
        return
    here = Path(sys.executable).parent
    if not (here / "itkimage2segimage").exists():
        raise FileNotFoundError("dcmqi's itkimage2segimage is not installed: `pip install -r requirements.txt` "
                                "(dcmqi) in this environment")
    os.environ["PATH"] = f"{here}{os.pathsep}{os.environ.get('PATH', '')}"


def seg_kind(ds: Dataset) -> str | None:
    """The label kind recorded in a SEG's SeriesDescription by :func:`label_to_seg` (None: another writer)."""
    desc = str(ds.get("SeriesDescription", ""))
    for kind in ("dense", "sparse"):
        if desc == SEG_DESCRIPTION.format(kind=kind):
            return kind
    return None


def seg_to_label(seg_file: str | os.PathLike[str], cfg: LabelConfig, affine: np.ndarray,
                 shape: Sequence[int]) -> np.ndarray:
    """A DICOM SEG as a label map (I, J, K) on the grid (RAS ``affine``, ``shape``) of its referenced image.

    Segment numbers map to label values by SegmentLabel (class names, ``marked_background_name``; case, spaces and
    punctuation aside); frames are placed by their ImagePositionPatient, so a SEG that skips empty slices lands on
    the right slices; a FRACTIONAL SEG's voxel belongs to a segment where its value is at least half the maximum. A
    voxel in several segments (a lesion drawn inside its organ) takes the value of the smallest of them.

    Raises:
        ValueError: a segment names no configured class, or a frame lies off the grid.
    """
    ds = pydicom.dcmread(str(seg_file))
    names = {**cfg.classes, cfg.marked_background_name: cfg.marked_background}
    by_key = {name_key(n): v for n, v in names.items()}  # another tool's "Grey Matter" is our grey_matter
    values = {}
    for seg in ds.SegmentSequence:
        name = str(seg.SegmentLabel)
        if name_key(name) not in by_key:
            raise ValueError(f"segment {int(seg.SegmentNumber)} {name!r} is not a configured class "
                             f"{sorted(names)} (case, spaces and punctuation aside)")
        values[int(seg.SegmentNumber)] = by_key[name_key(name)]
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
    # a FRACTIONAL SEG (an AI tool's probabilities or occupancy) holds a voxel where it is at least half in
    cut = float(ds.get("MaximumFractionalValue", 255)) / 2 if ds.get("SegmentationType") == "FRACTIONAL" else 0.5
    inv = np.linalg.inv(LPS @ np.asarray(affine, dtype=np.float64))
    grid = tuple(int(s) for s in shape)
    slices: dict[int, list[tuple[int, int]]] = {number: [] for number in values}  # segment -> [(frame, slice k)]
    for f, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        pos = [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
        i, j, k = np.rint(inv @ [*pos, 1.0])[:3].astype(int)
        if i != 0 or j != 0 or not 0 <= k < grid[2] or frames[f].shape != (grid[1], grid[0]):
            raise ValueError(f"frame {f + 1} at {pos} (grid index {(i, j, k)}) is not a slice of the image grid "
                             f"{grid}")
        slices[number].append((f, int(k)))

    def mask(number: int) -> np.ndarray:  # the segment's voxels (I, J, K)
        out = np.zeros(grid, dtype=bool)
        for f, k in slices[number]:
            out[:, :, k] |= frames[f].T >= cut
        return out

    # overlapping segments (a lesion drawn inside its organ, as viewers allow): the smaller segment keeps the shared
    # voxels, whatever the segments' numbering or frame order
    out, shared = overlay([(functools.partial(mask, n), values[n]) for n in slices], grid,
                          np.uint8 if cfg.marked_background < 256 else np.uint16)
    if shared:
        logger.info("%s: %d voxels lie in more than one segment; each went to the smallest of its segments", seg_file,
                    shared)
    return out


def case_to_dicom(case_id: str, files: dict[str, str | None], cfg: CrossModalConfig, out: str | os.PathLike[str],
                  label: str | None = None, label_kind: str = "dense") -> dict[str, Path]:
    """Write one case as one study: a series per modality present in ``files`` (name -> NIfTI/NRRD path, config
    order, the primary first) under ``<out>/<case>/<name>/``, and its label as SEG at ``<out>/<case>/seg.dcm``.

    Series get SeriesNumber = modality position + 1 and SeriesDescription = the modality name, which the
    config's default matching rules find again. Every UID derives from the case id and the content (the study's
    from its images, a series' from its volume, the SEG's from the label): the same case written twice is the same
    DICOM, which a PACS stores once (fresh UIDs made a second study of the case at each upload, a second case on
    the server); changed images make a new study. Returns the written folders (and ``seg``) by name.
    """
    import torch
    from monai.data import MetaTensor

    from crossmodal.io import CaseError, load_volume, read_label, same_grid, save_volume

    volumes = {}
    for m in cfg.modalities:
        path = files.get(m.name)
        if path is None:
            continue
        img = load_volume(path, case_id)  # MONAI's readers: NIfTI and NRRD (nibabel alone read no NRRD)
        if img.shape[0] != 1:
            raise CaseError(case_id, path, f"expected a 3D volume, got shape {tuple(img.shape[1:])} with "
                                           f"{img.shape[0]} channels")
        arr, affine = img[0].numpy(), img.affine.double().numpy()
        volumes[m.name] = arr, affine, _digest(case_id, m.name, arr, affine)
    study = new_study(case_id, uid=generate_uid(entropy_srcs=[case_id, *(d for _, _, d in volumes.values())]))
    root = Path(out) / case_id
    written: dict[str, Path] = {}
    for n, m in enumerate(cfg.modalities):
        if m.name not in volumes:
            continue
        arr, affine, digest = volumes[m.name]
        if np.array_equal(arr, np.rint(arr)):  # whole numbers (CT in HU, a scanner's MR) stay exact, slope 1
            arr = arr.astype(np.int32)
        window = m.window if m.kind == "ct" else None
        series = volume_to_series(arr, affine, m.dicom_modality, study, n + 1, m.name, window,
                                  uid_seed=f"{study.StudyInstanceUID}/{digest}")
        write_series(series, root / m.name)
        written[m.name] = root / m.name
    if label is not None:
        primary = cfg.modality_names[0]
        vol = load_volume(label, case_id)
        digest = _digest(case_id, "seg", vol[0].numpy(), vol.affine.double().numpy())
        arr, affine, _ = volumes[primary]
        ref = MetaTensor(torch.empty(1, *arr.shape), affine=torch.as_tensor(affine))
        on_grid = None
        if not same_grid(vol, ref):  # cropped to its segments (3D Slicer): placed; another grid: CaseError (before
            placed = read_label(label, ref, case_id).astype(np.uint16)  # a temp file is made: one was left behind)
            on_grid = written_temp(".nii.gz", lambda p: save_volume(p, placed, affine))
        try:
            seg = label_to_seg(on_grid or label, written[primary], cfg.labels, label_kind)
        finally:
            if on_grid:
                Path(on_grid).unlink(missing_ok=True)
        try:
            ds = pydicom.dcmread(str(seg))
            ds.SeriesInstanceUID = generate_uid(entropy_srcs=[study.StudyInstanceUID, "seg series", digest,
                                                              label_kind])
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
                entropy_srcs=[study.StudyInstanceUID, "seg", digest, label_kind])
            ds.save_as(str(root / "seg.dcm"))
        finally:
            Path(seg).unlink(missing_ok=True)
        written["seg"] = root / "seg.dcm"
    return written


def _digest(case_id: str, name: str, array: np.ndarray, affine: np.ndarray) -> str:
    """SHA-256 of a volume's voxels, dtype, shape and affine, with the case and the modality's name."""
    h = hashlib.sha256(f"{case_id}/{name}/{array.dtype}/{array.shape}".encode())
    h.update(np.ascontiguousarray(affine, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def upload(paths: Iterable[str | os.PathLike[str]], url: str, batch: int = 64) -> int:
    """Store DICOM files in a DICOMweb server (STOW-RS) in batches; returns the number stored."""
    from crossmodal.serving.dicomweb import make_client

    client = make_client(url)
    files = [Path(p) for p in paths]
    for i in range(0, len(files), batch):
        client.store_instances([pydicom.dcmread(str(p)) for p in files[i : i + batch]])
    return len(files)


def _series_date(ds: Dataset) -> str:
    return f"{ds.get('SeriesDate', '')}{ds.get('SeriesTime', '')}"


def scan_dicom(folder: str | os.PathLike[str]) -> tuple[dict[str, list[Path]], dict[str, list[Dataset]], int]:
    """Every DICOM file under ``folder`` by series: ``({series uid: files}, {series uid: their headers, in the same
    order}, files that are not DICOM)``; headers are read once, without pixel data."""
    from pydicom.errors import InvalidDicomError

    files: dict[str, list[Path]] = {}
    headers: dict[str, list[Dataset]] = {}
    other = 0
    for p in sorted(Path(folder).rglob("*")):
        if not p.is_file():
            continue
        try:
            ds = pydicom.dcmread(str(p), stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            ds = None
        if ds is None or not all(k in ds for k in ("SeriesInstanceUID", "StudyInstanceUID", "Modality")):
            other += 1  # not DICOM, or no image / SEG instance (a DICOMDIR)
            continue
        files.setdefault(str(ds.SeriesInstanceUID), []).append(p)
        headers.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    return files, headers, other


def describe_series(s: Series) -> str:
    """A series as a user finds it in a viewer: ``MR 'T1 localizer' #1``."""
    return f"{s.modality} {s.description!r} #{s.number}"


def _referenced_series(seg: Dataset) -> str | None:
    refs = seg.get("ReferencedSeriesSequence") or []
    return str(refs[0].SeriesInstanceUID) if refs and "SeriesInstanceUID" in refs[0] else None


def _case_ids(cases: Iterable[str], headers: dict[str, Dataset]) -> dict[str, str]:
    """``{primary series uid: case id}``: the PatientID as a file name (``[A-Za-z0-9._-]``), ``_2``, ``_3`` ... for a
    patient's later studies (by StudyDate) or a name already taken, ``case_1``, ``case_2`` ... where there is none."""
    import re

    by_patient: dict[str, list[str]] = {}
    for uid in cases:
        pid = re.sub(r"[^A-Za-z0-9._-]+", "_", str(headers[uid].get("PatientID", ""))).strip("._")
        by_patient.setdefault(pid, []).append(uid)
    ids: dict[str, str] = {}
    for pid, uids in sorted(by_patient.items()):
        uids.sort(key=lambda u: (str(headers[u].get("StudyDate", "")), str(headers[u].StudyInstanceUID)))
        for uid in uids:
            n, taken = 1, set(ids.values())
            while (cid := (pid or "case") + (f"_{n}" if n > 1 or not pid else "")) in taken:
                n += 1
            ids[uid] = cid
    return ids


def series_to_nifti(files: Sequence[Path], dest: Path, case_id: str, headers: Sequence[Dataset] | None = None) -> None:
    """One series' files -> NIfTI at ``dest`` (MONAI Label's ``dicom_to_nifti``; atomic), checked whole; ``headers``:
    the files' headers when already read (:func:`scan_dicom`), else read here.

    Raises:
        CaseError: naming ``case_id`` and the series' folder: slices unevenly spaced (one missing), fewer voxels
            read than the files hold (ITK leaves out a slice it cannot decode, with a warning only), or no volume.
    """
    from monailabel.datastore.utils.convert import dicom_to_nifti

    from crossmodal.io import CaseError, atomic_copy, load_volume
    from crossmodal.io import format_mm as _mm

    where = files[0].parent
    heads = list(headers) if headers is not None else [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files]
    expected_mm = _check_slices(heads, where, case_id)
    frame_counts = [_frames(h) for h in heads]
    with tempfile.TemporaryDirectory(prefix="crossmodal-series-") as tmp:
        for n, f in enumerate(files):
            os.symlink(f.resolve(), Path(tmp) / f"{n:05d}.dcm")
        try:
            links = sorted(Path(tmp).iterdir())
            # ITK's series reader takes each file for one slice, GDCM gives every frame of a file the first one's
            # rescale, and ITK types a series by its first file's rescale: those cases are read as each needs
            if max(frame_counts) > 1 and (len(files) > 1 or len(set(_rescales(heads[0]))) > 1):
                nii = _read_multiframe(links, files, heads, case_id)
            elif len({r for h in heads for r in _rescales(h)}) > 1:
                nii = _read_series(Path(tmp))
            else:
                nii = dicom_to_nifti(tmp)
        except CaseError:
            raise
        except Exception as e:  # noqa: BLE001 - the reader's error, named with the series
            raise CaseError(case_id, where, f"series of {len(files)} files does not read as one volume "
                                            f"({type(e).__name__}: {e})") from e
        try:
            vol = load_volume(nii, case_id)  # finite, 3D: or a CaseError
            header = heads[0]
            frames = sum(frame_counts)
            expected = int(header.Rows) * int(header.Columns) * frames
            if int(np.prod(vol.shape[1:])) != expected:  # ITK leaves out a slice it cannot decode, and goes on
                raise CaseError(case_id, where, f"series of {len(files)} files ({header.Rows} x {header.Columns}) read "
                                                f"as {tuple(vol.shape[1:])} voxels: a file's pixel data is cut short "
                                                "or unreadable; export the series again")
            read_mm = np.sqrt((np.asarray(vol.affine, dtype=np.float64)[:3, :3] ** 2).sum(0))
            if expected_mm is not None and not np.allclose(sorted(read_mm), sorted(expected_mm), rtol=0.01,
                                                           atol=1e-3):
                kind = (f"multi-frame file of {frames} frames" if len(files) == 1 and frames > 1
                        else f"series of {len(files)} files")
                raise CaseError(case_id, where, f"{kind} read with voxels of {_mm(read_mm)} mm where its headers "
                                                f"say {_mm(expected_mm)} mm: the reader lost its geometry; export "
                                                "the series again (as single-frame images if it stays so)")
            atomic_copy(nii, dest)
        finally:
            Path(nii).unlink(missing_ok=True)


def _image_type(header: Dataset) -> list[str]:
    """ImageType's values (one string where a writer gave one)."""
    value = header.get("ImageType", [])
    return [str(value)] if isinstance(value, str) else [str(v) for v in value]


def _frames(header: Dataset) -> int:
    return int(header.get("NumberOfFrames", 1) or 1)


def _rescales(header: Dataset) -> list[tuple[float, float]]:
    """(slope, intercept) of each frame of a file (a single-frame file's one; an enhanced file's per frame, from
    each frame's pixel value transformation, else the shared one): ``value = stored * slope + intercept``."""
    def pair(where: Dataset) -> tuple[float, float]:
        return float(where.get("RescaleSlope", 1) or 1), float(where.get("RescaleIntercept", 0) or 0)

    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None:
        return [pair(header)]
    shared = (header.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    out = []
    for group in per_frame:
        items = group.get("PixelValueTransformationSequence") or shared.get("PixelValueTransformationSequence")
        out.append(pair(items[0] if items else header))
    return out


def _read_series(folder: Path) -> str:
    """A series of single-frame files whose rescale differs from file to file (a PET scanner scales each slice to
    its own range) -> NIfTI (temp path; the caller removes it) of float32 values. ITK types the volume by the first
    file: where that one's rescale is whole numbers (slope 1, as on an empty end slice), every slice was read into
    int16, the others' fractions cut and a hot slice clipped at 32767."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    reader.SetOutputPixelType(sitk.sitkFloat32)
    image = reader.Execute()  # a series that does not read leaves no temp file behind
    return written_temp(".nii.gz", lambda out: sitk.WriteImage(image, out))


def _read_multiframe(links: Sequence[Path], files: Sequence[Path], heads: Sequence[Dataset], case_id: str) -> str:
    """An enhanced series (one or several multi-frame files: an enhanced scanner's export of a long series, a DICOM
    concatenation) -> one NIfTI (temp path; the caller removes it): each file read as a volume by ITK (GDCM), the
    volumes stacked along their slice axis in the order of their positions. A file whose frames carry rescales of
    their own gets its values from its stored pixels and each frame's rescale (GDCM applies the first frame's to
    every frame). ``links``: the files to read, in the order of ``files`` (their names in messages) and of
    ``heads`` (their headers).

    Raises:
        CaseError: naming the file whose orientation, pixel grid or slice step differs from the first file's, whose
            frames do not continue the previous file's, or whose per-frame rescaled pixels cannot be decoded.
    """
    import SimpleITK as sitk

    from crossmodal.io import CaseError
    from crossmodal.io import format_mm as _mm

    parts = []
    for link, name, header in zip(links, files, heads, strict=True):
        reader = sitk.ImageFileReader()
        reader.SetImageIO("GDCMImageIO")
        reader.SetFileName(str(link))
        rescale = np.asarray(_rescales(header), dtype=np.float64)
        if len(np.unique(rescale, axis=0)) == 1:
            parts.append((reader.Execute(), name))
            continue
        reader.ReadImageInformation()  # the grid only: the pixels are decoded once, by pydicom, below
        try:
            stored = pydicom.dcmread(str(link)).pixel_array.reshape(len(rescale), *reader.GetSize()[1::-1])
        except Exception as e:  # noqa: BLE001 - pydicom's decoders raise many types
            raise CaseError(case_id, name, f"its frames carry rescales of their own, and its pixel data cannot be "
                                           f"decoded to apply them ({type(e).__name__}: {e}); export the series "
                                           "uncompressed") from e
        values = stored.astype(np.float32)  # ITK's slice k is frame k of the file; float32 (a CT of 500 frames:
        del stored                          # 0.5 GB, float64 twice that)
        values *= rescale[:, :1, None].astype(np.float32)
        values += rescale[:, 1:, None].astype(np.float32)
        image = sitk.GetImageFromArray(values)
        image.SetOrigin(reader.GetOrigin())
        step = np.asarray(reader.GetSpacing(), dtype=np.float64)  # frames head to feet: GDCM's step is negative,
        axes = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(len(step), len(step))  # which ITK's
        axes[:, step < 0] *= -1                                                # reader turns into a flipped axis
        image.SetSpacing(tuple(float(v) for v in np.abs(step)))
        image.SetDirection(tuple(float(v) for v in axes.ravel()))
        parts.append((image, name))
    # the grid of the first file of several frames (ITK gives a file of one frame no slice step of its own)
    first, first_name = next((p for p in parts if p[0].GetSize()[2] > 1), parts[0])
    direction = np.asarray(first.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(first.GetSpacing(), dtype=np.float64)
    for part, name in parts:
        own, step, size = np.asarray(part.GetDirection()).reshape(3, 3), np.asarray(part.GetSpacing()), part.GetSize()
        along = slice(None) if size[2] > 1 else slice(0, 2)  # a single frame: its rows and columns only
        if size[:2] != first.GetSize()[:2] or not np.allclose(own[:, along], direction[:, along], atol=1e-4) \
                or not np.allclose(step[along], spacing[along], rtol=1e-3):
            raise CaseError(case_id, name, f"its {size[2]} frame(s) ({size[0]} x {size[1]}, {_mm(step)} mm) do not "
                                           f"share the grid of {first_name.name} ({first.GetSize()[0]} x "
                                           f"{first.GetSize()[1]}, {_mm(spacing)} mm), whose series it is part of; "
                                           "export the series again")
    slice_step = direction[:, 2] * spacing[2]
    parts.sort(key=lambda p: float(np.dot(p[0].GetOrigin(), slice_step)))
    for (before, before_name), (after, name) in zip(parts, parts[1:], strict=False):
        expected = np.asarray(before.GetOrigin()) + slice_step * before.GetSize()[2]
        if not np.allclose(after.GetOrigin(), expected, atol=0.01 * spacing[2] + 1e-3):
            at, end = (", ".join(f"{v:.2f}" for v in xyz) for xyz in (after.GetOrigin(), expected))
            raise CaseError(case_id, name, f"its frames start at ({at}) mm where the frames of {before_name.name} "
                                           f"end at ({end}) mm: the files do not continue each other; export the "
                                           "series again")
    volume = sitk.GetImageFromArray(np.concatenate([sitk.GetArrayFromImage(p) for p, _ in parts], axis=0))
    volume.SetOrigin(parts[0][0].GetOrigin())
    volume.SetSpacing(tuple(float(v) for v in spacing))
    volume.SetDirection(first.GetDirection())
    return written_temp(".nii.gz", lambda out: sitk.WriteImage(volume, out))


def _functional(group: Dataset, shared: Dataset, sequence: str, name: str) -> Any:
    """Attribute ``name`` of a multi-frame file's frame from its functional group ``sequence``: the frame's own
    (``group``), else the shared one; None where neither has it."""
    for where in (group, shared):
        items = where.get(sequence)
        if items is not None and len(items) and name in items[0]:
            return items[0][name].value
    return None


def _geometry(heads: Sequence[Dataset]) -> tuple[np.ndarray, list[np.ndarray], tuple[float, float] | None] | None:
    """A series' plane geometry from its headers: (row and column direction cosines (2, 3), the position of every
    slice, (row spacing, column spacing) in mm or None) - single-frame files' own attributes, or a multi-frame
    file's per-frame functional groups (else its shared ones, as an enhanced CT / MR / PET scanner writes them);
    None where a slice or frame lacks its position or orientation."""
    orientation, positions, spacing = None, [], None
    for h in heads:
        per_frame = h.get("PerFrameFunctionalGroupsSequence")
        if per_frame is not None:  # an enhanced file, of one frame or more
            shared = (h.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
            for group in per_frame:
                iop = _functional(group, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
                ipp = _functional(group, shared, "PlanePositionSequence", "ImagePositionPatient")
                if iop is None or ipp is None:
                    return None
                orientation = orientation if orientation is not None else np.asarray(iop, float).reshape(2, 3)
                positions.append(np.asarray(ipp, float))
                pixel = _functional(group, shared, "PixelMeasuresSequence", "PixelSpacing")
                spacing = spacing or (tuple(float(v) for v in pixel) if pixel is not None else None)
        else:
            if "ImagePositionPatient" not in h or "ImageOrientationPatient" not in h:
                return None
            orientation = orientation if orientation is not None else \
                np.asarray(h.ImageOrientationPatient, float).reshape(2, 3)
            positions.append(np.asarray(h.ImagePositionPatient, float))
            spacing = spacing or (tuple(float(v) for v in h.PixelSpacing) if "PixelSpacing" in h else None)
    if orientation is None:
        return None
    return orientation, positions, spacing  # type: ignore[return-value]


def _check_slices(heads: Sequence[Dataset], where: Path, case_id: str) -> tuple[float, float, float] | None:
    """A series' slices (single-frame files, or the frames of a multi-frame one) evenly spaced along their normal, or
    a CaseError naming the gap (a slice left out of an export or a send, a frame left out of an enhanced file: the
    volume would be read with the wrong spacing) and ``where``. Returns the voxel spacing the headers give
    (column, row, slice to slice; mm), or None where they do not say."""
    from crossmodal.io import CaseError

    geometry = _geometry(heads)
    if geometry is None:
        return None
    (row, col), positions, spacing = geometry
    what = "frames" if len(heads) == 1 else "slices"
    normal = np.cross(row, col)
    stacked = sorted(positions, key=lambda p: float(np.dot(p, normal)))
    depth = [float(np.dot(p, normal)) for p in stacked]
    if len(depth) < 2:
        return None
    gaps = np.diff(depth)
    shared = int((np.abs(gaps) < 1e-3).sum())
    if shared:  # a 4D series: diffusion directions, echoes, dynamic (PET) frames, cardiac phases ... under one UID
        at = depth[int(np.argmax(np.abs(gaps) < 1e-3))]
        raise CaseError(case_id, where, f"{shared} of {len(depth)} {what} lie where another does (the first at "
                                        f"{at:.2f} mm): the series holds more than one volume (diffusion directions, "
                                        "echoes, dynamic frames or phases, or two series under one UID); export the "
                                        "volume to segment as a series of its own")
    step = float(np.median(gaps))
    worst = int(np.argmax(np.abs(gaps - step)))
    if len(depth) >= 3 and abs(gaps[worst] - step) > 0.01 * abs(step) + 1e-3:
        one = "a frame" if what == "frames" else "a slice"
        raise CaseError(case_id, where, f"{what} at {depth[worst]:.2f} and {depth[worst + 1]:.2f} mm are "
                                        f"{gaps[worst]:.2f} mm apart, the others {step:.2f} mm: {one} is missing "
                                        "(or two series share this UID)")
    # slice to slice along the positions, as ITK spaces a series (a gantry tilt makes it longer than along the normal)
    along = float(np.median(np.linalg.norm(np.diff(np.asarray(stacked), axis=0), axis=1)))
    return (spacing[1], spacing[0], along) if spacing is not None else None


def scan_series(folder: str | os.PathLike[str]) -> tuple[dict[str, list[Path]], dict[str, list[Dataset]], int,
                                                          list[Any]]:
    """:func:`scan_dicom`'s files, headers and count of other files, and each series as the PACS datastore lists
    one (:class:`crossmodal.serving.dicomweb.Series`)."""
    from crossmodal.serving.dicomweb import Series

    files, headers, other = scan_dicom(folder)
    series = [Series(uid, str(heads[0].StudyInstanceUID), str(heads[0].Modality),
                     str(heads[0].get("SeriesDescription", "")), int(heads[0].get("SeriesNumber", 0) or 0),
                     _series_date(heads[0]), images=sum(_frames(h) for h in heads),
                     localizer="LOCALIZER" in [str(v).upper() for v in _image_type(heads[0])])
              for uid, heads in headers.items()]
    return files, headers, other, series


def guess_dicom_preset(series: Sequence[Any], default: str, where: str,
                       configs_dir: str | os.PathLike[str] | None = None, option: str = "--config"
                       ) -> tuple[str, str | None]:
    """The preset for DICOM series given without one (``crossmodal data from-dicom`` without ``--config``): the one
    whose modalities' series (DICOM Modality and SeriesDescription, as :func:`~crossmodal.serving.dicomweb.
    match_studies` matches them) the most studies have every one of; ``default`` where it is among those, or where
    no study has every series of any preset (the import then says what it found). Returns (preset, a line saying
    why, or None where it is ``default``). ``option``: the option that names a preset (the server's ``--conf
    preset``).

    Raises:
        ConfigError: several presets fit as many studies (presets that extend another are not counted apart).
    """
    from crossmodal.config import ConfigError, default_configs_dir
    from crossmodal.data.studies import candidate_presets, modalities
    from crossmodal.serving.dicomweb import match_studies

    presets, extends = candidate_presets(Path(configs_dir) if configs_dir else default_configs_dir())
    whole = {name: sum(all(s is not None for s in case.siblings.values())
                       for case in match_studies(list(series), cfg.modalities).values())
             for name, cfg in presets.items()}
    best = max(whole.values(), default=0)
    fits = {name for name, n in whole.items() if n == best}
    if best == 0 or default in fits:
        return default, None
    roots = sorted(n for n in fits if extends.get(n) not in fits)
    studies = len({s.study for s in series})
    if len(roots) > 1:
        raise ConfigError(f"the DICOM series under {where} fit the presets {roots} alike ({best} of {studies} studies "
                          f"have every series of each); say which with {option}")
    return roots[0], (f"{option} not given: preset {roots[0]!r} ({modalities(presets[roots[0]])}), the one whose "
                      f"series {best} of the {studies} studies under {where} have (the default, {default!r}, takes "
                      f"{modalities(presets[default]) if default in presets else 'others'}; studies with all its "
                      f"series: {whole.get(default, 0)})")


def import_dicom(folder: str | os.PathLike[str], out: str | os.PathLike[str], cfg: CrossModalConfig,
                 progress: bool = True, skip_existing: bool = False,
                 scanned: tuple[dict[str, list[Path]], dict[str, list[Dataset]], int, list[Any]] | None = None
                 ) -> list[dict]:
    """A folder of DICOM files (any layout, as a PACS export or a CD gives them) -> a studies folder.

    Each study whose series include one the config's primary modality takes (DICOM Modality, SeriesDescription
    regex; :func:`crossmodal.serving.dicomweb.match_studies`, as the PACS datastore matches them) becomes a case:
    ``<out>/<case>.nii.gz``, ``<out>/<sidecar>/<case>/<modality>.nii.gz`` for the secondary series found, and the
    newest DICOM SEG on the primary series (ours or another writer's whose segments name configured classes) as
    ``<out>/labels/final/<case>.nii.gz``. The case id is the PatientID (``_2`` ... for a patient's later studies).
    The primary image is written last, so a case killed half-way is not listed as a case.

    Returns one record per case: ``case``, ``study``, ``series`` (modality -> SeriesInstanceUID or None),
    ``skipped`` (the study's series not imported: ``MR 'localizer' #1``, older SEGs, SEGs on another series),
    ``label`` (``dense`` / ``sparse`` / None) or ``error`` (that case not imported; the others are). A study without
    a primary series is a warning naming its series. ``skip_existing``: a case whose primary image ``out`` already
    holds (an earlier import of the folder, before the cases it named were fixed) is left as it is, its record
    ``existing: True``; without it such a case is refused. ``scanned``: :func:`scan_series` of ``folder``, where
    the caller has read it (to guess the preset: :func:`guess_dicom_preset`).

    Raises:
        ValueError: no DICOM study with a primary series under ``folder``, or ``out`` holding one of the cases
            (:func:`crossmodal.data.studies.check_new_cases`), before anything is written.
    """
    from tqdm import tqdm

    from crossmodal.data.studies import FINAL_LABELS, check_new_cases, primary_images
    from crossmodal.io import CaseError, atomic_copy, load_volume, save_volume
    from crossmodal.labels import classify
    from crossmodal.serving.dicomweb import match_studies

    files, headers, other, series = scanned or scan_series(folder)
    first = {uid: heads[0] for uid, heads in headers.items()}
    cases = match_studies(series, cfg.modalities)
    if not cases:
        # as a viewer lists them (two series of one modality and description were one entry, without numbers)
        found = [describe_series(s) for s in sorted(series, key=lambda s: (s.number, s.modality, s.uid))]
        primary = cfg.modalities[0]
        rule = f" whose description matches {primary.series_description!r}" if primary.series_description else ""
        raise ValueError(f"{folder}: no study with a {primary.dicom_modality} series{rule} for {primary.name!r} among "
                         f"{len(files)} DICOM series ({found[:8]}) and {other} other files; the config's "
                         "modalities name the series they take (dicom_modality, series_description)")
    ids = _case_ids(cases, first)
    for study in sorted({s.study for s in series} - {c.study for c in cases.values()}):
        in_it = sorted((s for s in series if s.study == study), key=lambda s: (s.number, s.uid))
        logger.warning(f"{folder}: study {study} (patient {first[in_it[0].uid].get('PatientID', '')}) has no series "
                       f"for {cfg.modality_names[0]!r} among {[describe_series(s) for s in in_it]}; not imported")
    root = Path(out)
    there = set(primary_images(root)) if skip_existing and root.is_dir() else set()
    records = [{"case": ids[uid], "study": case.study, "existing": True}
               for uid, case in sorted(cases.items(), key=lambda kv: ids[kv[0]]) if ids[uid] in there]
    cases = {uid: case for uid, case in cases.items() if ids[uid] not in there}
    check_new_cases(root, [ids[uid] for uid in cases], sidecar_dir=cfg.data.sidecar_dir,
                    instead="give a new folder, --skip-existing to import only the cases not there yet")
    segs = sorted((s for s in series if s.modality == "SEG"), key=lambda s: s.when)
    for uid, case in tqdm(sorted(cases.items(), key=lambda kv: ids[kv[0]]), desc="DICOM -> studies", unit="case",
                          disable=not progress):
        cid = ids[uid]
        record: dict = {"case": cid, "study": case.study, "series": {
            cfg.modality_names[0]: uid, **{n: s.uid if s else None for n, s in case.siblings.items()}}}
        taken = {uid, *(s.uid for s in case.siblings.values() if s)}
        on_it = [s for s in segs if _referenced_series(first[s.uid]) == uid]
        record["skipped"] = [describe_series(s) + ("" if s.modality != "SEG" else " (older SEG)" if s in on_it[:-1] else
                                             " (SEG on another series)")
                             for s in sorted(series, key=lambda s: (s.number, s.uid))
                             if s.study == case.study and s.uid not in taken and (not on_it or s != on_it[-1])]
        try:
            with tempfile.TemporaryDirectory(prefix="crossmodal-import-") as tmp:  # the case whole, then moved in
                made = {cfg.modality_names[0]: Path(tmp) / "primary.nii.gz"}
                series_to_nifti(files[uid], made[cfg.modality_names[0]], cid, headers[uid])
                for name, s in case.siblings.items():
                    if s is not None:
                        made[name] = Path(tmp) / f"{name}.nii.gz"
                        series_to_nifti(files[s.uid], made[name], cid, headers[s.uid])
                record["label"] = None
                if on_it:
                    ref = load_volume(made[cfg.modality_names[0]], cid)
                    seg_file = files[on_it[-1].uid][0]
                    try:
                        arr = seg_to_label(seg_file, cfg.labels, ref.affine.double().numpy(), ref.shape[1:])
                    except (ValueError, AttributeError, KeyError, IndexError) as e:  # another writer's SEG, too
                        raise CaseError(cid, seg_file, f"DICOM SEG: {e}") from e
                    save_volume(Path(tmp) / "label.nii.gz", arr, ref.affine.double().numpy())
                    record["label"] = classify(arr, cfg.labels)
                    atomic_copy(Path(tmp) / "label.nii.gz", root / FINAL_LABELS / f"{cid}.nii.gz")
                for name, path in made.items():  # the primary last: a case killed before it is no case
                    if name != cfg.modality_names[0]:
                        atomic_copy(path, root / cfg.data.sidecar_dir / cid / f"{name}.nii.gz")
                atomic_copy(made[cfg.modality_names[0]], root / f"{cid}.nii.gz")
        except CaseError as e:
            record["error"] = str(e)
        records.append(record)
    return records

