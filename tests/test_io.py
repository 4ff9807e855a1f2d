"""Case loading: MONAI readers for NIfTI/NRRD, resampling in physical space, 4D input, bad files."""

import gzip
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from crossmodal.data.grids import grid_affine
from crossmodal.io import CaseError, find_case, load_volume, read_label, resample_to, save_volume
from crossmodal.transforms import LoadCased, load_case, normalize


def _ramp(shape):
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    return (i * 3 + j * 5 + k * 7).astype(np.float32)


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha"])
def test_roundtrip_affine_in_ras(tmp_path: Path, ext: str):
    aff = grid_affine((1.5, 2.0, 3.0), (10, 12, 8), center=np.array([5.0, -3.0, 2.0]))
    save_volume(tmp_path / f"v{ext}", _ramp((10, 12, 8)), aff)
    vol = load_volume(tmp_path / f"v{ext}")
    assert tuple(vol.shape) == (1, 10, 12, 8)
    np.testing.assert_allclose(vol.affine.numpy(), aff, atol=1e-5)
    np.testing.assert_allclose(vol[0].numpy(), _ramp((10, 12, 8)))


def test_metaimage_files_hold_itks_geometry_and_a_studies_folder_of_them_segments_as_its_nifti_twin(
        tmp_path: Path, phantom_cfg, capsys):
    """ITK's one-file MetaImage (``.mha``, grand-challenge.org's format: PI-CAI's prostate T2 / ADC / DWI) is read
    and written like NIfTI and NRRD (before, a studies folder of them was "no primary image to segment")."""
    import SimpleITK as sitk
    from crossmodal.cli import main
    from crossmodal.data.phantom import make_phantom
    from crossmodal.data.studies import generate
    from crossmodal.io import volume_channels

    # a sagittally stored, oblique grid: ITK keeps it in LPS, MONAI's readers give it back in RAS
    theta = np.deg2rad(10.0)
    rot = np.array([[0.0, 0.0, 1.0], [np.cos(theta), -np.sin(theta), 0.0], [np.sin(theta), np.cos(theta), 0.0]])
    aff = np.eye(4)
    aff[:3, :3], aff[:3, 3] = rot @ np.diag([1.2, 0.9, 3.0]), [-20.0, 14.5, 3.0]
    labels = (_ramp((9, 11, 6)) % 4).astype(np.uint8)
    save_volume(tmp_path / "l.mha", labels, aff)
    back = load_volume(tmp_path / "l.mha")
    np.testing.assert_allclose(back.affine.numpy(), aff, atol=1e-5)
    assert np.array_equal(back[0].numpy(), labels) and volume_channels(tmp_path / "l.mha") == 1
    itk = sitk.ReadImage(str(tmp_path / "l.mha"))
    lps = np.diag([-1.0, -1.0, 1.0])
    assert itk.GetPixelIDTypeAsString() == "8-bit unsigned integer" and itk.GetSize() == (9, 11, 6)
    np.testing.assert_allclose(itk.GetSpacing(), (1.2, 0.9, 3.0), atol=1e-6)
    np.testing.assert_allclose(np.reshape(itk.GetDirection(), (3, 3)), lps @ rot, atol=1e-6)
    np.testing.assert_allclose(itk.GetOrigin(), lps @ aff[:3, 3], atol=1e-5)
    with pytest.raises(ValueError, match="a 3-channel volume is written as NIfTI"):
        save_volume(tmp_path / "c.mha", np.zeros((4, 4, 4, 3), np.float32), np.eye(4))

    for ext in (".nii.gz", ".mha"):
        generate(tmp_path / ext, phantom_cfg, lambda rng: make_phantom(phantom_cfg, rng, size=48), 1, 5, "phantom",
                 ext=ext)
        out = ".mha" if ext == ".mha" else ".nii.gz"
        assert main(["predict", "--studies", str(tmp_path / ext), "--config", "phantom", "--model",
                     str(Path(__file__).parents[1] / "apps" / "crossmodal" / "pretrained" / "phantom_crossmodal.pt"),
                     "--out", str(tmp_path / f"pred{ext}"), "--extension", out]) == 0
    assert sorted(p.name for p in (tmp_path / ".mha" / "modalities" / "phantom000").iterdir()) == ["mr.mha", "pet.mha"]
    a, b = load_volume(tmp_path / "pred.nii.gz" / "phantom000.nii.gz"), load_volume(tmp_path / "pred.mha" /
                                                                                    "phantom000.mha")
    assert torch.equal(a, b) and len(np.unique(b.numpy())) == 4
    np.testing.assert_allclose(b.affine.numpy(), a.affine.numpy(), atol=1e-5)


def test_resampling_uses_physical_space_not_voxel_order(tmp_path: Path):
    """The same data stored with flipped and permuted axes resamples back exactly onto the primary grid."""
    shape = (8, 10, 6)
    ref_aff = grid_affine((2.0, 2.0, 2.0), shape)
    data = _ramp(shape)
    save_volume(tmp_path / "ref.nii.gz", data, ref_aff)
    # axis 0 flipped, then axes 0 and 1 swapped: voxel (a, b, c) of `other` is voxel (7 - b, a, c) of `data`
    other = np.flip(data, 0).transpose(1, 0, 2).copy()
    m = np.zeros((4, 4))
    m[0, 1], m[1, 0], m[2, 2], m[3, 3], m[0, 3] = -1, 1, 1, 1, shape[0] - 1
    save_volume(tmp_path / "other.nrrd", other, ref_aff @ m)
    ref, moved = load_volume(tmp_path / "ref.nii.gz"), load_volume(tmp_path / "other.nrrd")
    out = resample_to(moved, ref)
    np.testing.assert_allclose(out[0].numpy(), data, atol=1e-3)


def test_secondary_on_coarser_grid_is_resampled_to_primary_shape(phantom_studies: Path, phantom_cfg):
    case = find_case(phantom_studies / "phantom000.nii.gz", phantom_cfg.modality_names)
    assert set(case.modalities) == {"pet", "mr"} and all(case.modalities.values())
    shapes = {n: tuple(load_volume(p).shape[1:]) for n, p in case.modalities.items()}
    assert shapes["pet"] != (48, 48, 48) and shapes["mr"] != (48, 48, 48)  # other grids on disk
    image, used = load_case(case, phantom_cfg)
    assert tuple(image.shape) == (3, 48, 48, 48) and used == ["ct", "pet", "mr"]
    # with no misregistration, the lesion (bright in PET) and the organ (bright in MR) land on the truth
    truth = load_volume(phantom_studies / "truth" / "phantom000.nii.gz")[0].numpy()
    pet, mr = image[1].numpy(), image[2].numpy()
    assert pet[truth == 2].mean() > pet[truth == 1].mean() + 1.0
    assert mr[truth == 1].mean() > mr[(truth == 0) & (mr > -0.5)].mean() + 0.5


def test_a_single_slice_or_a_4d_modality_is_refused_naming_the_file(tmp_path: Path, phantom_cfg):
    """A slice alone as the primary was segmented from padding (the phantom model painted 17 ml of lesion into one
    48 x 48 slice) and crashed registration; a dynamic PET (3 frames) said "expected one channel, got 3"."""
    aff = grid_affine((2.0,) * 3, (16, 16, 16))
    vol = _ramp((16, 16, 16))
    (tmp_path / "modalities" / "c1").mkdir(parents=True)
    save_volume(tmp_path / "c1.nii.gz", vol[:, :, 7:8], aff)
    for name in ("pet", "mr"):
        save_volume(tmp_path / "modalities" / "c1" / f"{name}.nii.gz", vol, aff)
    case = find_case(tmp_path / "c1.nii.gz", phantom_cfg.modality_names)
    with pytest.raises(CaseError) as e:
        load_case(case, phantom_cfg)
    assert str(e.value) == (f"case 'c1': file {tmp_path / 'c1.nii.gz'}: is a single slice (grid (16, 16, 1)); the app "
                            "segments 3D volumes: send the whole series (a series split into single slices is read as "
                            "one case per slice)")
    save_volume(tmp_path / "c1.nii.gz", vol, aff)
    pet = tmp_path / "modalities" / "c1" / "pet.nii.gz"
    save_volume(pet, np.stack([vol] * 3, -1), aff)
    with pytest.raises(CaseError) as e:
        load_case(case, phantom_cfg)
    assert str(e.value) == (f"case 'c1': file {pet}: holds 3 volumes (a 4D file: frames of a dynamic or gated "
                            "series, or channels) on a (16, 16, 16) grid; a modality is one 3D volume: keep the frame "
                            "to segment with, or their sum")
    save_volume(pet, vol, aff)
    assert tuple(load_case(case, phantom_cfg)[0].shape) == (3, 16, 16, 16)


def test_four_d_multichannel_primary(tmp_path: Path, phantom_cfg):
    aff = grid_affine((2.0,) * 3, (16, 16, 16))
    chans = np.stack([_ramp((16, 16, 16)) * (i + 1) for i in range(3)], axis=-1)
    save_volume(tmp_path / "multi.nii.gz", chans, aff)
    d = LoadCased(phantom_cfg)({"image": str(tmp_path / "multi.nii.gz")})
    assert tuple(d["image"].shape) == (3, 16, 16, 16) and d["modalities_used"] == ["ct", "pet", "mr"]
    expected_pet = normalize(torch.from_numpy(chans[None, ..., 1]), phantom_cfg.modalities[1])[0]
    np.testing.assert_allclose(d["image"][1].numpy(), expected_pet.numpy(), atol=1e-4)
    save_volume(tmp_path / "two.nii.gz", chans[..., :2], aff)
    with pytest.raises(CaseError, match="has 2 channels but the config names 3 modalities"):
        LoadCased(phantom_cfg)({"image": str(tmp_path / "two.nii.gz")})
    # the channels from the header alone, as the reader counts them; such a case lacks no modality file
    from crossmodal.io import volume_channels
    from crossmodal.serving.train import lacking_modalities

    save_volume(tmp_path / "one.nrrd", chans[..., 0], aff)
    save_volume(tmp_path / "one.nii.gz", chans[..., 0], aff)
    (tmp_path / "bad.nii.gz").write_bytes(b"not a volume")
    names = ("multi.nii.gz", "two.nii.gz", "one.nii.gz", "one.nrrd", "bad.nii.gz", "absent.nii.gz")
    assert [volume_channels(tmp_path / n) for n in names] == [3, 2, 1, 1, None, None]
    lacking = lacking_modalities(phantom_cfg, [{"image": str(tmp_path / n)} for n in names[:3] + names[4:]])
    assert {c: m for c, (_, m) in lacking.items()} == {c: ["pet", "mr"] for c in ("two", "one", "bad", "absent")}
    with pytest.raises(ValueError, match=r"multi.nrrd: a 3-channel volume is written as NIfTI \(.nii.gz\); NRRD "):
        save_volume(tmp_path / "multi.nrrd", chans, aff)
    assert not list(tmp_path.glob("*multi.nrrd*"))


def test_missing_modality_policy(phantom_studies: Path, phantom_cfg):
    (phantom_studies / "modalities" / "phantom001" / "pet.nii.gz").unlink()
    case = find_case(phantom_studies / "phantom001.nii.gz", phantom_cfg.modality_names)
    with pytest.raises(CaseError) as e:
        load_case(case, phantom_cfg)
    assert "case 'phantom001'" in str(e.value) and "modality 'pet' is missing" in str(e.value)
    assert str(e.value).endswith('add it (a running server takes it as PUT /datastore/image?image=phantom001 with '
                                  'params {"modality": "pet"}), or use the case without it (missing_modality '
                                  'zero_fill)')
    image, used = load_case(case, phantom_cfg, missing="zero_fill")
    assert used == ["ct", "mr"] and float(image[1].abs().max()) == 0.0
    d = LoadCased(phantom_cfg, missing="zero_fill")({"image": str(phantom_studies / "phantom001.nii.gz")})
    assert d["present"].tolist() == [True, False, True] and d["modalities_used"] == ["ct", "mr"]


def test_a_blank_modality_is_refused_or_left_out_by_the_missing_policy(phantom_studies: Path, phantom_cfg):
    """A series of one value everywhere (a failed export or reconstruction) crashed registration with ITK's "Zero-valued
    spacing is not supported" and a traceback; it is now refused naming the file, or, under ``zero_fill``, left out
    as a missing one. A blank primary has nothing to segment."""
    pet = phantom_studies / "modalities" / "phantom001" / "pet.nii.gz"
    vol = load_volume(pet)
    save_volume(pet, np.zeros(vol.shape[1:], np.float32), vol.affine.numpy())
    case = find_case(phantom_studies / "phantom001.nii.gz", phantom_cfg.modality_names)
    with pytest.raises(CaseError) as e:
        load_case(case, phantom_cfg)
    assert str(e.value) == (f"case 'phantom001': file {pet}: holds one value (0) in every voxel: no image (a failed "
                            "export or reconstruction?); re-export the series, or use the case without it "
                            "(missing_modality zero_fill)")
    image, used = load_case(case, phantom_cfg, missing="zero_fill")
    assert used == ["ct", "mr"] and float(image[1].abs().max()) == 0.0 and set(image.meta["registered_mm"]) == {"mr"}
    d = LoadCased(phantom_cfg, missing="zero_fill")({"image": str(phantom_studies / "phantom001.nii.gz")})
    assert d["present"].tolist() == [True, False, True]
    ct = phantom_studies / "phantom002.nii.gz"
    vol = load_volume(ct)
    save_volume(ct, np.full(vol.shape[1:], -1000.0, np.float32), vol.affine.numpy())  # air: no CT
    with pytest.raises(CaseError) as e:
        load_case(find_case(ct, phantom_cfg.modality_names), phantom_cfg, missing="zero_fill")
    assert str(e.value) == (f"case 'phantom002': file {ct}: holds one value (-1000) in every voxel: no image (a "
                            "failed export or reconstruction?); re-export the series")


def test_a_blank_channel_of_a_4d_primary_is_refused_or_left_out_by_the_missing_policy(tmp_path: Path, phantom_cfg,
                                                                                       caplog):
    """A 4D primary (every modality a channel, as the Medical Segmentation Decathlon ships them) whose PET channel is
    blank was refused even under ``zero_fill`` ("holds one value", naming no channel); its channel is now named, and
    ``zero_fill`` leaves it out as it does a blank PET file. A blank CT channel has nothing to segment."""
    aff = grid_affine((2.0,) * 3, (16, 16, 16))
    chans = np.stack([_ramp((16, 16, 16)) * (i + 1) for i in range(3)], axis=-1)
    whole = LoadCased(phantom_cfg)({"image": str(_saved(tmp_path / "whole.nii.gz", chans, aff))})["image"]
    chans[..., 1] = 0.0
    path = _saved(tmp_path / "stack.nii.gz", chans, aff)
    case = find_case(path, phantom_cfg.modality_names)
    with pytest.raises(CaseError) as e:
        load_case(case, phantom_cfg)
    assert str(e.value) == (f"case 'stack': file {path}: channel 1 of 3 ('pet') holds one value (0) in every voxel: no "
                            "image (a failed export or reconstruction?); re-export the series, or use the case without "
                            "it (missing_modality zero_fill)")
    with caplog.at_level("WARNING", logger="crossmodal.transforms"):
        image, used = load_case(case, phantom_cfg, missing="zero_fill")
    assert used == ["ct", "mr"] and set(image.meta["registered_mm"]) == {"mr"}
    assert float(image[1].abs().max()) == 0.0 and torch.equal(image[0::2], whole[0::2])
    assert f"case 'stack': file {path}: channel 1 of 3 ('pet') holds one value (0)" in caplog.text
    assert "segmented without pet" in caplog.text
    d = LoadCased(phantom_cfg, missing="zero_fill")({"image": str(path)})
    assert d["present"].tolist() == [True, False, True] and d["modalities_used"] == ["ct", "mr"]
    assert load_case(case, phantom_cfg, drop=["pet"])[1] == ["ct", "mr"]  # dropped anyway: not refused
    chans[..., 0] = -1000.0
    chans[..., 1] = _ramp((16, 16, 16))
    path = _saved(tmp_path / "stack.nii.gz", chans, aff)
    with pytest.raises(CaseError) as e:
        load_case(case, phantom_cfg, missing="zero_fill")
    assert str(e.value) == (f"case 'stack': file {path}: channel 0 of 3 ('ct') holds one value (-1000) in every voxel: "
                            "no image (a failed export or reconstruction?); re-export the series")


def _saved(path: Path, values: np.ndarray, affine: np.ndarray) -> Path:
    save_volume(path, values, affine)
    return path


def test_a_modality_file_named_in_another_case_is_found(phantom_studies: Path, phantom_cfg):
    """``PET.nii.gz`` / ``Mr.nii.gz`` (a folder made by hand) are the case's pet and mr: they were "missing", with the
    files beside the path the message named; an exact name wins where both are there."""
    side = phantom_studies / "modalities" / "phantom001"
    exact, _ = load_case(find_case(phantom_studies / "phantom001.nii.gz", phantom_cfg.modality_names), phantom_cfg)
    (side / "pet.nii.gz").rename(side / "PET.nii.gz")
    (side / "mr.nii.gz").rename(side / "Mr.nii.gz")
    case = find_case(phantom_studies / "phantom001.nii.gz", phantom_cfg.modality_names)
    assert case.modalities == {"pet": str(side / "PET.nii.gz"), "mr": str(side / "Mr.nii.gz")}
    image, used = load_case(case, phantom_cfg)
    assert used == ["ct", "pet", "mr"] and torch.equal(image, exact)
    save_volume(side / "pet.nii.gz", np.zeros((4, 4, 4), np.float32), np.eye(4))
    assert find_case(phantom_studies / "phantom001.nii.gz", phantom_cfg.modality_names).modalities["pet"] == \
        str(side / "pet.nii.gz")


def test_a_folder_of_one_cases_files_named_by_modality_is_a_case(phantom_studies: Path, phantom_cfg, tmp_path: Path):
    """What a MONAI Label session of several files (or of a zip) holds: the case's files side by side, each named by
    its modality; and a primary sent alone says how to send the rest."""
    src = phantom_studies / "modalities" / "phantom001"
    folder = tmp_path / "session"
    folder.mkdir()
    shutil.copy(phantom_studies / "phantom001.nii.gz", folder / "ct.nii.gz")
    shutil.copy(src / "pet.nii.gz", folder / "pet.nii.gz")
    case = find_case(folder, phantom_cfg.modality_names)
    assert (case.case_id, case.primary, case.folder) == ("session", str(folder / "ct.nii.gz"), str(folder))
    assert case.modalities == {"pet": str(folder / "pet.nii.gz"), "mr": None}
    with pytest.raises(CaseError) as e:
        load_case(case, phantom_cfg)
    assert str(e.value) == (f"case 'session': modality 'mr' is missing: no mr.nii.gz (or .nii/.nrrd/.mha) in the "
                            f"case's folder {folder}; send it with the others, each named by its modality (ct, pet, "
                            "mr), or use the case without it (missing_modality zero_fill)")
    shutil.copy(src / "mr.nii.gz", folder / "mr.nii.gz")
    image, used = load_case(find_case(folder, phantom_cfg.modality_names), phantom_cfg)
    reference, _ = load_case(find_case(phantom_studies / "phantom001.nii.gz", phantom_cfg.modality_names), phantom_cfg)
    assert used == ["ct", "pet", "mr"] and torch.equal(image.as_tensor(), reference.as_tensor())

    (folder / "ct.nii.gz").rename(folder / "CT.nii.gz")  # any case (was "needs its ct image as ct.nii.gz")
    assert find_case(folder, phantom_cfg.modality_names).primary == str(folder / "CT.nii.gz")
    # the case's own file beside its secondaries, as a studies folder names them: it is the primary, its name the id
    (folder / "CT.nii.gz").rename(folder / "phantom001.nii.gz")
    case = find_case(folder, phantom_cfg.modality_names)
    assert (case.case_id, case.primary) == ("phantom001", str(folder / "phantom001.nii.gz"))
    assert case.modalities == {"pet": str(folder / "pet.nii.gz"), "mr": str(folder / "mr.nii.gz")}
    assert torch.equal(load_case(case, phantom_cfg)[0].as_tensor(), reference.as_tensor())
    (folder / "mr.nii.gz").rename(folder / "scan.nii.gz")  # two files named by no modality: which is the CT?
    with pytest.raises(CaseError) as e:
        find_case(folder, phantom_cfg.modality_names)
    assert str(e.value).endswith("a folder of one case needs its ct image as ct.nii.gz (or .nii/.nrrd/.mha) and each "
                                 "other modality named by it (pet, mr); it holds ['pet.nii.gz', 'phantom001.nii.gz', "
                                 "'scan.nii.gz']")
    alone = tmp_path / "upload"
    alone.mkdir()
    shutil.copy(phantom_studies / "phantom001.nii.gz", alone / "tmpab12cd34.nii.gz")
    with pytest.raises(CaseError) as e:
        load_case(find_case(alone / "tmpab12cd34.nii.gz", phantom_cfg.modality_names), phantom_cfg)
    assert str(e.value) == ("case 'tmpab12cd34': modality 'pet' is missing: tmpab12cd34.nii.gz came alone (no "
                            "modalities/ folder beside it); send the case's files together, each named by its modality "
                            "(a session of ct.nii.gz, pet.nii.gz, mr.nii.gz), or add the case to the datastore with "
                            "each modality, or use the case without it (missing_modality zero_fill)")


def test_cases_with_and_without_a_modality_share_a_training_batch(phantom_studies: Path):
    """A training or validation batch may hold a case without its PET beside complete ones: it collates, and its
    ``present`` rows say which case has what (what only an infer response reports is dropped)."""
    from crossmodal.config import load_config
    from crossmodal.transforms import preprocessing
    from monai.data import DataLoader, Dataset

    (phantom_studies / "modalities" / "phantom001" / "pet.nii.gz").unlink()
    cfg = load_config("phantom", overrides={"infer": {"missing_modality": "zero_fill"},
                                            "train": {"patches_per_case": 1}})
    items = [{"image": str(phantom_studies / f"phantom00{i}.nii.gz")} for i in (0, 1, 2)]
    for stage in ("unlabeled", "val"):
        batch = next(iter(DataLoader(Dataset(items, preprocessing(cfg, stage)), batch_size=3)))
        assert batch["present"].tolist() == [[True, True, True], [True, False, True], [True, True, True]], stage
        assert list(batch["case_id"]) == ["phantom000", "phantom001", "phantom002"]
        assert "modalities_used" not in batch and "registered_mm" not in batch["image"].meta
        assert "coverage" not in batch["image"].meta and "fov" not in batch
        pet = batch["image"][1, 1]  # zeros (augmented: one shifted value), marked absent
        assert float(pet.max() - pet.min()) == 0.0 and (stage != "val" or float(pet.abs().max()) == 0.0)
    infer = preprocessing(cfg, "infer")(dict(items[1]))
    assert infer["modalities_used"] == ["ct", "mr"] and set(infer["image"].meta["registered_mm"]) == {"mr"}


def test_bad_files_name_case_file_and_problem(tmp_path: Path):
    aff = grid_affine((2.0,) * 3, (8, 8, 8))
    save_volume(tmp_path / "ok.nii.gz", _ramp((8, 8, 8)), aff)
    raw = (tmp_path / "ok.nii.gz").read_bytes()
    (tmp_path / "trunc.nii.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CaseError) as e:
        load_volume(tmp_path / "trunc.nii.gz", "c1")
    assert "case 'c1'" in str(e.value) and "trunc.nii.gz" in str(e.value) and "cannot be read" in str(e.value)
    bad = _ramp((8, 8, 8))
    bad[1, 2, 3] = np.nan
    bad[0, 0, 0] = np.inf
    save_volume(tmp_path / "nan.nii.gz", bad, aff)
    with pytest.raises(CaseError, match="holds 2 non-finite voxels"):
        load_volume(tmp_path / "nan.nii.gz")
    with pytest.raises(CaseError, match="file does not exist"):
        load_volume(tmp_path / "absent.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(gzip.compress(b"not an image"))
    with pytest.raises(CaseError, match="cannot be read"):
        load_volume(tmp_path / "junk.nii.gz")


def test_label_on_other_grid_is_rejected(tmp_path: Path):
    aff = grid_affine((2.0,) * 3, (8, 8, 8))
    save_volume(tmp_path / "img.nii.gz", _ramp((8, 8, 8)), aff)
    save_volume(tmp_path / "lab.nii.gz", np.zeros((8, 8, 8), np.uint8), aff @ np.diag([1.0, 1.0, 1.5, 1.0]))
    with pytest.raises(CaseError, match="differs from the image grid"):
        read_label(tmp_path / "lab.nii.gz", load_volume(tmp_path / "img.nii.gz"), "c")
    nib.save(nib.Nifti1Image(np.zeros((2, 8, 8, 8), np.uint8), aff), tmp_path / "two.nii.gz")  # two maps stacked
    with pytest.raises(CaseError) as e:
        read_label(tmp_path / "two.nii.gz", load_volume(tmp_path / "img.nii.gz"), "c")
    assert e.value.problem == ("a label must be one 3D label map, got 8 channels on a (2, 8, 8) grid (a file's 4th "
                               "axis is read as channels)")  # said "got 8 channels" only


def test_resampling_is_exact_in_physical_space_across_rotation_and_spacing():
    """A linear function of RAS position sampled on a rotated 3 mm grid lands exactly on a 2 mm grid."""
    from crossmodal.data.grids import rotation_matrix, world_points
    from crossmodal.resample import axis_map, separable_resample, working_geometry
    from monai.data import MetaTensor

    g = np.array([0.3, -0.2, 0.5])

    def f(aff, shape):
        return torch.from_numpy(np.einsum("i,i...->...", g, world_points(shape, aff)).astype(np.float32))[None]

    src = grid_affine((3.0, 3.0, 3.5), (20, 20, 16), center=np.array([1.0, 2.0, -3.0]),
                      rotation=rotation_matrix(np.array([3.0, -2.0, 94.0])))
    dst = grid_affine((2.0, 2.0, 2.0), (24, 24, 24))
    out = resample_to(MetaTensor(f(src, (20, 20, 16)), affine=torch.as_tensor(src)),
                      MetaTensor(torch.zeros(1, 24, 24, 24), affine=torch.as_tensor(dst)))
    inner = (slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    assert float((out - f(dst, (24, 24, 24)))[inner].abs().max()) < 1e-3
    # the fast separable path between a grid and its working-spacing twin
    aff = grid_affine((0.8, 0.8, 2.5), (60, 50, 20)) @ np.diag([-1.0, 1.0, 1.0, 1.0])
    work, shape = working_geometry(aff, (60, 50, 20), (2.0, 2.0, 2.5))
    down = separable_resample(f(aff, (60, 50, 20)), shape, *axis_map(aff, work))
    assert float((down - f(work, shape))[:, 1:-1, 1:-1, 1:-1].abs().max()) < 1e-3
    up = separable_resample(down, (60, 50, 20), *axis_map(work, aff))
    assert float((up - f(aff, (60, 50, 20)))[:, 3:-3, 3:-3, 1:-1].abs().max()) < 1e-3


def test_atomic_copy_killed_mid_copy_leaves_the_old_file_whole(tmp_path: Path):
    """SIGKILL while the copy is half written (its source a FIFO that stops after 1 MiB): the destination keeps
    its old bytes; only a hidden temp file is left; a copy that fails in-process removes its temp file too."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from crossmodal.io import atomic_copy

    dst = tmp_path / "model.pt"
    dst.write_bytes(b"old model" * 1000)
    fifo = tmp_path / "src.fifo"
    os.mkfifo(fifo)
    child = subprocess.Popen([sys.executable, "-c", "import sys; from crossmodal.io import atomic_copy; "
                              f"atomic_copy({str(fifo)!r}, {str(dst)!r})"])
    with open(fifo, "wb") as pipe:
        pipe.write(b"n" * (1 << 20))
        pipe.flush()
        deadline = time.time() + 30
        while time.time() < deadline and not any(p.stat().st_size >= 1 << 20 for p in tmp_path.glob(".model.pt.*.tmp")):
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert dst.read_bytes() == b"old model" * 1000
    assert [p.stat().st_size for p in tmp_path.glob(".model.pt.*.tmp")] == [1 << 20]  # the half copy, hidden

    def boom(*_):
        raise OSError("disk gone")

    src = tmp_path / "new.pt"
    src.write_bytes(b"new")
    real = os.replace
    os.replace = boom
    try:
        with pytest.raises(OSError, match="disk gone"):
            atomic_copy(src, tmp_path / "other.pt")
    finally:
        os.replace = real
    assert not (tmp_path / "other.pt").exists() and not list(tmp_path.glob(".other.pt.*.tmp"))


def test_atomic_write_killed_mid_write_leaves_the_old_file_whole(tmp_path: Path):
    """The write behind every checkpoint the train task publishes without held-out labels (``LatestModel``), the
    stats and the learning curves: a process killed after 1 MiB of a 4 MiB model (SIGXFSZ at a 1 MiB file size
    limit, its default action) leaves the old file byte for byte and a hidden temp file; a write that fails
    in-process (the same limit, the signal ignored: EFBIG) leaves nothing."""
    dst = tmp_path / "model.pt"
    dst.write_bytes(b"old model" * 1000)
    code = ("import resource, signal, sys; from pathlib import Path; from crossmodal.config import atomic_write_bytes; "
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN if sys.argv[2] == 'ignore' else signal.SIG_DFL); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY)); "
            "atomic_write_bytes(Path(sys.argv[1]), b'n' * (4 << 20))")
    killed = subprocess.run([sys.executable, "-c", code, str(dst), "default"], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGXFSZ, killed.stderr[-2000:]
    assert dst.read_bytes() == b"old model" * 1000
    assert [p.stat().st_size for p in tmp_path.glob(".model.pt.*.tmp")] == [1 << 20]  # the part written, hidden
    for p in tmp_path.glob(".model.pt.*.tmp"):
        p.unlink()
    failed = subprocess.run([sys.executable, "-c", code, str(dst), "ignore"], capture_output=True, text=True)
    assert failed.returncode == 1 and "File too large" in failed.stderr
    assert dst.read_bytes() == b"old model" * 1000 and not list(tmp_path.glob(".model.pt.*.tmp"))


def test_case_error_survives_pickling():
    """A ``CaseError`` sent between processes (a loader's worker, a data-parallel rank) keeps its case, file and
    message: ``args`` holds only the message, which its three-argument constructor does not take."""
    import pickle

    from crossmodal.errors import CaseError

    back = pickle.loads(pickle.dumps(CaseError("brain003", "/d/brain003.nii.gz", "is empty")))
    assert type(back) is CaseError and (back.case_id, back.path, back.problem) == (
        "brain003", "/d/brain003.nii.gz", "is empty")
    assert str(back) == "case 'brain003': file /d/brain003.nii.gz: is empty"



def test_a_seg_nrrd_with_overlapping_segments_on_layers_is_one_label_map_the_smallest_on_top(tmp_path: Path):
    """3D Slicer saves overlapping segments (a lesion drawn inside its organ, "allow overlap") on several layers,
    (L, I, J, K): the datastore reads them as one label map of the classes, each shared voxel the smallest segment's
    (the lesion stays lesion), on the file's grid; marked background on the organ's layer keeps its value. It was a
    422 (`its 3 segments overlap (they lie on 2 layers); save them without overlap`). A layer no voxels hold is an
    error saying so, as is a value no segment of its layer names."""
    import nrrd
    import slicerio
    from crossmodal.config import load_config
    from crossmodal.io import CaseError
    from crossmodal.serving.datastore import slicer_label

    cfg = load_config("phantom")
    voxels = np.zeros((2, 12, 10, 8), np.uint8)
    voxels[0, 2:10, 2:8, 1:7] = 1  # organ: layer 0, value 1
    voxels[1, 4:7, 3:6, 3:5] = 1  # lesion inside it: layer 1, value 1
    voxels[0, 0:2, 0:2, 0] = 2  # marked background: layer 0, value 2
    ijk_to_lps = np.array([[-2.0, 0, 0, 10], [0, -2.0, 0, 20], [0, 0, 3.0, -5], [0, 0, 0, 1]])
    segments = [{"id": "Segment_1", "name": "Organ", "labelValue": 1, "layer": 0},
                {"id": "Segment_2", "name": "lesion", "labelValue": 1, "layer": 1},
                {"id": "Segment_3", "name": "marked background", "labelValue": 2, "layer": 0}]
    slicerio.write_segmentation(str(tmp_path / "overlap.seg.nrrd"), {
        "voxels": voxels, "ijkToLPS": ijk_to_lps, "containedRepresentationNames": ["Binary labelmap"],
        "segments": segments})
    flat = slicer_label(str(tmp_path / "overlap.seg.nrrd"), None, "phantom001", cfg.labels)
    want = np.zeros((12, 10, 8), np.uint8)
    want[2:10, 2:8, 1:7], want[4:7, 3:6, 3:5], want[0:2, 0:2, 0] = 1, 2, 255
    layered = load_volume(tmp_path / "overlap.seg.nrrd")  # a channel per layer; MONAI's reader could not read it
    assert layered.shape == (2, 12, 10, 8) and np.array_equal(layered.numpy(), voxels)
    np.testing.assert_allclose(layered.affine.numpy(), np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_lps)
    back = load_volume(flat)
    np.testing.assert_array_equal(back[0].numpy(), want)
    np.testing.assert_allclose(back.affine.numpy(), np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_lps)
    Path(flat).unlink()

    data, header = nrrd.read(str(tmp_path / "overlap.seg.nrrd"))
    data[1, 0, 0, 0] = 7  # a value no segment of layer 1 names
    nrrd.write(str(tmp_path / "value7.seg.nrrd"), data, header)
    with pytest.raises(CaseError, match=r"^case 'phantom001': file .*value7\.seg\.nrrd: values \[7\] on layer 1 "
                                        r"are none of its segments'; save it again from 3D Slicer$"):
        slicer_label(str(tmp_path / "value7.seg.nrrd"), None, "phantom001", cfg.labels)
    data[1, 0, 0, 0] = 0
    header["Segment1_Layer"] = "2"
    nrrd.write(str(tmp_path / "layer2.seg.nrrd"), data, header)
    with pytest.raises(CaseError, match=r"^case 'phantom001': file .*layer2\.seg\.nrrd: its segments lie on layers "
                                        r"\[2\], but it holds 2; save it again from 3D Slicer$"):
        slicer_label(str(tmp_path / "layer2.seg.nrrd"), None, "phantom001", cfg.labels)


def test_a_seg_nrrd_names_its_segments_as_3d_slicer_reads_them(tmp_path: Path):
    """A ``.seg.nrrd`` written with the classes carries Slicer's segment fields (read here by slicerio, Slicer's own
    reader outside Slicer): one segment per class by name, value and colour on one layer; the values and the grid
    are those written, and the datastore's reading of such a file maps each segment to its class. Without them it
    is a plain NRRD label map, as before."""
    import nrrd
    import slicerio
    from crossmodal.config import load_config
    from crossmodal.io import load_volume, save_volume
    from crossmodal.labels import seg_nrrd_values

    cfg = load_config("phantom")
    label = np.zeros((6, 5, 4), np.uint8)
    label[1:3], label[3] = 1, 3
    affine = np.diag([2.0, 1.5, 3.0, 1.0])
    affine[:3, 3] = [10.0, -5.0, 7.0]
    save_volume(tmp_path / "named.seg.nrrd", label, affine, segments=cfg.labels.foreground)
    seg = slicerio.read_segmentation(str(tmp_path / "named.seg.nrrd"))
    assert [(s["name"], s["labelValue"], s["layer"]) for s in seg["segments"]] == \
        [("organ", 1, 0), ("lesion", 2, 0), ("vessel", 3, 0)]
    assert len({tuple(s["color"]) for s in seg["segments"]}) == 3 and np.array_equal(seg["voxels"], label)
    back = load_volume(tmp_path / "named.seg.nrrd")
    assert np.array_equal(back[0].numpy(), label) and np.allclose(back.affine.numpy(), affine)
    _, header = nrrd.read(str(tmp_path / "named.seg.nrrd"))
    assert seg_nrrd_values(header, cfg.labels) == {0: 0, 1: 1, 2: 2, 3: 3}
    save_volume(tmp_path / "plain.seg.nrrd", label, affine)
    _, header = nrrd.read(str(tmp_path / "plain.seg.nrrd"))
    assert not any(k.startswith("Segment") for k in header) and seg_nrrd_values(header, cfg.labels) is None


def test_a_label_on_the_images_lattice_with_another_extent_reads_onto_its_grid(tmp_path: Path):
    """A studies folder's label saved by 3D Slicer cropped to its segments (same voxels, smaller extent) was refused
    ("label grid ... differs from the image grid"); it reads onto the image's grid, exactly. Half a voxel off is
    still refused, naming both grids."""
    aff = grid_affine((2.0, 2.0, 3.0), (16, 16, 12))
    from monai.data import MetaTensor

    ref = MetaTensor(torch.zeros(1, 16, 16, 12), affine=torch.as_tensor(aff))
    full = np.zeros((16, 16, 12), np.uint8)
    full[4:9, 6:10, 3:7] = 2
    full[5, 7, 4] = 1
    crop_aff = aff.copy()
    crop_aff[:3, 3] = aff[:3, :3] @ np.array([4, 6, 3]) + aff[:3, 3]
    save_volume(tmp_path / "crop.nii.gz", full[4:9, 6:10, 3:7], crop_aff)
    np.testing.assert_array_equal(read_label(tmp_path / "crop.nii.gz", ref, "c1"), full)
    crop_aff[:3, 3] += aff[:3, 0] / 2  # half a voxel along the first axis
    save_volume(tmp_path / "off.nii.gz", full[4:9, 6:10, 3:7], crop_aff)
    with pytest.raises(CaseError, match=r"label grid \(5, 4, 4\) / affine .* differs from the image grid \(16, 16, 12"):
        read_label(tmp_path / "off.nii.gz", ref, "c1")


def test_a_folder_a_killed_process_left_is_removed_before_its_parent_reaps_it(tmp_path: Path):
    """MONAI Label's Stop Training SIGKILLs the training process, which stays a zombie until its parent reaps it (in a
    container whose init reaps nothing: never); the folder it left counted as a running process's and stayed."""
    import socket
    import time

    import psutil
    from crossmodal.io import staging_folder

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        left = tmp_path / f"crossmodal-before-run-{socket.gethostname()}-{child.pid}-abc"
        left.mkdir()
        (left / "0").write_bytes(b"a model's copy")
        staging_folder(tmp_path, "crossmodal-before-run-").rmdir()
        assert left.is_dir()  # running: kept
        child.kill()
        deadline = time.monotonic() + 10
        while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.05)
        assert psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE  # killed, not reaped
        mine = staging_folder(tmp_path, "crossmodal-before-run-")
        assert not left.exists() and sorted(tmp_path.iterdir()) == [mine]
    finally:
        child.kill()
        child.wait()
