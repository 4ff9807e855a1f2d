"""A real PACS: Orthanc (Debian packages) with DICOMweb, our app on it, driven by MONAI Label's client.

Studies are uploaded with the real ``crossmodal data to-dicom --upload``; labels go back as DICOM SEG.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import nrrd
import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk
from conftest import PRETRAINED_PHANTOM, dice, make_phantom_studies, snapshot, start_server, stop_server
from crossmodal.cli import main
from crossmodal.config import ModalityConfig, load_config
from crossmodal.data.phantom import make_phantom
from crossmodal.data.sparse import scribbles
from crossmodal.data.studies import generate
from crossmodal.dicom import label_to_seg, new_study, seg_kind, seg_to_label, volume_to_series, write_series
from crossmodal.io import load_volume, resample_to, save_volume
from crossmodal.ohif import run_model_in_ohif
from crossmodal.orthanc import Orthanc
from crossmodal.serving.dicomweb import Series, make_client, match_studies
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

pytestmark = pytest.mark.slow
CFG = load_config("phantom")


def test_volume_to_series_round_trips_oblique_grids_and_values(tmp_path):
    """Written as DICOM, read back by SimpleITK's series reader: same grid (rotated, anisotropic) and values."""
    rng = np.random.default_rng(0)
    rot = np.array([[0.98, -0.17, 0.0], [0.17, 0.98, 0.0], [0.0, 0.0, 1.0]])
    rot /= np.linalg.norm(rot, axis=0)
    affine = np.eye(4)
    affine[:3, :3] = rot * [1.5, 2.0, 3.5]
    affine[:3, 3] = [-30.0, 12.5, 40.0]
    ints, floats = rng.integers(-1000, 2000, (12, 9, 7)).astype(np.int16), rng.normal(5, 2, (12, 9, 7))
    for arr, modality in ((ints, "CT"), (floats.astype(np.float32), "PT"), (floats.astype(np.float32), "MR")):
        series = volume_to_series(arr, affine, modality, new_study("c1"), 3, "t2")
        assert len(series) == 7 and series[0].Rows == 9 and series[0].Columns == 12
        files = write_series(series, tmp_path / modality)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(files[0].parent)))
        sitk.WriteImage(reader.Execute(), str(tmp_path / f"{modality}.nii.gz"))
        back = load_volume(tmp_path / f"{modality}.nii.gz")
        np.testing.assert_allclose(back.affine.numpy(), affine, atol=1e-4)
        if modality == "CT":  # integers (HU) exactly
            np.testing.assert_array_equal(back[0].numpy(), arr)
        elif modality == "PT":  # real units through RescaleSlope / Intercept
            np.testing.assert_allclose(back[0].numpy(), arr, atol=np.ptp(arr) / 60000)
        else:  # MR, arbitrary units: 12-bit integers proportional to the signal
            scale = 4000 / np.abs(arr).max()
            np.testing.assert_allclose(back[0].numpy(), np.rint(arr * scale), atol=0.5)
            assert back[0].numpy().max() == 4000


def test_label_seg_round_trip_keeps_values_kind_and_marked_background(tmp_path):
    """Label -> DICOM SEG (dcmqi) -> label on the image grid: identical, marked background (255) included."""
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    image = np.zeros((16, 12, 8), np.int16)
    write_series(volume_to_series(image, affine, "CT", new_study("c2"), 1, "ct"), tmp_path / "ct")
    label = np.zeros((16, 12, 8), np.uint8)
    label[2:6, 3:7, 2] = 1
    label[8:10, 1:3, 5] = 3
    label[12, 10, 6] = 255  # a scribble of marked background: a sparse label
    import nibabel as nib

    nib.save(nib.Nifti1Image(label, affine), tmp_path / "label.nii.gz")
    seg = label_to_seg(tmp_path / "label.nii.gz", tmp_path / "ct", CFG.labels, "sparse")
    ds = pydicom.dcmread(str(seg))
    assert ds.Modality == "SEG" and seg_kind(ds) == "sparse"
    assert sorted(str(s.SegmentLabel) for s in ds.SegmentSequence) == ["marked_background", "organ", "vessel"]
    np.testing.assert_array_equal(seg_to_label(seg, CFG.labels, affine, label.shape), label)
    with pytest.raises(ValueError, match="is not a slice of the image grid"):
        seg_to_label(seg, CFG.labels, affine @ np.diag([1.0, 1.0, 0.5, 1.0]), (16, 12, 4))


ENHANCED_SOP = {"MR": "1.2.840.10008.5.1.4.1.1.4.1", "CT": "1.2.840.10008.5.1.4.1.1.2.1"}


def enhanced_mr(vol: np.ndarray, spacing: tuple[float, float, float], origin: tuple[float, float, float],
                study: pydicom.Dataset, number: int, description: str, order: list[int] | None = None,
                modality: str = "MR") -> pydicom.Dataset:
    """``vol`` (I, J, K; int16) as one Enhanced MR (or CT) Image file, as an enhanced scanner exports a series: one
    frame per k in ``order`` (default all, ascending), axial, i along patient left and j posterior; orientation,
    pixel spacing and rescale in the shared functional groups, each frame's position in its own."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    order = list(range(vol.shape[2])) if order is None else order
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ENHANCED_SOP[modality], generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.is_little_endian, ds.is_implicit_VR = meta, True, False
    for key in ("PatientName", "PatientID", "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID"):
        setattr(ds, key, study[key].value)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = modality, generate_uid(), number, \
        description
    ds.InstanceNumber, ds.FrameOfReferenceUID, ds.ImageType = 1, generate_uid(), ["ORIGINAL", "PRIMARY", "M"]
    ds.NumberOfFrames, ds.Rows, ds.Columns = len(order), vol.shape[1], vol.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    measures, plane, rescale = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [spacing[1], spacing[0]], spacing[2]
    plane.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    rescale.RescaleIntercept, rescale.RescaleSlope, rescale.RescaleType = "0", "1", "HU" if modality == "CT" else "US"
    shared = Dataset()
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([measures]), Sequence([plane])
    shared.PixelValueTransformationSequence = Sequence([rescale])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for k in order:
        position, frame = Dataset(), Dataset()
        position.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * spacing[2]]
        frame.PlanePositionSequence = Sequence([position])
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.ascontiguousarray(np.stack([vol[:, :, k].T for k in order]).astype(np.int16)).tobytes()
    return ds


def test_enhanced_multi_frame_series_import_and_a_lost_frame_is_named(tmp_path, capsys):
    """``data from-dicom`` on a study of Enhanced MR files (one multi-frame file a series, as enhanced scanners
    export): each volume on its grid (anisotropic spacing, LPS -> RAS) with its values. A file with a frame left out
    was read with a wrong spacing (1 x 1 x 1 mm instead of 1 x 1.2 x 2.5) and imported; now its case fails, naming
    the gap; frames stored out of order (read so, without geometry) fail on the spacing the headers give, which a
    gantry-tilted CT meets (slice to slice along the positions, as ITK reads it)."""
    from crossmodal.dicom import series_to_nifti
    from crossmodal.errors import CaseError

    rng = np.random.default_rng(3)
    vols = {name: rng.integers(0, 3000, (20, 24, 12)).astype(np.int16) for name in ("t1", "t2", "pd")}
    spacing, origin = (1.0, 1.2, 2.5), (-10.0, -20.0, 30.0)
    export = tmp_path / "cd"
    for patient in ("mf001", "mf002"):
        study = new_study(patient)
        for n, (name, vol) in enumerate(vols.items()):
            order = [k for k in range(12) if k != 6] if patient == "mf002" and name == "t2" else None
            (export / patient).mkdir(parents=True, exist_ok=True)
            enhanced_mr(vol, spacing, origin, study, n + 1, name, order).save_as(
                str(export / patient / f"{name}.dcm"), write_like_original=False)
    out = tmp_path / "studies"
    assert main(["data", "from-dicom", "--dicom", str(export), "--out", str(out), "--config", "brain"]) == 2
    captured = capsys.readouterr()
    records = {r["case"]: r for r in map(json.loads, captured.out.splitlines())}
    assert "error" not in records["mf001"]
    assert records["mf002"]["error"] == (
        f"case 'mf002': file {export / 'mf002'}: frames at 42.50 and 47.50 mm are 5.00 mm apart, the others 2.50 mm: "
        "a frame is missing (or two series share this UID)")
    assert not list(out.glob("mf002*")) and not (out / "modalities" / "mf002").exists()
    want = np.diag([-1.0, -1.2, 2.5, 1.0])
    want[:3, 3] = [10.0, 20.0, 30.0]  # LPS (-10, -20, 30) in RAS
    for name, path in (("t1", out / "mf001.nii.gz"), ("t2", out / "modalities" / "mf001" / "t2.nii.gz"),
                       ("pd", out / "modalities" / "mf001" / "pd.nii.gz")):
        back = load_volume(path)
        np.testing.assert_allclose(back.affine.numpy(), want, atol=1e-4)
        np.testing.assert_array_equal(back[0].numpy(), vols[name])

    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    order = [0, 2, 1, *range(3, 12)]
    enhanced_mr(vols["t1"], spacing, origin, new_study("mf003"), 1, "t1", order).save_as(str(shuffled / "t1.dcm"),
                                                                                      write_like_original=False)
    with pytest.raises(CaseError) as e:
        series_to_nifti([shuffled / "t1.dcm"], tmp_path / "t1.nii.gz", "mf003")
    assert str(e.value) == (f"case 'mf003': file {shuffled}: multi-frame file of 12 frames read with voxels of "
                            "1 x 1 x 1 mm where its headers say 1 x 1.2 x 2.5 mm: the reader lost its geometry; "
                            "export the series again (as single-frame images if it stays so)")
    assert not (tmp_path / "t1.nii.gz").exists()

    # a gantry-tilted CT (planes tilted 20 degrees, the table moving 2.5 mm along z): ITK spaces its slices 2.5 mm
    # apart, 2.35 along their normal; what it reads is what the headers say, so it imports
    import math

    ct = volume_to_series(vols["t1"], np.diag([0.8, 0.8, 2.5, 1.0]), "CT", new_study("tilt"), 1, "ct")
    for k, ds in enumerate(ct):
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, math.cos(math.radians(20)), math.sin(math.radians(20))]
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * k]
    series_to_nifti(write_series(ct, tmp_path / "tilt"), tmp_path / "tilt.nii.gz", "tilt")
    back = load_volume(tmp_path / "tilt.nii.gz")
    np.testing.assert_allclose(np.sqrt((back.affine.numpy()[:3, :3] ** 2).sum(0)), [0.8, 0.8, 2.5], atol=1e-4)
    np.testing.assert_array_equal(back[0].numpy(), vols["t1"])


def test_label_seg_on_an_enhanced_image_references_its_frames_and_round_trips(tmp_path):
    """A label on an Enhanced CT (one multi-frame file, frames stored head to feet, as many scanners write them)
    becomes a DICOM SEG (highdicom; dcmqi references single-frame series only) that references the file's series
    and, frame by frame, the image frame at the same position; it reads back onto the image's grid voxel for voxel,
    keeps the label's kind and marked background, and ``data from-dicom`` imports it as the case's label."""
    from crossmodal.dicom import import_dicom

    rng = np.random.default_rng(5)
    vol = rng.integers(0, 1000, (16, 12, 6)).astype(np.int16)
    (tmp_path / "cd").mkdir()
    source = enhanced_mr(vol, (2.0, 1.5, 3.0), (-10.0, -5.0, 7.0), new_study("enh"), 1, "ct", [5, 4, 3, 2, 1, 0],
                         modality="CT")
    source.save_as(str(tmp_path / "cd" / "ct.dcm"), write_like_original=False)
    (record,) = import_dicom(tmp_path / "cd", tmp_path / "studies", CFG, progress=False)
    assert "error" not in record and record["label"] is None
    image = load_volume(tmp_path / "studies" / "enh.nii.gz")
    np.testing.assert_array_equal(image[0].numpy()[:, :, ::-1], vol)  # frames head to feet: k runs the other way
    label = np.zeros(vol.shape, np.uint8)
    label[2:8, 3:9, 1:4], label[10:14, 1:5, 4], label[0, 0, 0] = 1, 2, CFG.labels.marked_background
    save_volume(tmp_path / "label.nii.gz", label, image.affine.numpy())
    seg_file = label_to_seg(tmp_path / "label.nii.gz", tmp_path / "cd", CFG.labels, "sparse")
    seg = pydicom.dcmread(str(seg_file))
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg_kind(seg) == "sparse"
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == ["organ", "lesion", "marked_background"]
    assert str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) == str(source.SeriesInstanceUID)
    assert len(seg.SeriesDate) == 8 and seg.SeriesTime  # the datastores take the newest SEG of a case by them
    assert int(seg.NumberOfFrames) == 5  # (frames with a segment on them: k 0 (marked), 1-3 (organ), 4 (lesion))
    z_of_frame = {n + 1: float(g.PlanePositionSequence[0].ImagePositionPatient[2])
                  for n, g in enumerate(source.PerFrameFunctionalGroupsSequence)}
    for group in seg.PerFrameFunctionalGroupsSequence:
        ref = group.DerivationImageSequence[0].SourceImageSequence[0]
        assert str(ref.ReferencedSOPInstanceUID) == str(source.SOPInstanceUID)
        z = float(group.PlanePositionSequence[0].ImagePositionPatient[2])
        assert z_of_frame[int(ref.ReferencedFrameNumber)] == z
    np.testing.assert_array_equal(seg_to_label(seg_file, CFG.labels, image.affine.numpy(), label.shape), label)
    save_volume(tmp_path / "short.nii.gz", label[:, :, :4], image.affine.numpy())  # 4 of 6 slices: frames 1-4
    with pytest.raises(RuntimeError, match=r"^frame 5 of the image at \[-10.0, -5.0, 10.0\] mm is not on the "
                                           r"label's grid \(16, 12, 4\)$"):
        label_to_seg(tmp_path / "short.nii.gz", tmp_path / "cd", CFG.labels, "sparse")
    os.replace(seg_file, tmp_path / "cd" / "seg.dcm")
    (record,) = import_dicom(tmp_path / "cd", tmp_path / "again", CFG, progress=False)
    assert record["label"] == "sparse"
    np.testing.assert_array_equal(load_volume(tmp_path / "again" / "labels" / "final" / "enh.nii.gz")[0].numpy(),
                                  label)


def split_enhanced(vol: np.ndarray, spacing: tuple[float, float, float], origin: tuple[float, float, float],
                   study: pydicom.Dataset, chunks: list[list[int]], modality: str = "CT") -> list[pydicom.Dataset]:
    """``vol`` as one series of Enhanced CT (or MR) files, the frames ``chunks[n]`` in file ``n`` (in that order), as
    an enhanced scanner splits a long series (or a DICOM concatenation): one series and frame of reference UID,
    each file its own SOP instance."""
    files = [enhanced_mr(vol, spacing, origin, study, 1, modality.lower(), chunk, modality) for chunk in chunks]
    for n, ds in enumerate(files):
        ds.SeriesInstanceUID, ds.FrameOfReferenceUID = files[0].SeriesInstanceUID, files[0].FrameOfReferenceUID
        ds.InstanceNumber = n + 1
    return files


def test_an_enhanced_series_split_over_files_imports_and_its_label_round_trips_as_seg(tmp_path):
    """A series split over several Enhanced CT files (as an enhanced scanner splits a long series, or a DICOM
    concatenation: each file's frames head to feet, the files in no order by name, one of a single frame with its
    position in its shared groups, one with its pixel spacing in each frame's groups) imports as one volume, voxel
    for voxel. A label on it becomes one DICOM SEG whose frames each reference the file and the frame at their
    position, which reads back and imports as the label. ITK's series reader takes each file for one slice: such a
    series failed its case (`series of 3 files does not read as one volume (... Size mismatch! ...)`). A file on
    another pixel grid than the others, a frame left out, and files that do not continue each other are named."""
    from crossmodal.dicom import _read_multiframe, import_dicom, series_to_nifti
    from crossmodal.errors import CaseError

    rng = np.random.default_rng(8)
    vol = rng.integers(0, 1000, (16, 12, 10)).astype(np.int16)
    spacing, origin = (2.0, 1.5, 3.0), (-10.0, -5.0, 7.0)
    parts = split_enhanced(vol, spacing, origin, new_study("split"), [[9, 8, 7, 6], [5, 4, 3, 2, 1], [0]])
    last = parts[2].PerFrameFunctionalGroupsSequence[0]  # a file of one frame: its position in its shared groups
    parts[2].SharedFunctionalGroupsSequence[0].PlanePositionSequence = last.PlanePositionSequence
    del last.PlanePositionSequence
    shared = parts[1].SharedFunctionalGroupsSequence[0]  # a.dcm's pixel spacing in each frame's own groups
    for group in parts[1].PerFrameFunctionalGroupsSequence:
        group.PixelMeasuresSequence = shared.PixelMeasuresSequence
    del shared.PixelMeasuresSequence
    (tmp_path / "cd").mkdir()
    for name, ds in zip(("c.dcm", "a.dcm", "b.dcm"), parts, strict=True):  # the files in no order by name
        ds.save_as(str(tmp_path / "cd" / name), write_like_original=False)
    (record,) = import_dicom(tmp_path / "cd", tmp_path / "studies", CFG, progress=False)
    assert "error" not in record and record["label"] is None, record
    image = load_volume(tmp_path / "studies" / "split.nii.gz")
    want = np.diag([-2.0, -1.5, -3.0, 1.0])
    want[:3, 3] = [10.0, 5.0, 7.0 + 9 * 3.0]  # LPS (-10, -5, 34) in RAS: k runs head to feet, as the frames
    np.testing.assert_allclose(image.affine.numpy(), want, atol=1e-4)
    np.testing.assert_array_equal(image[0].numpy()[:, :, ::-1], vol)

    label = np.zeros(vol.shape, np.uint8)
    label[2:8, 3:9, 2:7], label[10:14, 1:5, 8:] = 1, 2  # k 2-6, 8, 9: frames 7-3, 1, 0 of the volume, in 3 files
    save_volume(tmp_path / "label.nii.gz", label, image.affine.numpy())
    seg_file = label_to_seg(tmp_path / "label.nii.gz", tmp_path / "cd", CFG.labels, "dense")
    seg = pydicom.dcmread(str(seg_file))
    assert seg_kind(seg) == "dense" and int(seg.NumberOfFrames) == 7
    uids = [str(ds.SOPInstanceUID) for ds in parts]
    for refs in (seg.SourceImageSequence, seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence):
        assert sorted(str(r.ReferencedSOPInstanceUID) for r in refs) == sorted(uids)
    assert str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) == str(parts[0].SeriesInstanceUID)
    where = {}  # z of each frame of each file
    for ds in parts:
        for n, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
            plane = group.get("PlanePositionSequence") or ds.SharedFunctionalGroupsSequence[0].PlanePositionSequence
            where[str(ds.SOPInstanceUID), n + 1] = float(plane[0].ImagePositionPatient[2])
    referenced = []
    for group in seg.PerFrameFunctionalGroupsSequence:
        ref = group.DerivationImageSequence[0].SourceImageSequence[0]
        z = float(group.PlanePositionSequence[0].ImagePositionPatient[2])
        assert where[str(ref.ReferencedSOPInstanceUID), int(ref.ReferencedFrameNumber)] == z
        referenced.append(uids.index(str(ref.ReferencedSOPInstanceUID)))
    assert sorted(set(referenced)) == [0, 1, 2]  # the label crosses from file to file
    np.testing.assert_array_equal(seg_to_label(seg_file, CFG.labels, image.affine.numpy(), label.shape), label)
    os.replace(seg_file, tmp_path / "cd" / "seg.dcm")
    (record,) = import_dicom(tmp_path / "cd", tmp_path / "again", CFG, progress=False)
    assert record["label"] == "dense"
    np.testing.assert_array_equal(load_volume(tmp_path / "again" / "labels" / "final" / "split.nii.gz")[0].numpy(),
                                  label)

    other = split_enhanced(vol, spacing, origin, new_study("grid"), [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    other[1].SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing = [1.5, 2.5]
    files = write_series(other, tmp_path / "grid")
    with pytest.raises(CaseError) as e:
        series_to_nifti(files, tmp_path / "grid.nii.gz", "grid")
    second = next(f for f in files if pydicom.dcmread(str(f)).InstanceNumber == 2)
    assert str(e.value) == (f"case 'grid': file {second}: its 5 frame(s) (16 x 12, 2.5 x 1.5 x 3 mm) do not share the "
                            f"grid of {files[0].name} (16 x 12, 2 x 1.5 x 3 mm), whose series it is part of; export "
                            "the series again")
    assert not (tmp_path / "grid.nii.gz").exists()
    apart = split_enhanced(vol, spacing, origin, new_study("gap"), [[0, 1, 2, 3], [5, 6, 7, 8], [9]])
    files = write_series(apart, tmp_path / "gap")  # frame 4 left out: named, with a file of one frame in the series
    with pytest.raises(CaseError) as e:
        series_to_nifti(files, tmp_path / "gap.nii.gz", "gap")
    assert str(e.value) == (f"case 'gap': file {tmp_path / 'gap'}: slices at 16.00 and 22.00 mm are 6.00 mm apart, the "
                            "others 3.00 mm: a slice is missing (or two series share this UID)")
    with pytest.raises(CaseError) as e:  # the stacking itself refuses files that do not continue each other too
        _read_multiframe(files[:2], files[:2], [pydicom.dcmread(str(f)) for f in files[:2]], "gap")
    assert str(e.value) == (f"case 'gap': file {files[1]}: its frames start at (-10.00, -5.00, 22.00) mm where the "
                            f"frames of {files[0].name} end at (-10.00, -5.00, 19.00) mm: the files do not continue "
                            "each other; export the series again")


def test_a_rescale_of_each_slice_or_frame_is_applied_to_it(tmp_path):
    """PET scanners scale each slice to its own range (RescaleSlope per file; per frame in an enhanced file). ITK
    types a series by its first file: where that one's rescale is whole (slope 1, as on an empty end slice) the
    volume was int16, every other slice's fractions cut and a hot slice clipped (here its maximum, 223428 Bq/ml,
    read as 32489); GDCM applied an enhanced file's first frame's rescale to all its frames (here every frame's
    maximum came out as the first frame's, 13783, but one). Now each slice and frame reads with its own rescale, on
    the grid ITK reads (the enhanced file's pixels decoded once)."""
    from crossmodal.dicom import series_to_nifti

    rng = np.random.default_rng(11)
    vol = rng.gamma(2.0, 1500.0, (16, 14, 10)).astype(np.float32)  # Bq/ml
    vol[:, :, 3] *= 20  # a hot slice
    slopes = [1.0] + [float(vol[:, :, k].max()) / 32767 for k in range(1, 10)]  # the first slice's rescale whole
    stored = np.stack([np.clip(np.rint(vol[:, :, k] / slopes[k]), -32768, 32767) for k in range(10)], -1)
    series = volume_to_series(vol, np.diag([2.0, 2.0, 3.0, 1.0]), "PT", new_study("pet"), 1, "pet")
    for k, ds in enumerate(series):
        ds.RescaleSlope, ds.RescaleIntercept = f"{slopes[k]:.10g}", "0"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].astype(np.int16).T).tobytes()
    series_to_nifti(write_series(series, tmp_path / "pet"), tmp_path / "pet.nii.gz", "pet")
    classic = load_volume(tmp_path / "pet.nii.gz")[0].numpy()

    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    order = list(range(9, -1, -1))  # frames head to feet, each with its own rescale
    enhanced = enhanced_mr(stored.astype(np.int16), (2.0, 2.0, 3.0), (0.0, 0.0, 0.0), new_study("enh"), 1, "pet",
                           order)
    del enhanced.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence
    for k, group in zip(order, enhanced.PerFrameFunctionalGroupsSequence, strict=True):
        rescale = Dataset()
        rescale.RescaleIntercept, rescale.RescaleSlope, rescale.RescaleType = "0", f"{slopes[k]:.10g}", "US"
        group.PixelValueTransformationSequence = Sequence([rescale])
    (tmp_path / "enh").mkdir()
    enhanced.save_as(str(tmp_path / "enh" / "pet.dcm"), write_like_original=False)
    series_to_nifti([tmp_path / "enh" / "pet.dcm"], tmp_path / "enh.nii.gz", "enh")
    multi = load_volume(tmp_path / "enh.nii.gz")[0].numpy()[:, :, ::-1]  # k runs head to feet, as the frames
    # its grid as ITK reads the file: the first frame (slice 9) at z = 27 mm, the slices going down (the pixels are
    # decoded by pydicom alone, the grid taken from ITK's header read, whose slice step is then -3 mm)
    np.testing.assert_allclose(load_volume(tmp_path / "enh.nii.gz").affine.numpy(),
                               [[-2, 0, 0, 0], [0, -2, 0, 0], [0, 0, -3, 27], [0, 0, 0, 1]], atol=1e-4)
    for back in (classic, multi):
        assert float(back[:, :, 3].max()) == pytest.approx(float(vol[:, :, 3].max()), rel=1e-4)  # not 32489
        for k in range(10):  # every slice to within its own quantisation
            assert float(np.abs(back[:, :, k] - vol[:, :, k]).max()) <= slopes[k] / 2 + 1e-2 * max(slopes[k], 1), k


def test_a_fractional_seg_of_another_tool_holds_the_voxels_at_least_half_in(tmp_path):
    """A FRACTIONAL DICOM SEG (an AI tool's probabilities, written with highdicom here) reads as the voxels whose
    value is at least half the maximum; any value above 0 counted, so a 0.2-probability blob became organ (40
    voxels labelled for these 36). Its segment named as another tool names it ("Organ") is the class `organ`; it
    was `segment 1 'Organ' is not a configured class` and the case did not import."""
    import highdicom as hd
    from pydicom.sr.coding import Code

    vol = np.random.default_rng(0).integers(0, 1000, (16, 14, 6)).astype(np.int16)
    series = volume_to_series(vol, np.diag([2.0, 2.0, 3.0, 1.0]), "CT", new_study("frac"), 1, "ct")
    write_series(series, tmp_path / "ct")
    prob = np.zeros((6, 14, 16), np.float32)  # (slices from feet to head, rows j, columns i)
    prob[2, 3:9, 4:10], prob[2, 10:12, 1:3], prob[4, 0:2, 0:2] = 0.9, 0.2, 0.5
    organ = hd.seg.SegmentDescription(
        1, "Organ", Code("91723000", "SCT", "Anatomical Structure"), Code("85756007", "SCT", "Tissue"),
        "AUTOMATIC", algorithm_identification=hd.AlgorithmIdentificationSequence(
            "some model", Code("123109", "DCM", "Manual Processing"), "1"))
    seg = hd.seg.Segmentation(
        source_images=sorted(series, key=lambda ds: float(ds.ImagePositionPatient[2])), pixel_array=prob,
        segmentation_type="FRACTIONAL", segment_descriptions=[organ], series_instance_uid=hd.UID(), series_number=5,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="other", manufacturer_model_name="other",
        software_versions="1", device_serial_number="1")
    seg.save_as(tmp_path / "seg.dcm")
    label = seg_to_label(tmp_path / "seg.dcm", CFG.labels, np.diag([2.0, 2.0, 3.0, 1.0]), vol.shape)
    want = np.zeros(vol.shape, np.uint8)
    want[4:10, 3:9, 2], want[0:2, 0:2, 4] = 1, 1  # the 0.9 square and the 0.5 corner; not the 0.2 blob
    np.testing.assert_array_equal(label, want)
    seg.SegmentSequence[0].SegmentLabel = "Liver"
    seg.save_as(tmp_path / "other.dcm")
    with pytest.raises(ValueError, match=r"^segment 1 'Liver' is not a configured class \['background', "
                                         r"'lesion', 'marked_background', 'organ', 'vessel'\] \(case, spaces and "
                                         r"punctuation aside\)$"):
        seg_to_label(tmp_path / "other.dcm", CFG.labels, np.diag([2.0, 2.0, 3.0, 1.0]), vol.shape)


def test_a_lesion_drawn_inside_its_organ_in_another_tools_seg_keeps_its_voxels(tmp_path, caplog):
    """A BINARY DICOM SEG whose segments overlap (a lesion drawn inside its organ, as OHIF and 3D Slicer allow), the
    lesion numbered before the organ: the shared voxels are lesion, whatever the numbering. The later frame won, so
    the organ's frames, written after the lesion's, erased the lesion (0 of its 8 voxels kept)."""
    import highdicom as hd
    from pydicom.sr.coding import Code

    vol = np.random.default_rng(1).integers(0, 1000, (12, 10, 5)).astype(np.int16)
    series = volume_to_series(vol, np.diag([2.0, 2.0, 3.0, 1.0]), "CT", new_study("nested"), 1, "ct")
    write_series(series, tmp_path / "ct")
    masks = np.zeros((5, 10, 12, 2), bool)  # (slices from feet to head, rows j, columns i, segments)
    masks[1:4, 2:8, 2:10, 1] = True  # the organ: 3 x 6 x 8 voxels
    masks[2, 4:6, 5:9, 0] = True  # the lesion inside it: 2 x 4 voxels on the middle slice

    def segment(n: int, name: str) -> hd.seg.SegmentDescription:
        return hd.seg.SegmentDescription(n, name, Code("91723000", "SCT", "Anatomical Structure"),
                                         Code("85756007", "SCT", "Tissue"), "MANUAL")

    want = np.zeros(vol.shape, np.uint8)
    want[2:10, 2:8, 1:4] = 1
    want[5:9, 4:6, 2] = 2
    for order, name in (([0, 1], "lesion_first.dcm"), ([1, 0], "organ_first.dcm")):
        names = ["Lesion", "Organ"]
        seg = hd.seg.Segmentation(
            source_images=sorted(series, key=lambda ds: float(ds.ImagePositionPatient[2])),
            pixel_array=masks[..., order].astype(np.uint8), segmentation_type="BINARY",
            segment_descriptions=[segment(n + 1, names[o]) for n, o in enumerate(order)],
            series_instance_uid=hd.UID(), series_number=5, sop_instance_uid=hd.UID(), instance_number=1,
            manufacturer="other", manufacturer_model_name="other", software_versions="1", device_serial_number="1")
        seg.save_as(tmp_path / name)
        with caplog.at_level(logging.INFO, logger="crossmodal.dicom"):
            label = seg_to_label(tmp_path / name, CFG.labels, np.diag([2.0, 2.0, 3.0, 1.0]), vol.shape)
        np.testing.assert_array_equal(label, want, err_msg=name)
        assert f"{name}: 8 voxels lie in more than one segment; each went to the smallest of its segments" in \
            caplog.text


def test_a_series_of_several_volumes_says_so(tmp_path):
    """A dynamic PET (two frames of the same slices under one series UID; diffusion, multi-echo and cardiac series
    alike): its case fails saying the series holds more than one volume - it said a slice was missing, "the others
    0.00 mm" apart."""
    from crossmodal.dicom import series_to_nifti
    from crossmodal.errors import CaseError

    vol = np.random.default_rng(5).integers(0, 1000, (16, 14, 10)).astype(np.int16)
    study, grid = new_study("dyn"), np.diag([2.0, 2.0, 3.0, 1.0])
    first, second = (volume_to_series(v, grid, "PT", study, 1, "pet") for v in (vol, vol * 2))
    for ds in second:
        ds.SeriesInstanceUID, ds.InstanceNumber = first[0].SeriesInstanceUID, ds.InstanceNumber + 10
    files = write_series(first + second, tmp_path / "pet")
    with pytest.raises(CaseError) as e:
        series_to_nifti(files, tmp_path / "pet.nii.gz", "dyn")
    assert str(e.value) == (
        f"case 'dyn': file {tmp_path / 'pet'}: 10 of 20 slices lie where another does (the first at 0.00 mm): the "
        "series holds more than one volume (diffusion directions, echoes, dynamic frames or phases, or two series "
        "under one UID); export the volume to segment as a series of its own")
    assert not (tmp_path / "pet.nii.gz").exists()
    series_to_nifti(files[:10], tmp_path / "pet.nii.gz", "dyn")  # one frame of it: a volume
    np.testing.assert_allclose(load_volume(tmp_path / "pet.nii.gz")[0].numpy(), vol, atol=np.ptp(vol) / 60000)


def test_a_slicer_segmentation_drawn_on_a_secondary_grid_keeps_its_segment_names(tmp_path):
    """A ``.seg.nrrd`` from 3D Slicer, drawn on the MR grid, numbers its segments in Slicer's order (here lesion 1,
    organ 2, not the configured organ 1, lesion 2): moved onto the CT grid it stays a ``.seg.nrrd`` with the same
    segments, so the save maps its values to the configured ones (it was a NIfTI copy without them: saved without
    ``label_info``, the lesion became organ)."""
    from crossmodal.serving.datastore import slicer_label
    from crossmodal.serving.dicomweb import labels_onto_grid

    ct_affine, mr_affine = np.diag([2.0, 2.0, 2.0, 1.0]), np.diag([3.0, 3.0, 3.0, 1.0])
    save_volume(tmp_path / "ct.nii.gz", np.zeros((30, 30, 30), np.float32), ct_affine)
    save_volume(tmp_path / "mr.nii.gz", np.zeros((20, 20, 20), np.float32), mr_affine)
    on_mr = np.zeros((20, 20, 20), np.uint8)
    on_mr[4:16, 4:16, 4:16] = 2  # organ, Slicer's second segment
    on_mr[8:12, 8:12, 8:12] = 1  # lesion, its first
    save_volume(tmp_path / "drawn.seg.nrrd", on_mr, mr_affine, segments={"lesion": 1, "organ": 2})
    moved = labels_onto_grid(str(tmp_path / "drawn.seg.nrrd"), str(tmp_path / "mr.nii.gz"),
                             str(tmp_path / "ct.nii.gz"), "phantom001")
    try:
        assert moved.endswith(".seg.nrrd")
        header = nrrd.read_header(moved)
        assert [header[f"Segment{i}_Name"] for i in (0, 1)] == ["lesion", "organ"]
        assert not any(k.endswith("_Extent") for k in header)  # the old grid's extents are not carried over
        saved = slicer_label(moved, None, "phantom001", CFG.labels)
        try:
            out = load_volume(saved)[0].numpy()
        finally:
            if saved != moved:
                os.remove(saved)
    finally:
        os.remove(moved)
    assert out.shape == (30, 30, 30)
    # MR voxel i spans [3i - 1.5, 3i + 1.5) mm; CT voxel j is at 2j mm
    assert out[15, 15, 15] == CFG.labels.classes["lesion"] and out[8, 8, 8] == CFG.labels.classes["organ"]
    assert sorted(np.unique(out).tolist()) == [0, 1, 2]
    assert (out == 2).sum() == 6 ** 3  # lesion: MR 8..11 -> 22.5..34.5 mm -> CT 12..17

    # the same drawn with Slicer's "allow overlap": the organ whole on layer 0, the lesion inside it on layer 1, each
    # value 1; moved, the file keeps both layers (it did not read: "cannot be read as NIfTI/NRRD (truncated or
    # corrupt?)"), and the save is the same label map
    import slicerio

    layers = np.zeros((2, 20, 20, 20), np.uint8)
    layers[0, 4:16, 4:16, 4:16], layers[1, 8:12, 8:12, 8:12] = 1, 1
    slicerio.write_segmentation(str(tmp_path / "overlap.seg.nrrd"), {
        "voxels": layers, "ijkToLPS": np.diag([-1.0, -1.0, 1.0, 1.0]) @ mr_affine,
        "containedRepresentationNames": ["Binary labelmap"],
        "segments": [{"id": "organ", "name": "organ", "labelValue": 1, "layer": 0},
                     {"id": "lesion", "name": "lesion", "labelValue": 1, "layer": 1}]})
    moved = labels_onto_grid(str(tmp_path / "overlap.seg.nrrd"), str(tmp_path / "mr.nii.gz"),
                             str(tmp_path / "ct.nii.gz"), "phantom001")
    try:
        assert moved.endswith(".seg.nrrd") and load_volume(moved).shape == (2, 30, 30, 30)
        saved = slicer_label(moved, None, "phantom001", CFG.labels)
        try:
            np.testing.assert_array_equal(load_volume(saved)[0].numpy(), out)
        finally:
            os.remove(saved)
    finally:
        os.remove(moved)


def test_to_dicom_writes_nrrd_cases_as_it_writes_nifti_ones(tmp_path, capsys):
    """``crossmodal data to-dicom`` on the same case saved as NRRD and as NIfTI: the same series, slice by slice
    (nibabel alone read no NRRD: the command stopped on its first case with "Cannot work out file type")."""
    def dicom_of(ext: str) -> dict[tuple[str, int], pydicom.Dataset]:
        studies = tmp_path / ext.split(".")[1]
        generate(studies, CFG, lambda rng: make_phantom(CFG, rng, size=24), 1, 5, "phantom", dense=1, ext=ext)
        capsys.readouterr()
        assert main(["data", "to-dicom", "--studies", str(studies), "--config", "phantom", "--out",
                     str(studies / "dcm")]) == 0
        assert [json.loads(line)["series"] for line in capsys.readouterr().out.splitlines()] == [["ct", "mr", "pet"]]
        files = (studies / "dcm" / "phantom000").glob("*/*.dcm")
        return {(f.parent.name, int(ds.InstanceNumber)): ds for f in files if (ds := pydicom.dcmread(str(f)))}

    nifti, nrrd_ = dicom_of(".nii.gz"), dicom_of(".nrrd")
    assert sorted(nifti) == sorted(nrrd_) and {k[0] for k in nifti} == {"ct", "pet", "mr"}
    for key, a in nifti.items():
        b = nrrd_[key]
        np.testing.assert_array_equal(a.pixel_array, b.pixel_array, err_msg=str(key))
        assert (a.RescaleSlope, a.RescaleIntercept) == (b.RescaleSlope, b.RescaleIntercept)
        np.testing.assert_allclose([*a.ImagePositionPatient, *a.ImageOrientationPatient, *a.PixelSpacing],
                                   [*b.ImagePositionPatient, *b.ImageOrientationPatient, *b.PixelSpacing], atol=1e-4)
    assert nifti["ct", 1].RescaleSlope == 1  # CT in whole HU stays exact
    seg_nifti = pydicom.dcmread(str(tmp_path / "nii" / "dcm" / "phantom000" / "seg.dcm"))
    seg_nrrd = pydicom.dcmread(str(tmp_path / "nrrd" / "dcm" / "phantom000" / "seg.dcm"))
    np.testing.assert_array_equal(seg_nifti.pixel_array, seg_nrrd.pixel_array)


def test_to_dicom_gives_a_case_the_same_uids_each_time_and_new_ones_when_its_images_change(tmp_path, capsys):
    """Fresh random UIDs at each ``to-dicom --upload`` stored a second study of every case in the PACS (the server
    then served each case twice: measured, 4 cases of 2 patients after two uploads); an upload cut off and run again
    did the same. The UIDs now derive from the case and its content."""
    studies = make_phantom_studies(tmp_path / "s", CFG, cases=2, dense=1, sparse=0, seed=61)

    def uids(folder: Path) -> dict[str, tuple[str, str, str]]:
        assert main(["data", "to-dicom", "--studies", str(studies), "--config", "phantom", "--out",
                     str(folder)]) == 0
        capsys.readouterr()
        return {str(f.relative_to(folder)): (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
                for f in sorted(folder.rglob("*.dcm")) if (ds := pydicom.dcmread(str(f), stop_before_pixels=True))}

    first, second = uids(tmp_path / "a"), uids(tmp_path / "b")
    assert first == second and len(first) == len({u[2] for u in first.values()}) > 100  # all distinct, all kept
    assert "phantom000/seg.dcm" in first and first["phantom000/seg.dcm"][0] == first["phantom000/ct/" + next(
        n.split("/")[-1] for n in first if n.startswith("phantom000/ct/"))][0]  # the SEG in its case's study
    studies_of = {case: {u[0] for n, u in first.items() if n.startswith(case)} for case in ("phantom000",
                                                                                             "phantom001")}
    assert all(len(v) == 1 for v in studies_of.values()) and studies_of["phantom000"] != studies_of["phantom001"]
    pet = studies / "modalities" / "phantom001" / "pet.nii.gz"
    img = load_volume(pet)
    save_volume(pet, img[0].numpy() * 1.5, img.affine.numpy())  # phantom001's PET replaced
    third = uids(tmp_path / "c")
    assert {n: u for n, u in third.items() if n.startswith("phantom000")} == \
        {n: u for n, u in first.items() if n.startswith("phantom000")}
    changed = {n for n in third if n.startswith("phantom001")}
    before = {u[0] for u in first.values()}, {u[2] for u in first.values()}
    assert changed and all(third[n][0] not in before[0] and third[n][2] not in before[1] for n in changed)  # new study


def test_from_dicom_makes_a_studies_folder_of_a_dicom_export(tmp_path, capsys, caplog):
    """``crossmodal data from-dicom`` on what ``to-dicom`` wrote, laid out as a CD export (nested folders, a
    non-DICOM file): the same cases - images on their grids with their values (MR to a scale: written as a scanner
    does), labels from their SEG, dense and sparse alike, a study without PET imported without it; a patient's second
    study gets its own case; a series that does not read fails its case only (named, exit 2); an ``--out`` holding
    the cases and a folder with no study are refused; series left out are listed with their case, a study without
    a CT series in a warning."""
    from crossmodal.io import find_case

    studies = make_phantom_studies(tmp_path / "s", CFG, cases=3, dense=1, sparse=1, seed=11)
    (studies / "modalities" / "phantom002" / "pet.nii.gz").unlink()
    export = tmp_path / "cd"
    assert main(["data", "to-dicom", "--studies", str(studies), "--config", "phantom", "--out",
                 str(export / "DICOM")]) == 0
    (export / "README.TXT").write_text("patient CD\n")
    # a localizer in phantom000's study (a CT series numbered before the volume's, as scanners number them: it was
    # taken for the case's CT), a study with no CT, an older SEG
    ct0 = sorted((export / "DICOM" / "phantom000" / "ct").glob("*.dcm"))[0]
    for folder, source, changes in (
            ("phantom000/loc", ct0, {"SeriesDescription": "localizer", "SeriesNumber": 0}),  # before the volume
            ("other", ct0, {"StudyInstanceUID": "1.2.3.4", "PatientID": "other", "Modality": "MR",
                            "SeriesDescription": "survey"}),
            ("phantom001/old", export / "DICOM" / "phantom001" / "seg.dcm", {"SeriesDate": "20000101",
                                                                             "SeriesDescription": "draft"})):
        ds = pydicom.dcmread(str(source))
        ds.SeriesInstanceUID, ds.SOPInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        for k, v in changes.items():
            setattr(ds, k, v)
        (export / "DICOM" / folder).mkdir(parents=True)
        ds.save_as(str(export / "DICOM" / folder / "1.dcm"))
    # the newest SEG of phantom001, drawn on its PET series: not its label (labels live on the primary grid)
    on_pet = pydicom.dcmread(str(export / "DICOM" / "phantom001" / "seg.dcm"))
    on_pet.SeriesInstanceUID, on_pet.SOPInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    on_pet.SeriesDate, on_pet.SeriesDescription, on_pet.SeriesNumber = "29990101", "on pet", 301
    on_pet.ReferencedSeriesSequence[0].SeriesInstanceUID = pydicom.dcmread(str(next(
        (export / "DICOM" / "phantom001" / "pet").glob("*.dcm"))), stop_before_pixels=True).SeriesInstanceUID
    on_pet.save_as(str(export / "DICOM" / "phantom001" / "old" / "2.dcm"))
    capsys.readouterr()
    out = tmp_path / "back"
    with caplog.at_level(logging.WARNING, logger="crossmodal.dicom"):
        assert main(["data", "from-dicom", "--dicom", str(export), "--out", str(out), "--config", "phantom"]) == 0
    records = {r["case"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert sorted(records) == ["phantom000", "phantom001", "phantom002"]
    assert [records[c]["skipped"] for c in sorted(records)] == [
        ["CT 'localizer' #0"], ["SEG 'draft' #300 (older SEG)", "SEG 'on pet' #301 (SEG on another series)"], []]
    assert [r.getMessage() for r in caplog.records] == [
        f"{export}: study 1.2.3.4 (patient other) has no series for 'ct' among [\"MR 'survey' #1\"]; not imported"]
    assert [records[c]["label"] for c in sorted(records)] == ["dense", "sparse", None]
    assert records["phantom002"]["series"]["pet"] is None and records["phantom002"]["series"]["mr"]
    for cid in records:
        case = find_case(out / f"{cid}.nii.gz", CFG.modality_names)
        assert sorted(n for n, p in case.modalities.items() if p) == (["mr"] if cid == "phantom002" else ["mr", "pet"])
        pairs = [(studies / f"{cid}.nii.gz", out / f"{cid}.nii.gz")] + [
            (studies / "modalities" / cid / f"{n}.nii.gz", out / "modalities" / cid / f"{n}.nii.gz")
            for n in ("pet", "mr") if case.modalities[n]] + (
            [(studies / "labels" / "final" / f"{cid}.nii.gz", out / "labels" / "final" / f"{cid}.nii.gz")]
            if records[cid]["label"] else [])
        for before, after in pairs:
            a, b = load_volume(before), load_volume(after)
            assert a.shape == b.shape and np.allclose(a.affine, b.affine, atol=1e-4), after
            x, y = a[0].numpy().ravel(), b[0].numpy().ravel()
            if "mr" in after.name:
                assert np.corrcoef(x, y)[0, 1] > 0.99999, after
            else:  # CT in whole HU and labels exact, PET to its 16-bit steps
                np.testing.assert_allclose(y, x, atol=1e-3 * np.abs(x).max(), err_msg=str(after))
    np.testing.assert_array_equal(load_volume(out / "labels" / "final" / "phantom001.nii.gz").numpy(),
                                  load_volume(studies / "labels" / "final" / "phantom001.nii.gz").numpy())
    capsys.readouterr()  # without --config: the preset whose series the studies have (brain refused: no 't1')
    assert main(["data", "from-dicom", "--dicom", str(export), "--out", str(tmp_path / "guessed")]) == 0
    printed = capsys.readouterr()
    assert printed.err.splitlines()[0] == (
        f"crossmodal: --config not given: preset 'phantom' (ct + pet, mr), the one whose series 2 of the 4 studies "
        f"under {export} have (the default, 'brain', takes t1 + t2, pd; studies with all its series: 0)")
    assert [json.loads(line) for line in printed.out.splitlines()] == list(records.values())
    made = sorted(p.relative_to(out) for p in out.rglob("*.nii.gz"))
    assert made == sorted(p.relative_to(tmp_path / "guessed") for p in (tmp_path / "guessed").rglob("*.nii.gz"))
    for rel in made:  # the same volumes (the gzip headers name their temp files)
        assert np.array_equal(load_volume(tmp_path / "guessed" / rel).numpy(), load_volume(out / rel).numpy()), rel
    assert main(["data", "from-dicom", "--dicom", str(export), "--out", str(out), "--config", "phantom"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"crossmodal: error: --out {out}: already holds phantom000, phantom001, phantom002: writing would replace "
        "their images and labels (an annotator's too); give a new folder, --skip-existing to import only the cases "
        "not there yet, or remove it first")
    assert main(["data", "from-dicom", "--dicom", str(studies), "--out", str(tmp_path / "none"), "--config",
                 "phantom"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"crossmodal: error: {studies}: no study with a CT series for 'ct' among 0 DICOM series ([]) and 13 other "
        "files; the config's modalities name the series they take (dicom_modality, series_description)")
    assert not (tmp_path / "none").exists()
    assert main(["data", "from-dicom", "--dicom", str(export / "DICOM" / "other"), "--out", str(tmp_path / "none"),
                 "--config", "phantom"]) == 2  # series named as a viewer shows them, their numbers too
    assert capsys.readouterr().err.strip() == (
        f"crossmodal: error: {export / 'DICOM' / 'other'}: no study with a CT series for 'ct' among 1 DICOM series "
        "([\"MR 'survey' #1\"]) and 0 other files; the config's modalities name the series they take (dicom_modality, "
        "series_description)")

    # phantom001's study as the second of phantom000's patient; a PET slice of phantom000 cut short
    for f in (export / "DICOM" / "phantom001").rglob("*.dcm"):
        ds = pydicom.dcmread(str(f))
        ds.PatientID = "phantom000"
        ds.save_as(str(f))
    broken = sorted((export / "DICOM" / "phantom000" / "pet").glob("*.dcm"))[3]
    broken.write_bytes(broken.read_bytes()[:-200])  # its header reads; ITK leaves the slice out and goes on
    mr = sorted((export / "DICOM" / "phantom002" / "mr").glob("*.dcm"), key=lambda f: pydicom.dcmread(
        str(f), stop_before_pixels=True).InstanceNumber)
    lost = mr[5].read_bytes()
    mr[5].unlink()  # a slice missing from the export: ITK reads the rest with the wrong spacing
    again = tmp_path / "again"
    assert main(["data", "from-dicom", "--dicom", str(export), "--out", str(again), "--config", "phantom"]) == 2
    captured = capsys.readouterr()
    records = {r["case"]: r for r in map(json.loads, captured.out.splitlines())}
    assert sorted(records) == ["phantom000", "phantom000_2", "phantom002"]
    failed = sorted(c for c, r in records.items() if "error" in r)
    assert captured.err.strip().splitlines()[-1] == (
        f"crossmodal: error: 2 of 3 cases not imported ({failed}; why: in their records above); the others were "
        "written (once those are fixed, the same command with --skip-existing imports them)")
    cut = records["phantom002"]["error"]
    assert cut.startswith(f"case 'phantom002': file {export / 'DICOM' / 'phantom002' / 'mr'}: slices at ") and \
        cut.endswith("a slice is missing (or two series share this UID)"), cut
    short = next(r["error"] for c, r in records.items() if c != "phantom002" and "error" in r)
    assert f"file {export / 'DICOM' / 'phantom000' / 'pet'}: series of 31 files (43 x 43) read as (43, 43, 30) " \
           "voxels: a file's pixel data is cut short or unreadable; export the series again" in short, short
    (ok,) = [c for c in records if c not in failed]  # phantom001's study; the failed cases left nothing behind
    assert records[ok]["label"] == "sparse" and sorted(str(p.relative_to(again)) for p in again.rglob("*") if
                                                       p.is_file()) == [
        f"labels/final/{ok}.nii.gz", f"modalities/{ok}/mr.nii.gz", f"modalities/{ok}/pet.nii.gz", f"{ok}.nii.gz"]
    # the MR slice found again: the same command refuses the case it imported, --skip-existing leaves it and imports
    # phantom002 (was: a new folder, and the case moved over by hand)
    mr[5].write_bytes(lost)
    before = snapshot(again)
    assert main(["data", "from-dicom", "--dicom", str(export), "--out", str(again), "--config", "phantom"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"crossmodal: error: --out {again}: already holds {ok}: writing would replace their images and labels (an "
        "annotator's too); give a new folder, --skip-existing to import only the cases not there yet, or remove it "
        "first")
    assert main(["data", "from-dicom", "--dicom", str(export), "--out", str(again), "--config", "phantom",
                 "--skip-existing"]) == 2  # phantom000's PET is still cut short
    captured = capsys.readouterr()
    records = {r["case"]: r for r in map(json.loads, captured.out.splitlines())}
    assert records[ok] == {"case": ok, "study": records[ok]["study"], "existing": True}
    assert records["phantom002"]["label"] is None and "error" not in records["phantom002"]
    assert captured.err.strip().splitlines()[-2:] == [
        f"1 of 2 cases -> {again}; 1 already there, left as they are ({ok})",
        f"crossmodal: error: 1 of 2 cases not imported ({[c for c in failed if c != 'phantom002']}; why: in their "
        "records above); the others were written (once those are fixed, the same command with --skip-existing "
        "imports them)"]
    assert {k: v for k, v in snapshot(again).items() if k in before} == before  # the case there left as it was
    assert (again / "modalities" / "phantom002" / "mr.nii.gz").is_file() and (again / "phantom002.nii.gz").is_file()
    # a SEG another writer made without its per-frame positions: that case fails, named with the SEG's file
    alone = tmp_path / "alone"
    shutil.copytree(export / "DICOM" / "phantom001", alone)
    seg = pydicom.dcmread(str(alone / "seg.dcm"))
    del seg.PerFrameFunctionalGroupsSequence
    seg.save_as(str(alone / "seg.dcm"))
    capsys.readouterr()
    assert main(["data", "from-dicom", "--dicom", str(alone), "--out", str(tmp_path / "alone_out"), "--config",
                 "phantom"]) == 2
    (record,) = map(json.loads, capsys.readouterr().out.splitlines())
    assert record["error"].startswith(f"case 'phantom000': file {alone / 'seg.dcm'}: DICOM SEG: "), record
    # the export given where a studies folder goes: said, with the import to run (the commands found no case, a
    # server listed none, neither saying why)
    from conftest import APP
    from crossmodal.config import ConfigError
    from crossmodal.serving.app import AppParts

    assert main(["train", "--studies", str(alone), "--config", "phantom", "--model-dir", str(tmp_path / "m")]) == 2
    told = (f"--studies {alone}: holds DICOM files (", ", ...) and no NIfTI / NRRD case: import them first "
            f"(`crossmodal data from-dicom --dicom {alone} --out <studies>`) and use <studies>, or serve them from a "
            "DICOMweb server (--studies http://.../dicom-web)")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"crossmodal: error: {told[0]}") and err.endswith(told[1]), err
    with pytest.raises(ConfigError) as e:
        AppParts.from_conf(str(APP), {"preset": "phantom", "model_dir": str(tmp_path / "m")}, studies=str(alone))
    assert str(e.value).startswith(told[0]) and str(e.value).endswith(told[1]) and not (tmp_path / "m").exists()


def test_studies_map_series_to_modalities_by_modality_and_description():
    mods = [ModalityConfig("ct", "ct"), ModalityConfig("pet", "pet"), ModalityConfig("mr", "mr")]
    series = [Series("s1", "A", "CT", "ct", 1), Series("s2", "A", "PT", "pet", 2), Series("s3", "A", "SEG", "x", 9),
              Series("s4", "B", "CT", "ct", 1), Series("s5", "B", "MR", "mr", 3),
              Series("s6", "C", "MR", "mr", 1)]  # study C has no CT: not a case
    cases = match_studies(series, mods)
    assert sorted(cases) == ["s1", "s4"]
    assert cases["s1"].siblings == {"pet": series[1], "mr": None}
    assert cases["s4"].siblings == {"pet": None, "mr": series[4]}
    brain = [ModalityConfig(n, "mr", series_description=p) for n, p in (("t1", "t1"), ("t2", "t2"), ("pd", "pd"))]
    mr = [Series("a", "S", "MR", "T2 FLAIR", 1), Series("b", "S", "MR", "PD", 2),
          Series("c", "S", "MR", "t1_mprage", 3)]
    case = match_studies(mr, brain)["c"]
    assert {k: v.uid for k, v in case.siblings.items()} == {"t2": "a", "pd": "b"}
    # scanners number a study's scout / localizer first: a modality took it (one slice), not the volume after it
    petct = [Series("topo", "P", "CT", "Topogram 0.6 T20s", 1), Series("ct", "P", "CT", "WB 3.0 B31f", 2),
             Series("pt", "P", "PT", "PET WB AC", 3), Series("loc", "Q", "CT", "AX", 1, localizer=True),
             Series("one", "Q", "CT", "AX", 2, images=1), Series("vol", "Q", "CT", "AX 3mm", 3, images=120),
             Series("lone", "R", "CT", "Scout", 1), Series("rep", "T", "CT", "Dose Report", 1),
             Series("ld", "T", "CT", "CT LOW DOSE 3.0", 2)]
    cases = match_studies(petct, mods)
    assert sorted(cases) == ["ct", "ld", "lone", "vol"]  # a study with nothing but a scout: that (its case says so)
    assert cases["ct"].siblings["pet"].uid == "pt"


def test_dicom_series_pick_the_preset_whose_series_the_studies_have(tmp_path):
    """``from-dicom`` / a PACS without a preset: the preset whose modalities' series most studies have all of;
    the default where it is one of those or none fits; a preset that extends another is that one; two presets alike
    are an error naming both and the option."""
    import shutil

    from crossmodal.config import ConfigError, default_configs_dir
    from crossmodal.dicom import guess_dicom_preset

    petct = [Series(f"{st}{m}", st, m, d, n) for st in ("A", "B") for n, (m, d) in
             enumerate((("CT", "ct"), ("PT", "pet"), ("MR", "mr")), 1)]
    mr = [Series(f"C{d}", "C", "MR", d, n) for n, d in enumerate(("t1_mprage", "t2_tse", "pd"), 1)]
    assert guess_dicom_preset(petct, "brain", "cd")[0] == "phantom"  # phantom_large extends it: no second choice
    assert guess_dicom_preset(petct + mr, "brain", "cd")[0] == "phantom"  # 2 studies against brain's 1
    assert guess_dicom_preset(petct[:3] + mr, "brain", "cd") == ("brain", None)  # 1 each: the default
    assert guess_dicom_preset(mr, "brain", "cd") == ("brain", None)
    assert guess_dicom_preset([Series("x", "X", "US", "echo", 1)], "brain", "cd") == ("brain", None)
    configs = tmp_path / "configs"
    shutil.copytree(default_configs_dir(), configs)
    (configs / "petct.yaml").write_text((configs / "phantom.yaml").read_text().replace("name: phantom", "name: petct"))
    with pytest.raises(ConfigError) as e:
        guess_dicom_preset(petct, "brain", "cd", configs, "--conf preset")
    assert str(e.value) == ("the DICOM series under cd fit the presets ['petct', 'phantom'] alike (2 of 2 studies "
                            "have every series of each); say which with --conf preset")


# ---- against a running Orthanc and a running server -----------------------------------------------------------

@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc holding 4 phantom studies (phantom000 with a dense SEG; phantom003 without its PET series)."""
    root = tmp_path_factory.mktemp("pacs")
    studies = make_phantom_studies(root / "studies", CFG, cases=4, dense=1, sparse=0, seed=21)
    (studies / "modalities" / "phantom003" / "pet.nii.gz").unlink()
    orthanc = Orthanc(root / "orthanc").start()
    with contextlib.redirect_stdout(io.StringIO()) as out:  # in-process: a subprocess spends ~8 s importing MONAI
        assert main(["data", "to-dicom", "--studies", str(studies), "--config", "phantom", "--upload",
                     orthanc.dicomweb]) == 0
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["label"] for r in records] == ["dense", None, None, None]
    assert records[3]["series"] == ["ct", "mr"]
    yield orthanc, studies
    orthanc.stop()


def uid_of(orthanc: Orthanc, case: str, modality: str = "CT") -> str:
    rows = make_client(orthanc.dicomweb).search_for_series(search_filters={"PatientID": case, "Modality": modality})
    assert len(rows) == 1, rows
    return rows[0]["0020000E"]["Value"][0]


def segs(orthanc: Orthanc) -> list[pydicom.Dataset]:
    client = make_client(orthanc.dicomweb)
    rows = client.search_for_series(search_filters={"Modality": "SEG"})
    return [pydicom.Dataset.from_json(client.retrieve_series_metadata(r["0020000D"]["Value"][0],
                                                                      r["0020000E"]["Value"][0])[0]) for r in rows]


@pytest.fixture(scope="module")
def server(pacs, tmp_path_factory):
    orthanc, _ = pacs
    root = tmp_path_factory.mktemp("pacs-server")
    srv = start_server(orthanc.dicomweb, root / "model", root / "server.log",  # no preset: the PACS's series say
                       {"pretrained_baseline_unet": str(PRETRAINED_PHANTOM), "max_epochs": "1",
                        "pacs_cache": str(root / "cache"), "pacs_timeout": "4", "pacs_list_ttl": "30"})
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def client(server, tmp_path_factory) -> MONAILabelClient:
    return MONAILabelClient(server.url, tmpdir=str(tmp_path_factory.mktemp("pacs-client")))


def truth(studies: Path, case: str) -> np.ndarray:
    return load_volume(studies / "truth" / f"{case}.nii.gz")[0].numpy()


def test_pacs_session_next_sample_infer_save_train_infer(pacs, server, client, tmp_path):
    orthanc, studies = pacs
    ids = {f"phantom00{i}": uid_of(orthanc, f"phantom00{i}") for i in range(4)}
    assert set(client.datastore()["objects"]) <= set(ids.values())  # the cache knows cases by primary series UID

    # next sample: an unlabelled study's primary (CT) series, never the labelled phantom000
    picked = client.next_sample("random", {})["id"]
    assert picked in {ids["phantom001"], ids["phantom002"], ids["phantom003"]}

    # infer by the primary series id: a label on the CT grid from all three modalities, whose series have
    # different grids (PET 2.5 mm, MR 3 mm, both rotated; CT 2 mm)
    grids = [load_volume(p) for p in (studies / "phantom001.nii.gz", studies / "modalities" / "phantom001" /
                                      "pet.nii.gz", studies / "modalities" / "phantom001" / "mr.nii.gz")]
    assert len({tuple(g.shape[1:]) for g in grids}) == 3
    out, result = client.infer("crossmodal", ids["phantom001"], {})
    assert result["modalities_used"] == ["ct", "pet", "mr"]
    pred = load_volume(out)[0].numpy()
    ref = truth(studies, "phantom001")
    assert pred.shape == ref.shape
    assert dice(pred, ref, 1) > 0.6, dice(pred, ref, 1)
    # by the PET series id (what OHIF sends for a PET viewport): the same case, the label on the PET grid
    pet_uid = uid_of(orthanc, "phantom001", "PT")
    out_pet, result_pet = client.infer("crossmodal", pet_uid, {})
    assert result_pet["grid"] == "pet" and result_pet["modalities_used"] == ["ct", "pet", "mr"]
    pet = load_volume(studies / "modalities" / "phantom001" / "pet.nii.gz")
    on_pet = load_volume(out_pet)
    assert on_pet.shape == pet.shape and np.allclose(on_pet.affine, pet.affine, atol=1e-3)
    truth_on_pet = resample_to(load_volume(studies / "truth" / "phantom001.nii.gz"), pet, mode="nearest")
    assert dice(on_pet[0].numpy(), truth_on_pet[0].numpy(), 1) > 0.6
    time.sleep(1)  # MONAI Label removes the file it sent once the response is out
    assert [p.name for p in server.tmp.glob("crossmodal-*")] == []  # the CT-grid label it was made from stayed

    # a study without its PET series still segments (zero-fill on a PACS), with what it has
    out3, result3 = client.infer("crossmodal", ids["phantom003"], {})
    assert result3["modalities_used"] == ["ct", "mr"]
    assert dice(load_volume(out3)[0].numpy(), truth(studies, "phantom003"), 1) > 0.5

    # Slicer saves a .seg.nrrd on the primary grid: it goes to Orthanc as DICOM SEG, the case leaves the pool at once
    img = load_volume(studies / "phantom002.nii.gz")
    header = {"space": "right-anterior-superior", "space directions": img.affine.numpy()[:3, :3].T.tolist(),
              "space origin": img.affine.numpy()[:3, 3].tolist(), "kinds": ["domain"] * 3,
              "Segment0_Name": "organ", "Segment0_LabelValue": "1", "Segment1_Name": "lesion",
              "Segment1_LabelValue": "2", "Segment2_Name": "vessel", "Segment2_LabelValue": "3"}
    label = truth(studies, "phantom002").astype(np.uint8)
    nrrd.write(str(tmp_path / "label.seg.nrrd"), label, header)
    before = len(segs(orthanc))
    client.save_label(ids["phantom002"], str(tmp_path / "label.seg.nrrd"))
    stored = segs(orthanc)
    assert len(stored) == before + 1
    new = [s for s in stored if str(s.ReferencedSeriesSequence[0].SeriesInstanceUID) == ids["phantom002"]]
    assert len(new) == 1 and seg_kind(new[0]) == "dense"
    for _ in range(4):  # every next sample now avoids phantom000 (SEG from upload) and phantom002 (just saved)
        assert client.next_sample("random", {})["id"] in {ids["phantom001"], ids["phantom003"]}
    status = client.datastore()
    assert status["objects"][ids["phantom002"]]["labels"]["final"]["info"]["pacs"] == "stored"

    # cross-modal scoring and strategy on the PACS cases (scores in the cache's image info)
    r = requests.post(f"{server.url}/scoring/crossmodal?run_sync=true", timeout=300)
    assert r.status_code == 200 and r.json()["scored"] == 2 and not r.json()["failed"], r.text
    pick = client.next_sample("crossmodal", {})
    assert pick["id"] in {ids["phantom001"], ids["phantom003"]} and pick["cold_start"] is False

    # train (fine-tune one epoch on the two SEG-labelled cases + unlabelled studies), then infer again: published
    # only when the epoch validates better than the committed model did before the first step
    published = server.model_dir / "phantom_crossmodal.pt"
    client.train_start("crossmodal", {"max_epochs": 1})
    deadline = time.time() + 500
    time.sleep(3)
    while client.train_status(check_if_running=True) and time.time() < deadline:
        time.sleep(2)
    stats = client.info()["train_stats"]["crossmodal"]
    assert stats["total_epochs"] == 1 and stats["epoch"] == 1 and 0.5 < stats["start_metric"] <= 1, stats
    assert published.is_file() == (stats["best_metric"] > stats["start_metric"]), server.log.read_text()[-3000:]
    out, result = client.infer("crossmodal", ids["phantom001"], {"result_extension": ".nrrd"})
    assert out.endswith(".nrrd")
    after = load_volume(out)[0].numpy()
    assert after.shape == ref.shape and dice(after, ref, 1) > 0.5


def test_pacs_down_or_slow_gives_503_and_keeps_the_label(pacs, server, client, tmp_path):
    orthanc, studies = pacs
    case = uid_of(orthanc, "phantom001")
    client.infer("crossmodal", case, {})  # cached, so the save below only needs the PACS for STOW
    img = load_volume(studies / "phantom001.nii.gz")
    label = np.zeros(img.shape[1:], np.uint8)
    label[10:20, 10:20, 20] = 1
    label[30:34, 30:34, 20] = 255
    import nibabel as nib

    nib.save(nib.Nifti1Image(label, img.affine.numpy()), tmp_path / "scribble.nii.gz")
    n_segs = len(segs(orthanc))

    # slow: Orthanc paused (SIGSTOP) -> the 4 s request timeout -> 503 naming the PACS; the label is kept
    assert orthanc.proc is not None
    orthanc.proc.send_signal(signal.SIGSTOP)
    try:
        t = time.time()
        with pytest.raises(MONAILabelClientException) as e:
            client.save_label(case, str(tmp_path / "scribble.nii.gz"))
        assert time.time() - t < 30
        assert "503" in e.value.msg and orthanc.url in e.value.msg and "kept" in e.value.msg
    finally:
        orthanc.proc.send_signal(signal.SIGCONT)
    info = client.datastore()["objects"][case]["labels"]["final"]["info"]
    assert info["pacs"] == "pending" and info["label_kind"] == "sparse"

    # down: Orthanc stopped -> a clear 503 again; restarted on the same port and storage -> the label is stored
    extra = tmp_path / "extra"
    generate(extra, CFG, lambda rng: make_phantom(CFG, rng, size=32), 1, 99, "extra")
    assert main(["data", "to-dicom", "--studies", str(extra), "--config", "phantom", "--upload",
                 orthanc.dicomweb]) == 0
    new_study = uid_of(orthanc, "extra000")
    orthanc.stop()
    with pytest.raises(MONAILabelClientException) as e:
        client.save_label(case, str(tmp_path / "scribble.nii.gz"))
    assert "503" in e.value.msg and "did not answer" in e.value.msg
    with pytest.raises(MONAILabelClientException) as e:  # a study the server has never seen: 503, not 404
        client.infer("crossmodal", new_study, {})
    assert "503" in e.value.msg and orthanc.url in e.value.msg
    assert client.infer("crossmodal", case, {})[1]["modalities_used"] == ["ct", "pet", "mr"]  # cached: still works
    orthanc.start()
    time.sleep(1)
    client.save_label(case, str(tmp_path / "scribble.nii.gz"))
    stored = segs(orthanc)
    assert len(stored) == n_segs + 1  # the retries stored one SEG, not three
    seg = [s for s in stored if str(s.ReferencedSeriesSequence[0].SeriesInstanceUID) == case]
    assert len(seg) == 1 and seg_kind(seg[0]) == "sparse"
    assert client.datastore()["objects"][case]["labels"]["final"]["info"]["pacs"] == "stored"


def test_bad_labels_on_a_pacs_are_422_and_store_nothing(pacs, server, client, tmp_path):
    orthanc, studies = pacs
    ct, pet = uid_of(orthanc, "phantom001"), uid_of(orthanc, "phantom001", "PT")
    n_segs = len(segs(orthanc))
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b not a volume")
    for series in (ct, pet):  # on the primary, and drawn on a secondary series
        with pytest.raises(MONAILabelClientException) as e:
            client.save_label(series, str(tmp_path / "broken.nii.gz"))
        assert "422" in e.value.msg and f"case '{ct}'" in e.value.msg and "cannot be read" in e.value.msg
    img = load_volume(studies / "phantom001.nii.gz")
    import nibabel as nib

    bad = np.zeros(img.shape[1:], np.uint8)
    bad[5, 5, 5] = 7  # not a configured class
    nib.save(nib.Nifti1Image(bad, img.affine.numpy()), tmp_path / "bad.nii.gz")
    with pytest.raises(MONAILabelClientException) as e:
        client.save_label(ct, str(tmp_path / "bad.nii.gz"))
    assert "422" in e.value.msg and "label values [7] are not configured" in e.value.msg
    with pytest.raises(MONAILabelClientException) as e:
        client.infer("crossmodal", "1.2.3.4.5.6.7", {})
    assert "404" in e.value.msg and "no study on" in e.value.msg
    assert len(segs(orthanc)) == n_segs
    # images come from the PACS: an image upload or removal through the datastore API says where to do it instead
    cache = server.model_dir.parent / "cache"
    objects, cached = set(client.datastore()["objects"]), sorted(p.name for p in cache.rglob("*"))
    with pytest.raises(MONAILabelClientException) as e:
        client.upload_image(str(studies / "phantom001.nii.gz"), "uploaded001")
    assert "422" in e.value.msg and (f"case 'uploaded001': this server's cases are the studies on the PACS at "
                                     f"{orthanc.dicomweb}; store the study there") in e.value.msg, e.value.msg
    r = requests.delete(f"{server.url}/datastore/image", params={"id": ct}, timeout=30)
    assert r.status_code == 422 and r.json()["detail"] == (f"case '{ct}': this server's cases are the studies on "
                                                           f"the PACS at {orthanc.dicomweb}; remove the study there")
    assert set(client.datastore()["objects"]) == objects and ct in client.datastore()["objects"]
    assert sorted(p.name for p in cache.rglob("*")) == cached  # nothing written or removed


# ---- OHIF in a real browser ------------------------------------------------------------------------------------

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def test_ohif_in_chromium_runs_our_model_and_shows_a_segmentation(pacs, server):
    """The bundled OHIF (/ohif/) opens a study from Orthanc through our server, the MONAI Label panel connects,
    runs ``crossmodal`` and a segmentation overlay appears in the viewports (screenshots in test-artifacts/)."""
    orthanc, _ = pacs
    study = make_client(orthanc.dicomweb).search_for_series(search_filters={"PatientID": "phantom001",
                                                                           "Modality": "CT"})[0]
    study_uid, ct_uid = study["0020000D"]["Value"][0], study["0020000E"]["Value"][0]
    run = run_model_in_ohif(server.url, study_uid, "crossmodal", ARTIFACTS)
    assert run.infer_status == 200 and "/infer/crossmodal" in run.infer_url and f"image={ct_uid}" in run.infer_url
    assert run.overlay_after > run.overlay_before + 3000, (run.overlay_before, run.overlay_after)
    assert run.screenshots["segmentation"].is_file()


def test_label_drawn_on_a_secondary_series_reaches_the_pacs_on_the_primary_grid(pacs, server, client, tmp_path):
    """A viewer showing the MR series sends an MR-grid label for the MR series id: the SEG in Orthanc is on the CT
    (primary) grid, references the CT series, and matches the truth there; the CT-grid copy does not stay in the
    server's temp folder."""
    orthanc, studies = pacs
    ct_uid, mr_uid = uid_of(orthanc, "phantom003"), uid_of(orthanc, "phantom003", "MR")
    mr = load_volume(studies / "modalities" / "phantom003" / "mr.nii.gz")
    truth_ct = load_volume(studies / "truth" / "phantom003.nii.gz")
    on_mr = resample_to(truth_ct, mr, mode="nearest")[0].numpy().astype(np.uint8)
    import nibabel as nib

    nib.save(nib.Nifti1Image(on_mr, mr.affine.numpy()), tmp_path / "on_mr.nii.gz")
    client.save_label(mr_uid, str(tmp_path / "on_mr.nii.gz"))
    seg = [s for s in segs(orthanc) if str(s.ReferencedSeriesSequence[0].SeriesInstanceUID) == ct_uid]
    assert len(seg) == 1
    study = str(seg[0].StudyInstanceUID)
    files = make_client(orthanc.dicomweb).retrieve_series(study, str(seg[0].SeriesInstanceUID))
    files[0].save_as(tmp_path / "seg.dcm")
    back = seg_to_label(tmp_path / "seg.dcm", CFG.labels, truth_ct.affine.numpy(), truth_ct.shape[1:])
    ref = truth_ct[0].numpy()
    assert dice(back, ref, 1) > 0.85  # MR is coarser (3 mm vs 2 mm) and rotated: a round trip through it
    info = client.datastore()["objects"][ct_uid]["labels"]["final"]["info"]
    assert info["pacs"] == "stored" and info["label_kind"] == "dense"
    assert [p.name for p in server.tmp.glob("crossmodal-*")] == []  # the CT-grid copy it stored (it stayed)


def test_strokes_drawn_on_a_secondary_series_grow_on_the_case(pacs, server, client, tmp_path):
    """`grow_scribbles` from a viewport showing the MR series: the strokes (NIfTI, or OHIF's raw `.bin`), drawn on the
    MR grid, are moved onto the CT grid before the walk and the grown map comes back on the MR grid, matching the
    truth there (both were refused with a 422: not on the CT grid)."""
    import nibabel as nib

    orthanc, studies = pacs
    mr_uid = uid_of(orthanc, "phantom001", "MR")
    mr = load_volume(studies / "modalities" / "phantom001" / "mr.nii.gz")
    truth_mr = np.rint(resample_to(load_volume(studies / "truth" / "phantom001.nii.gz"), mr, mode="nearest")[0].numpy())
    strokes = scribbles(truth_mr.astype(np.int64), CFG.labels, np.random.default_rng(3)).astype(np.uint8)
    nib.save(nib.Nifti1Image(strokes, mr.affine.numpy()), tmp_path / "strokes.nii.gz")
    out, params = client.infer("grow_scribbles", mr_uid, {}, label_in=str(tmp_path / "strokes.nii.gz"))
    grown = load_volume(out)
    assert params["grid"] == "mr" and params["modalities_used"] == ["ct", "pet", "mr"]
    assert grown.shape == mr.shape and np.allclose(grown.affine, mr.affine, atol=1e-3)
    scores = [dice(grown[0].numpy(), truth_mr, v) for v in (1, 2, 3)]
    drawn = [dice(strokes, truth_mr, v) for v in (1, 2, 3)]
    assert scores[0] > 0.9 and scores[1] > 0.45 and scores[2] > 0.65, scores  # measured 0.955 / 0.585 / 0.766
    assert all(g > d + 0.2 for g, d in zip(scores, drawn, strict=True)), (scores, drawn)
    assert params["drawn"] < 0.08 and params["labelled"] > 0.95, params
    strokes.ravel(order="F").tofile(tmp_path / "strokes.bin")
    out_bin, _ = client.infer("grow_scribbles", mr_uid, {}, label_in=str(tmp_path / "strokes.bin"))
    np.testing.assert_array_equal(load_volume(out_bin).numpy(), grown.numpy())
    time.sleep(1)  # MONAI Label removes the file it sent once the response is out
    assert [p.name for p in server.tmp.glob("crossmodal-*")] == []


@pytest.mark.parametrize("files", [1, 2])
def test_a_label_on_an_enhanced_image_reaches_the_pacs_as_seg_on_its_frames(pacs, server, client, tmp_path, files):
    """A study whose CT is one Enhanced CT file, or a series of two, segments, and its saved label is stored in the
    PACS as DICOM SEG on the files' frames (highdicom; this was a 422 'not stored' while dcmqi wrote every SEG, as it
    references single-frame series only, and a series of two files did not read): the SEG read back from Orthanc is
    the saved label voxel for voxel, referencing every file, the case trains with it, and a save of the same label
    again stores no second copy."""
    from crossmodal.dicom import upload

    orthanc, _ = pacs
    studies = tmp_path / "s"
    generate(studies, CFG, lambda rng: make_phantom(CFG, rng, size=48), 1, 9, "enh")
    ct = load_volume(studies / "enh000.nii.gz")[0].numpy().astype(np.int16)
    patient = f"enhanced{files}"
    chunks = np.array_split(np.arange(ct.shape[2]), files)
    parts = split_enhanced(ct, (2.0, 2.0, 2.0), (-48.0, -48.0, 0.0), new_study(patient), [list(c) for c in chunks])
    written = write_series(parts, tmp_path / "dcm")
    n_segs = len(segs(orthanc))
    upload(written, orthanc.dicomweb)
    uid = uid_of(orthanc, patient)
    out, params = client.infer("crossmodal", uid, {})
    predicted = load_volume(out)
    assert predicted.shape[1:] == ct.shape and params["modalities_used"] == ["ct"]  # PET / MR absent: zero-filled
    assert dice(predicted[0].numpy(), truth(studies, "enh000"), 1) > 0.8  # the organ, from CT alone
    client.save_label(uid, out)
    info = client.datastore()["objects"][uid]["labels"]["final"]["info"]
    assert info["pacs"] == "stored" and "pacs_error" not in info, info
    (seg,) = [s for s in segs(orthanc) if str(s.ReferencedSeriesSequence[0].SeriesInstanceUID) == uid]
    assert len(segs(orthanc)) == n_segs + 1 and str(seg.SeriesInstanceUID) == info["SegSeriesInstanceUID"]
    assert sorted(str(r.ReferencedSOPInstanceUID) for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) \
        == sorted(str(ds.SOPInstanceUID) for ds in parts)
    files = make_client(orthanc.dicomweb).retrieve_series(str(seg.StudyInstanceUID), str(seg.SeriesInstanceUID))
    files[0].save_as(tmp_path / "seg.dcm")
    assert seg_kind(files[0]) == "dense"
    back = seg_to_label(tmp_path / "seg.dcm", CFG.labels, predicted.affine.numpy(), predicted.shape[1:])
    np.testing.assert_array_equal(back, predicted[0].numpy())
    status = requests.get(f"{server.url}/datastore/?output=stats", timeout=30).json()
    assert uid not in status["not_in_pacs"] and uid not in status["pending_upload"]
    train = requests.get(f"{server.url}/datastore/?output=train", timeout=30).json()
    (item,) = [d for d in train if Path(d["image"]).name.startswith(uid)]  # the training list holds it
    np.testing.assert_array_equal(load_volume(item["label"])[0].numpy(), predicted[0].numpy())
    client.save_label(uid, out)  # the same label again: the same SEG UIDs, so the PACS keeps one copy
    assert len(segs(orthanc)) == n_segs + 1


def test_a_pacs_series_with_a_slice_missing_is_a_422_naming_it_and_caches_nothing(pacs, server, client, tmp_path):
    """A study stored without one of its CT slices (an interrupted send): infer on it is a 422 naming the case and
    the gap, not a volume read with the wrong spacing (ITK's series reader warns and goes on); nothing of the case is
    cached, so the study, once complete, is read whole."""
    from crossmodal.dicom import case_to_dicom, upload

    orthanc, _ = pacs
    studies = tmp_path / "s"
    generate(studies, CFG, lambda rng: make_phantom(CFG, rng, size=48), 1, 8, "gap")
    written = case_to_dicom("gap000", {"ct": str(studies / "gap000.nii.gz")}, CFG, tmp_path / "dcm")
    slices = sorted(written["ct"].glob("*.dcm"), key=lambda f: pydicom.dcmread(str(f)).InstanceNumber)
    upload([f for f in slices if f != slices[10]], orthanc.dicomweb)
    ct_uid = uid_of(orthanc, "gap000")
    with pytest.raises(MONAILabelClientException) as e:
        client.infer("crossmodal", ct_uid, {})
    assert e.value.msg.startswith("Status: 422; ") and f"case '{ct_uid}': CT series on {orthanc.dicomweb}: slices " \
        "at -29.00 and -25.00 mm are 4.00 mm apart, the others 2.00 mm: a slice is missing (or two series share this " \
        "UID); store the series there again" in e.value.msg, e.value.msg
    n_segs = len(segs(orthanc))
    with pytest.raises(MONAILabelClientException) as e:  # a label for it: the same 422, nothing stored
        client.save_label(ct_uid, str(studies / "truth" / "gap000.nii.gz"))
    assert e.value.msg.startswith("Status: 422; ") and "a slice is missing" in e.value.msg, e.value.msg
    (tmp_path / "strokes.bin").write_bytes(bytes(48 ** 3))  # OHIF's strokes: the grid comes from the case
    with pytest.raises(MONAILabelClientException) as e:
        client.infer("grow_scribbles", ct_uid, {}, label_in=str(tmp_path / "strokes.bin"))
    assert e.value.msg.startswith("Status: 422; ") and "a slice is missing" in e.value.msg, e.value.msg
    assert len(segs(orthanc)) == n_segs
    assert ct_uid not in client.datastore()["objects"]
    assert not list((server.model_dir.parent / "cache").glob(f"{ct_uid}*"))
    upload([slices[10]], orthanc.dicomweb)  # the slice sent again: the case reads whole
    out, result = client.infer("crossmodal", ct_uid, {})
    assert result["modalities_used"] == ["ct"] and load_volume(out).shape[1:] == load_volume(
        studies / "gap000.nii.gz").shape[1:]


def test_a_cache_converted_by_an_earlier_reader_is_converted_again_from_its_dicom_files(pacs, tmp_path, monkeypatch):
    """A PACS cache made before a change to the DICOM reading (2026-12-04: a PET read with its first slice's
    rescale) holds that reader's conversions: each is converted again from the DICOM files the cache kept, without a
    download; a conversion of the current reader is kept as it is."""
    import monailabel.datastore.utils.dicom as monailabel_dicom
    from crossmodal.serving.dicomweb import READER_VERSION, PacsDatastore

    orthanc, _ = pacs
    store = PacsDatastore(orthanc.dicomweb, CFG, cache_path=str(tmp_path / "cache"))
    ct_uid, pet_uid = uid_of(orthanc, "phantom001"), uid_of(orthanc, "phantom001", "PT")
    primary = Path(store.get_image_uri(ct_uid))
    pet = primary.parent / CFG.data.sidecar_dir / ct_uid / "pet.nii.gz"
    stamps = [primary.parent / f".{ct_uid}.series", pet.parent / ".pet.series"]
    assert [s.read_text() for s in stamps] == [f"{ct_uid} {READER_VERSION}", f"{pet_uid} {READER_VERSION}"]
    fetched = {p: load_volume(p)[0].numpy() for p in (primary, pet)}
    assert all(v.std() > 0 for v in fetched.values())

    def no_download(*args, **kwargs):
        raise AssertionError("a series was downloaded again")

    monkeypatch.setattr(monailabel_dicom, "dicom_web_download_series", no_download)
    for p, values in fetched.items():  # what an earlier reader left (other values), stamped as it stamped
        save_volume(p, np.zeros_like(values), load_volume(p).affine.numpy())
    stamps[0].unlink()  # the primary had none
    stamps[1].write_text(pet_uid)  # a sibling's held its series UID alone
    assert store.get_image_uri(ct_uid) == str(primary)
    for p, values in fetched.items():
        np.testing.assert_array_equal(load_volume(p)[0].numpy(), values)
    assert [s.read_text() for s in stamps] == [f"{ct_uid} {READER_VERSION}", f"{pet_uid} {READER_VERSION}"]
    save_volume(pet, np.zeros_like(fetched[pet]), load_volume(pet).affine.numpy())  # current stamp: not read again
    store.get_image_uri(ct_uid)
    assert not load_volume(pet)[0].numpy().any()


def test_a_pacs_whose_studies_the_preset_does_not_take_says_so(pacs, tmp_path, caplog):
    """Served with the brain preset, the phantom PACS (CT + PET + MR studies) listed no case without a word: now a
    warning names a study, its series and the preset's rule, once (not at each listing); where every study is a
    case there is none."""
    from crossmodal.serving.dicomweb import PacsDatastore

    orthanc, _ = pacs
    with caplog.at_level(logging.WARNING, logger="crossmodal.serving.dicomweb"):
        store = PacsDatastore(orthanc.dicomweb, load_config("brain"), cache_path=str(tmp_path / "cache"))
        assert store.list_images() == []
        store.refresh_index(force=True)
    warned = [r.getMessage() for r in caplog.records if r.name == "crossmodal.serving.dicomweb"]
    assert len(warned) == 1, warned
    client = make_client(orthanc.dicomweb)  # the module's Orthanc: its 4 studies and what tests before added
    studies = sorted(r["0020000D"]["Value"][0] for r in client.search_for_studies())
    rows = client.search_for_series(search_filters={"StudyInstanceUID": studies[0]},
                                    fields=["SeriesDescription", "SeriesNumber", "Modality"])
    listed = [f"{r['00080060']['Value'][0]} {r['0008103E']['Value'][0]!r} #{r['00200011']['Value'][0]}" for r in
              sorted(rows, key=lambda r: (int(r["00200011"]["Value"][0]), r["00080060"]["Value"][0],
                                          r["0020000E"]["Value"][0]))]
    assert warned[0] == (
        f"PACS {orthanc.dicomweb}: none of its {len(studies)} studies has a series for 't1' (MR, description matching "
        f"'t1'), so they are no case (e.g. study {studies[0]}: {listed[:6]}); the preset names the series each "
        "modality takes (--conf preset, modalities: dicom_modality, series_description)")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="crossmodal.serving.dicomweb"):
        assert len(PacsDatastore(orthanc.dicomweb, CFG, cache_path=str(tmp_path / "c2")).list_images()) == len(studies)
    assert [r for r in caplog.records if r.name == "crossmodal.serving.dicomweb"] == []  # every study a case


def test_a_pacs_served_without_a_preset_takes_the_one_its_series_fit(pacs, tmp_path, caplog):
    """The server on a PACS without --conf preset served the brain's (the phantom's CT + PET + MR studies: no case,
    a warning the only sign); now the preset whose series the studies have, said in the log; a PACS that does not
    answer at start keeps the default, said too."""
    from conftest import APP
    from crossmodal.serving.app import AppParts

    orthanc, _ = pacs
    client = make_client(orthanc.dicomweb)
    studies = {r["0020000D"]["Value"][0] for r in client.search_for_studies()}
    complete = sum(  # the studies with a CT, a PT and an MR series (phantom003 has no PET; a test may add others)
        {"CT", "PT", "MR"} <= {r["00080060"]["Value"][0] for r in client.search_for_series(
            search_filters={"StudyInstanceUID": uid}, fields=["Modality"])} for uid in studies)
    with caplog.at_level(logging.INFO, logger="crossmodal.serving.app"):
        parts = AppParts.from_conf(str(APP), {"model_dir": str(tmp_path / "m")}, pacs=True, studies=orthanc.dicomweb)
    assert parts.preset == "phantom" and parts.cfg.modality_names == ["ct", "pet", "mr"]
    assert (f"--conf preset not given: preset 'phantom' (ct + pet, mr), the one whose series {complete} of the "
            f"{len(studies)} studies under {orthanc.dicomweb} have (the default, 'brain', takes t1 + t2, pd; studies "
            "with all its series: 0)") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="crossmodal.serving.app"):  # nothing listens there
        parts = AppParts.from_conf(str(APP), {"model_dir": str(tmp_path / "m"), "pacs_timeout": "2"}, pacs=True,
                                   studies="http://127.0.0.1:9/dicom-web")
    assert parts.preset == "brain"
    assert "--conf preset not given, and the PACS cannot say which fits; serving 'brain'" in caplog.text



def test_a_studys_scout_numbered_before_its_ct_is_not_taken_for_the_case(pacs, tmp_path):
    """Scanners number a study's scout (a CT topogram: one image) first; the PACS datastore took it for the case's CT,
    lowest series number first, and the case was one slice. Now a scout / localizer by its description goes last."""
    from crossmodal.dicom import upload
    from crossmodal.serving.dicomweb import PacsDatastore, pacs_series

    orthanc, studies = pacs
    client = make_client(orthanc.dicomweb)
    ct_uid = uid_of(orthanc, "phantom001")
    ct = load_volume(studies / "phantom001.nii.gz")
    study_uid = next(s.study for s in pacs_series(orthanc.dicomweb) if s.uid == ct_uid)
    scout = volume_to_series(ct[0, :, :, 20:21].numpy(), ct.affine.numpy(), "CT", new_study("phantom001",
                                                                                            uid=study_uid),
                             0, "Topogram 0.6 T20s")
    assert upload(write_series(scout, tmp_path / "scout"), orthanc.dicomweb) == 1
    scout_uid = str(scout[0].SeriesInstanceUID)
    try:
        assert next(s for s in pacs_series(orthanc.dicomweb) if s.uid == scout_uid).number == 0
        store = PacsDatastore(orthanc.dicomweb, CFG, cache_path=str(tmp_path / "cache"))
        (case_id, case), = [(i, c) for i, c in store.refresh_index(force=True).items() if c.study == study_uid]
        assert case.primary.uid == ct_uid
        image = load_volume(store.get_image_uri(case_id))
        assert tuple(image.shape[1:]) == tuple(ct.shape[1:])
    finally:  # the module's other tests know one CT series a patient
        for row in client.search_for_series(search_filters={"SeriesInstanceUID": scout_uid}):
            found = requests.post(f"{orthanc.url}/tools/lookup", data=row["0020000E"]["Value"][0], timeout=30).json()
            for hit in found:
                requests.delete(f"{orthanc.url}/series/{hit['ID']}", timeout=30)
    assert uid_of(orthanc, "phantom001") == ct_uid


def test_to_dicom_places_a_label_cropped_to_its_segments_and_refuses_one_on_another_grid(tmp_path, monkeypatch):
    """A label saved by 3D Slicer cropped to its segments went to dcmqi as it was, and one on another grid was
    written against the image series regardless; the first now becomes a SEG of the whole label on the image, the
    second is refused naming the case and the file, and neither leaves a temp file (the refusal left an empty
    ``crossmodal-*.nii.gz`` until 2026-12-07)."""
    import tempfile

    from crossmodal.dicom import case_to_dicom
    from crossmodal.errors import CaseError

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    studies = make_phantom_studies(tmp_path / "s", CFG, cases=1, dense=1, sparse=0, seed=13)
    image = load_volume(studies / "phantom000.nii.gz")
    aff = image.affine.double().numpy()
    full = load_volume(studies / "labels" / "final" / "phantom000.nii.gz")[0].numpy().astype(np.uint8)
    found = np.argwhere(full)
    lo, hi = found.min(0), found.max(0) + 1
    cropped = aff.copy()
    cropped[:3, 3] = aff[:3, :3] @ lo + aff[:3, 3]
    save_volume(tmp_path / "crop.nrrd", full[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], cropped)
    files = {"ct": str(studies / "phantom000.nii.gz"), **{m: str(studies / "modalities" / "phantom000" /
                                                               f"{m}.nii.gz") for m in ("pet", "mr")}}
    written = case_to_dicom("phantom000", files, CFG, tmp_path / "dcm", label=str(tmp_path / "crop.nrrd"))
    np.testing.assert_array_equal(seg_to_label(written["seg"], CFG.labels, aff, full.shape), full)
    coarse = aff.copy()
    coarse[:3, :3] *= 2
    save_volume(tmp_path / "coarse.nii.gz", full[::2, ::2, ::2], coarse)
    with pytest.raises(CaseError, match=r"^case 'phantom000': file .*coarse\.nii\.gz: label grid \(24, 24, 24\)"):
        case_to_dicom("phantom000", files, CFG, tmp_path / "dcm2", label=str(tmp_path / "coarse.nii.gz"))
    assert sorted(temp.iterdir()) == []
