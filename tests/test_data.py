"""Data sets: phantom, real SPM12 brain cases, the sparse-annotation simulator, nnU-Net conversion, the CLI."""

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PRETRAINED_PHANTOM, make_phantom_studies, snapshot
from crossmodal.config import load_config
from crossmodal.data.brain import SPM_SHA256, extract_templates, make_brain_case
from crossmodal.data.brain import VARIANTS as BRAIN_VARIANTS
from crossmodal.data.nnunet import export_nnunet, import_nnunet
from crossmodal.data.phantom import VARIANTS, make_phantom
from crossmodal.data.sparse import annotated_fraction, painted_slices, scribbles
from crossmodal.io import CaseError, find_case, load_volume, save_volume
from crossmodal.labels import SPARSE, classify
from crossmodal.serving.offline import dice_per_class, held_out_cases
from crossmodal.transforms import load_case

CLI = [sys.executable, "-m", "crossmodal.cli"]


def test_phantom_has_modality_specific_contrast_and_other_grids(phantom_cfg):
    case = make_phantom(phantom_cfg, np.random.default_rng(3), size=48)
    lab = case.label.array
    assert set(np.unique(lab)) == {0, 1, 2, 3}
    ct = case.images["ct"].array
    # lesion nearly invisible in CT (10 HU against 12 HU noise), vessel obvious
    assert abs(ct[lab == 2].mean() - ct[lab == 1].mean()) < 20
    assert ct[lab == 3].mean() - ct[lab == 1].mean() > 100
    grids = {n: (v.array.shape, tuple(np.round(np.diag(v.affine)[:3], 2))) for n, v in case.images.items()}
    assert len(set(grids.values())) == 3


def test_phantom_variants_change_one_modality_contrast_and_nothing_else(phantom_cfg):
    cases = {v: make_phantom(phantom_cfg, np.random.default_rng(5), size=32, variant=v) for v in VARIANTS}
    typical = cases["typical"]
    for v, case in cases.items():  # the same draws: anatomy, grids and noise
        assert case.variant == v
        np.testing.assert_array_equal(case.label.array, typical.label.array)
        np.testing.assert_array_equal(case.images["ct"].array, typical.images["ct"].array)
    hot, cold = typical.images["pet"].array, cases["cold_lesion"].images["pet"].array
    gone = hot - cold  # the (blurred) lesion only: organ uptake there instead of 9x the body's, never more
    assert gone.min() == 0.0 and gone.max() > 3.0 and 0 < (gone > 0.5).mean() < 0.02
    np.testing.assert_array_equal(cases["cold_lesion"].images["mr"].array, typical.images["mr"].array)
    other = cases["other_mr_weighting"]
    np.testing.assert_array_equal(other.images["pet"].array, hot)
    d = other.images["mr"].array - typical.images["mr"].array  # body +120, organ -220 (times the bias field)
    assert d.max() > 100 and d.min() < -150
    with pytest.raises(ValueError, match="unknown phantom variant 'hot'.*cold_lesion"):
        make_phantom(phantom_cfg, np.random.default_rng(5), size=32, variant="hot")


@pytest.mark.parametrize("mm", [2.0, 8.0])
def test_misregistration_shifts_secondary_content_and_registration_undoes_it(tmp_path: Path, phantom_cfg,
                                                                             mm: float):
    raw = load_config("phantom", overrides={"data": {"register": "none"}})  # the headers' geometry, trusted

    def lesion_contrast(root: Path, cfg) -> float:
        case = find_case(root / "phantom000.nii.gz", cfg.modality_names)
        image, _ = load_case(case, cfg)
        truth = load_volume(root / "truth" / "phantom000.nii.gz")[0].numpy()
        return float(image[1].numpy()[truth == 2].mean())  # PET inside the true lesion

    a = make_phantom_studies(tmp_path / "a", phantom_cfg, cases=1, dense=0, sparse=0)
    b = make_phantom_studies(tmp_path / "b", phantom_cfg, cases=1, dense=0, sparse=0, misregistration_mm=mm)
    aligned, shifted = lesion_contrast(a, raw), lesion_contrast(b, raw)
    assert shifted < aligned - (0.1 if mm == 2.0 else 1.0)
    # co-registered (the presets' default), most of the lost contrast comes back
    assert lesion_contrast(b, phantom_cfg) > aligned - 0.3 * (aligned - shifted)


def test_sparse_simulator_draws_truthful_scribbles_and_slices(phantom_cfg):
    dense = make_phantom(phantom_cfg, np.random.default_rng(5), size=48).label.array
    cfg = phantom_cfg.labels
    s = scribbles(dense, cfg, np.random.default_rng(0))
    drawn = s != 0
    assert classify(s, cfg) == SPARSE
    assert 0.005 < annotated_fraction(s) < 0.15
    # every stroke tells the truth: class strokes on their class, marked background on background
    fg = drawn & (s != cfg.marked_background)
    assert np.array_equal(s[fg], dense[fg])
    assert (dense[s == cfg.marked_background] == 0).all()
    assert set(np.unique(s[fg])) == {1, 2, 3}  # every structure receives scribbles
    sl = painted_slices(dense, cfg, axis=2, step=4)
    annotated_z = np.where((sl != 0).any(axis=(0, 1)))[0]
    assert annotated_z.tolist() == list(range(0, 48, 4))
    assert annotated_fraction(sl) == pytest.approx(12 / 48)
    assert np.array_equal(np.where(sl[..., 4] == cfg.marked_background, 0, sl[..., 4]), dense[..., 4])


def test_spm_checksum_is_enforced(tmp_path: Path):
    bogus = tmp_path / "fake.whl"
    bogus.write_bytes(b"zip?")
    with pytest.raises(ValueError, match=f"differs from the expected {SPM_SHA256}"):
        extract_templates(bogus, tmp_path / "out")


def test_brain_cases_are_real_distinct_and_physically_plausible(templates, brain_cfg):
    a = make_brain_case(brain_cfg, templates, np.random.default_rng([1, 0]))
    b = make_brain_case(brain_cfg, templates, np.random.default_rng([1, 1]))
    lab = a.label.array
    counts = {v: int((lab == v).sum()) for v in (1, 2, 3)}
    assert min(counts.values()) > 5000  # GM, WM, CSF all present
    t1 = a.images["t1"].array
    assert t1[lab == 2].mean() > t1[lab == 1].mean() > t1[lab == 3].mean()  # T1: WM > GM > CSF
    assert a.label.array.shape != b.label.array.shape or not np.array_equal(a.label.array, b.label.array)
    assert a.images["t2"].array.shape != t1.shape  # T2 on its own grid
    # on the primary grid, T2 is brightest in CSF (T2: CSF > GM > WM)
    d, _ = load_case_from_synthetic(a, brain_cfg)
    t2 = d[1].numpy()
    assert t2[lab == 3].mean() > t2[lab == 1].mean() > t2[lab == 2].mean()


def test_brain_t2_flair_variant_darkens_csf_on_the_t2_only(templates, brain_cfg):
    typical = make_brain_case(brain_cfg, templates, np.random.default_rng([1, 0]))
    flair = make_brain_case(brain_cfg, templates, np.random.default_rng([1, 0]), variant="t2_flair")
    assert flair.variant == "t2_flair" and BRAIN_VARIANTS == ("typical", "t2_flair")
    np.testing.assert_array_equal(flair.label.array, typical.label.array)
    for name in ("t1", "pd"):
        np.testing.assert_array_equal(flair.images[name].array, typical.images[name].array)
    lab = typical.label.array
    t2 = load_case_from_synthetic(flair, brain_cfg)[0][1].numpy()
    assert t2[lab == 1].mean() > t2[lab == 2].mean() > t2[lab == 3].mean()  # FLAIR: GM > WM > CSF, fluid dark
    with pytest.raises(ValueError, match="unknown brain variant 'flair'"):
        make_brain_case(brain_cfg, templates, np.random.default_rng(0), variant="flair")


def load_case_from_synthetic(case, cfg, tmp=None):
    import tempfile

    from crossmodal.data.studies import write_case

    root = Path(tempfile.mkdtemp())
    write_case(root, "c0", case, cfg)
    return load_case(find_case(root / "c0.nii.gz", cfg.modality_names), cfg)


def test_nnunet_export_import_roundtrip(tmp_path: Path, phantom_cfg, capsys):
    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=4, dense=1, sparse=1)
    out = tmp_path / "Dataset001_Phantom"
    from crossmodal.cli import main  # in-process: a subprocess would spend ~8 s importing MONAI for each command

    assert main(["data", "export-nnunet", "--studies", str(studies), "--out", str(out), "--config", "phantom",
                 "--test", "phantom003"]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert json.loads(capsys.readouterr().out)["labels"]["ignore"] == 4 == meta["labels"]["ignore"]
    assert meta["channel_names"] == {"0": "ct", "1": "pet", "2": "mr"} and meta["numTraining"] == 3
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["phantom000.nii.gz", "phantom001.nii.gz"]
    assert (out / "imagesTr" / "phantom002_0002.nii.gz").is_file()  # unlabeled training case
    assert sorted(p.name for p in (out / "labelsTs").iterdir()) == ["phantom003.nii.gz"]
    ch = [load_volume(out / "imagesTr" / f"phantom000_{k:04d}.nii.gz") for k in range(3)]
    assert all(tuple(c.shape) == (1, 48, 48, 48) for c in ch)  # all channels on the primary grid
    sparse_tr = load_volume(out / "labelsTr" / "phantom001.nii.gz")[0].numpy()
    assert (sparse_tr == 4).mean() > 0.8  # mostly ignore
    # again into that dataset: refused before writing (a label removed since would have stayed in labelsTr)
    before = snapshot(out)
    assert main(["data", "export-nnunet", "--studies", str(studies), "--out", str(out), "--config", "phantom"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"crossmodal: error: --out {out}: not empty (holds dataset.json, imagesTr, imagesTs ...); an export writes a "
        "whole nnU-Net dataset: give a new folder, or remove this one first")
    assert snapshot(out) == before

    # a --test case the folder does not hold: refused, nothing written (it trained as imagesTr, no test case)
    assert main(["data", "export-nnunet", "--studies", str(studies), "--out", str(tmp_path / "t"), "--config",
                 "phantom", "--test", "phantom03"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"crossmodal: error: --test phantom03: not a case of {studies} (did you mean phantom003?); its cases: "
        "phantom000, phantom001, phantom002, phantom003")
    assert not (tmp_path / "t").exists()
    back = tmp_path / "back"
    assert main(["data", "import-nnunet", "--dataset", str(out), "--out", str(back), "--config", "phantom"]) == 0
    orig = load_volume(studies / "labels" / "final" / "phantom001.nii.gz")[0].numpy()
    again = load_volume(back / "labels" / "final" / "phantom001.nii.gz")[0].numpy()
    assert np.array_equal(orig, again)  # sparse label survives the round trip exactly
    assert np.array_equal(load_volume(back / "truth" / "phantom003.nii.gz")[0].numpy(),
                          load_volume(studies / "truth" / "phantom003.nii.gz")[0].numpy())
    assert (back / "modalities" / "phantom002" / "mr.nii.gz").is_file()
    assert not (back / "labels" / "final" / "phantom002.nii.gz").exists()

    for text, problem in (("{bad json", "not valid JSON (Expecting property name"),
                          ('{"labels": {}}', "key 'channel_names' is missing"),
                          ('{"labels": [], "channel_names": {"0": "ct"}}', "labels must be a non-empty object"),
                          ('{"labels": {"background": 0}, "channel_names": {"ct": "0"}}',
                           "channel_names keys must be channel numbers (\"0\", \"1\", ...), got ['ct']")):
        (out / "dataset.json").write_text(text)
        capsys.readouterr()
        assert main(["data", "import-nnunet", "--dataset", str(out), "--out", str(tmp_path / "x"), "--config",
                     "phantom"]) == 2
        assert capsys.readouterr().err.startswith(f"crossmodal: error: {out / 'dataset.json'}: {problem}")


def test_an_export_writes_a_label_on_its_image_grid_or_names_the_case_whose_label_is_not(tmp_path: Path, phantom_cfg,
                                                                                          capsys):
    """A label on another grid was written with its image's affine (a half-resolution label: a 24^3 label map
    claiming 2 mm voxels, misplaced without a word); now refused naming the case, nothing written. A label cropped
    to its segments on the image's lattice (3D Slicer) goes out on the image's grid."""
    from crossmodal.cli import main

    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=3, dense=2, sparse=0, seed=5)
    path = studies / "labels" / "final" / "phantom000.nii.gz"
    full = load_volume(path)
    arr, aff = full[0].numpy(), full.affine.double().numpy()
    found = np.argwhere(arr)
    lo, hi = found.min(0), found.max(0) + 1
    cropped = aff.copy()
    cropped[:3, 3] = aff[:3, :3] @ lo + aff[:3, 3]
    save_volume(path, arr[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], cropped)
    half = studies / "labels" / "final" / "phantom001.nii.gz"
    coarse = load_volume(half)
    coarse_aff = coarse.affine.double().numpy()
    coarse_aff[:3, :3] *= 2
    save_volume(half, coarse[0].numpy()[::2, ::2, ::2], coarse_aff)
    out = tmp_path / "Dataset003_Ph"
    assert main(["data", "export-nnunet", "--studies", str(studies), "--out", str(out), "--config", "phantom"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"crossmodal: error: case 'phantom001': file {half}: label grid (24, 24, 24) / affine ")
    assert not out.exists()
    half.unlink()
    assert main(["data", "export-nnunet", "--studies", str(studies), "--out", str(out), "--config", "phantom"]) == 0
    exported = load_volume(out / "labelsTr" / "phantom000.nii.gz")
    assert np.array_equal(exported[0].numpy(), arr) and np.allclose(exported.affine.double().numpy(), aff)


def test_an_import_or_export_killed_mid_way_leaves_no_hidden_copy_past_the_next_run(tmp_path: Path, phantom_cfg,
                                                                                    capsys):
    """A kill (SIGKILL, a power cut) during `data import-nnunet` / `export-nnunet` left its hidden temp folder beside
    the output for good: a whole dataset's copy each time. The next run into that folder removes those of a process
    no longer running, and keeps a running one's."""
    import socket

    from crossmodal.cli import main

    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=2, dense=1, sparse=0, seed=71)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # the pid of a process that has ended
    host = socket.gethostname()
    killed = [tmp_path / f".Dataset011_Ph.partial-{host}-{gone}-x1", tmp_path / f".back.import-{host}-{gone}-x2"]
    running = tmp_path / f".back.import-{host}-{os.getpid()}-x3"  # this test's process: running
    other = tmp_path / f".back.import-elsewhere-{gone}-x4"  # another host's, on a shared folder
    for folder in (*killed, running, other):
        (folder / "imagesTr").mkdir(parents=True)
        (folder / "imagesTr" / "case_0000.nii.gz").write_bytes(b"half a dataset")
    assert main(["data", "export-nnunet", "--studies", str(studies), "--out", str(tmp_path / "Dataset011_Ph"),
                 "--config", "phantom"]) == 0
    assert main(["data", "import-nnunet", "--dataset", str(tmp_path / "Dataset011_Ph"), "--out",
                 str(tmp_path / "back"), "--config", "phantom"]) == 0
    capsys.readouterr()
    assert not any(f.exists() for f in killed) and running.is_dir() and other.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted([running.name, other.name])


def test_nnunet_dataset_in_its_file_ending(tmp_path: Path, phantom_cfg):
    """dataset.json's ``file_ending`` decides which files are cases (only .nii.gz were: an NRRD dataset imported
    no case, silently); an ending our readers cannot take, a channel beyond channel_names and no case at all are
    errors that name the file."""
    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=3, dense=1, sparse=1)
    nii = tmp_path / "nii"
    export_nnunet(studies, nii, phantom_cfg, test_cases=("phantom002",))
    ds = tmp_path / "nrrd"
    for f in nii.rglob("*.nii.gz"):
        vol = load_volume(f)
        save_volume(ds / f.relative_to(nii).with_name(f.name.replace(".nii.gz", ".nrrd")), vol[0].numpy(),
                    vol.affine.numpy())
    meta = {**json.loads((nii / "dataset.json").read_text()), "file_ending": ".nrrd"}
    (ds / "dataset.json").write_text(json.dumps(meta))
    a = import_nnunet(nii, tmp_path / "a", phantom_cfg)
    b = import_nnunet(ds, tmp_path / "b", phantom_cfg)
    assert a == b == [{"case": "phantom000", "split": "train", "label": "dense"},
                      {"case": "phantom001", "split": "train", "label": "sparse"},
                      {"case": "phantom002", "split": "test", "label": None}]
    for rel in ("labels/final/phantom001.nii.gz", "truth/phantom002.nii.gz", "modalities/phantom000/pet.nii.gz"):
        np.testing.assert_array_equal(load_volume(tmp_path / "a" / rel).numpy(),
                                      load_volume(tmp_path / "b" / rel).numpy())

    (ds / "dataset.json").write_text(json.dumps({**meta, "file_ending": ".png"}))
    with pytest.raises(ValueError, match=r"file_ending '.png' is not one of \['.nii.gz', '.nii', '.nrrd', '.mha'\]"):
        import_nnunet(ds, tmp_path / "c", phantom_cfg)
    (ds / "dataset.json").write_text(json.dumps(meta))
    extra = ds / "imagesTr" / "phantom000_0003.nrrd"
    extra.write_bytes((ds / "imagesTr" / "phantom000_0002.nrrd").read_bytes())
    with pytest.raises(CaseError, match=r"case 'phantom000': .*phantom000_0003.nrrd: channel 0003 is not one of "
                                        r"dataset.json's 3 channel_names \['ct', 'pet', 'mr'\]"):
        import_nnunet(ds, tmp_path / "c", phantom_cfg)
    for f in [*(ds / "imagesTr").iterdir(), *(ds / "imagesTs").iterdir()]:
        f.unlink()
    with pytest.raises(ValueError, match=r"no case in imagesTr or imagesTs \(files <case>_<XXXX>.nrrd"):
        import_nnunet(ds, tmp_path / "c", phantom_cfg)
    assert not (tmp_path / "c").exists()


def test_decathlon_and_nnunet_v1_datasets_import_as_their_nnunet_v2_twin(tmp_path: Path, phantom_cfg, capsys):
    """A Medical Segmentation Decathlon dataset (every modality a channel of one 4D ``imagesTr/<case>.nii.gz``,
    dataset.json's ``modality`` and ``labels`` {"1": "organ"}) and an nnU-Net v1 one (channel files, that
    dataset.json) were refused with "key 'channel_names' is missing"; both import as the v2 dataset they hold, each
    channel to the modality it names, in any order (a macOS ``._`` file of the Decathlon's archives skipped)."""
    from crossmodal.cli import main
    from crossmodal.data.studies import guess_preset

    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=3, dense=1, sparse=1)
    v2 = tmp_path / "v2"
    export_nnunet(studies, v2, phantom_cfg, test_cases=("phantom002",))
    order = ["mr", "ct", "pet"]  # the Decathlon's channel order, not the preset's
    meta = {"name": "Phantom", "modality": {str(k): n.upper() for k, n in enumerate(order)},
            "labels": {"0": "background", "1": "organ", "2": "lesion", "3": "vessel", "4": "ignore"},
            "training": [{"image": f"./imagesTr/phantom00{i}.nii.gz", "label": f"./labelsTr/phantom00{i}.nii.gz"}
                         for i in range(2)], "test": ["./imagesTs/phantom002.nii.gz"]}
    msd, v1 = tmp_path / "Task01_Phantom", tmp_path / "Task501_Phantom"
    for src in sorted(v2.rglob("*_0000.nii.gz")):
        cid, split = src.name[: -len("_0000.nii.gz")], src.parent.name
        chans = {n: load_volume(src.parent / f"{cid}_{k:04d}.nii.gz") for k, n in enumerate(phantom_cfg.modality_names)}
        affine = chans["ct"].affine.numpy()
        save_volume(msd / split / f"{cid}.nii.gz", np.stack([chans[n][0].numpy() for n in order], -1), affine)
        for k, n in enumerate(order):
            save_volume(v1 / split / f"{cid}_{k:04d}.nii.gz", chans[n][0].numpy(), affine)
    for folder in (msd, v1):
        for label in [*v2.glob("labelsT*/*.nii.gz")]:
            (folder / label.parent.name).mkdir(exist_ok=True)
            shutil.copy(label, folder / label.parent.name / label.name)
        (folder / "dataset.json").write_text(json.dumps(meta))
    (msd / "imagesTr" / "._phantom000.nii.gz").write_bytes(b"\x00\x05\x16\x07 Mac OS X")  # AppleDouble
    assert guess_preset(msd, "brain") == ("phantom", (
        f"--config not given: preset 'phantom' (ct + pet, mr), the one whose modalities are {msd / 'dataset.json'}'s "
        "modality (the default, 'brain', takes t1 + t2, pd)"))
    records = import_nnunet(v2, tmp_path / "a", phantom_cfg)
    for name, folder in (("b", msd), ("c", v1)):
        assert main(["data", "import-nnunet", "--dataset", str(folder), "--out", str(tmp_path / name)]) == 0
        said = capsys.readouterr()
        assert [json.loads(line) for line in said.out.splitlines()] == records
        assert f"--config not given: preset 'phantom' (ct + pet, mr), the one whose modalities are {folder}" in said.err
        assert records == [{"case": "phantom000", "split": "train", "label": "dense"},
                           {"case": "phantom001", "split": "train", "label": "sparse"},
                           {"case": "phantom002", "split": "test", "label": None}]
        files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.nii.gz"))
        assert files == sorted(p.relative_to(tmp_path / name) for p in (tmp_path / name).rglob("*.nii.gz"))
        assert len(files) == 3 + 3 * 2 + 2 + 1  # primaries, sidecars, labels, truth
        for rel in files:
            a, b = load_volume(tmp_path / "a" / rel), load_volume(tmp_path / name / rel)
            assert torch.equal(a, b) and torch.allclose(a.affine, b.affine), rel
    save_volume(msd / "imagesTr" / "phantom000.nii.gz", np.zeros((8, 8, 8, 2), np.float32), np.eye(4))
    with pytest.raises(CaseError) as e:
        import_nnunet(msd, tmp_path / "d", phantom_cfg)
    assert str(e.value) == (f"case 'phantom000': file {msd / 'imagesTr' / 'phantom000.nii.gz'}: holds 2 volume(s) "
                            "where dataset.json's modality names 3 channels ['mr', 'ct', 'pet']")
    assert not (tmp_path / "d").exists()
    (msd / "dataset.json").write_text(json.dumps({**meta, "labels": {"background": 0}}))
    with pytest.raises(ValueError) as e:
        import_nnunet(msd, tmp_path / "d", phantom_cfg)
    assert str(e.value) == (f"{msd / 'dataset.json'}: a Decathlon / nnU-Net v1 dataset.json (it has 'modality'): "
                            'labels must map label values to class names ({"0": "background", "1": ...}), got '
                            '{"background": 0}')


def test_cli_sparsify_reports_fraction_and_errors_name_the_file(tmp_path: Path, phantom_cfg, capsys):
    from crossmodal.cli import main

    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=1, dense=0, sparse=0)
    assert main(["data", "sparsify", "--label", str(studies / "truth" / "phantom000.nii.gz"), "--out",
                 str(tmp_path / "sl.nii.gz"), "--mode", "slices", "--step", "8", "--config", "phantom"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["annotated_fraction"] == pytest.approx(6 / 48, abs=1e-4)
    assert main(["data", "sparsify", "--label", str(tmp_path / "none.nii.gz"), "--out",
                 str(tmp_path / "x.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert "none.nii.gz" in err and "file does not exist" in err
    # a sparse label (its strokes and marked background were thinned again, as a class) or values the preset has no
    # class for (left out of the strokes): refused, naming them; nothing written
    lab = np.rint(load_volume(studies / "truth" / "phantom000.nii.gz")[0].numpy()).astype(np.uint8)
    for name, arr, told in (("sparse", np.where(lab == 0, 255, lab), "holds marked_background (255): a sparse label "
                                                                     "already; sparsify takes a dense label map"),
                            ("seven", np.where(lab == 3, 7, lab), "values [7] are not classes of the config "
                                                                  "'phantom' ({'organ': 1, 'lesion': 2, 'vessel': 3}); "
                                                                  "give --config with the preset whose labels these "
                                                                  "are")):
        save_volume(tmp_path / f"{name}.nii.gz", arr, np.eye(4))
        assert main(["data", "sparsify", "--label", str(tmp_path / f"{name}.nii.gz"), "--out",
                     str(tmp_path / "y.nii.gz"), "--config", "phantom"]) == 2
        assert capsys.readouterr().err.strip() == (
            f"crossmodal: error: case '{name}': file {tmp_path / f'{name}.nii.gz'}: {told}")
    assert not (tmp_path / "y.nii.gz").exists()



def test_cli_help_and_argument_errors_load_neither_torch_nor_monai():
    """``crossmodal --help``, a subcommand's help and a mistyped option answer without importing torch or MONAI
    (which took the help 9 s); what they print is the parser's."""
    probe = ("import contextlib, io, sys\n"
             "from crossmodal.cli import main\n"
             "for argv in (['--help'], ['train', '--help'], ['data', 'from-dicom', '--dicom'], ['--version']):\n"
             "    out = io.StringIO()\n"
             "    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):\n"
             "        try:\n"
             "            main(argv)\n"
             "        except SystemExit as e:\n"
             "            print('exit', e.code)\n"
             "    print(repr(out.getvalue().splitlines()[:2] + out.getvalue().splitlines()[-2:]))\n"
             "print(sorted(m for m in ('torch', 'monai', 'monailabel', 'SimpleITK') if m in sys.modules))\n")
    lines = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                           env={**os.environ, "COLUMNS": "80"}).stdout.splitlines()  # argparse wraps at it
    assert lines[-1] == "[]", lines
    top, train, typo, version = (eval(x) for x in lines[:4])  # noqa: S307 - reprs of lists of str, printed above
    assert " ".join(" ".join(top[:2]).split()) == ("usage: crossmodal [-h] [--version] "
                                                   "{data,train,models,simulate,propagate,evaluate,predict} ...")
    assert top[-1] == "exit 0"
    # --version: what a bug report needs, the stack's versions as installed
    from importlib.metadata import version as installed

    assert version == [f"crossmodal 0.1.0 (MONAI {installed('monai')}, MONAI Label {installed('monailabel')}, torch "
                       f"{installed('torch')}; Python {sys.version.split()[0]})", "exit 0"] * 2  # first 2, last 2
    assert train[0].startswith("usage: crossmodal train [-h] --studies STUDIES") and train[-1] == "exit 0"
    assert typo == ["usage: crossmodal data from-dicom [-h] --dicom DICOM --out OUT",
                    "                                  [--config CONFIG] [--skip-existing]",
                    "crossmodal data from-dicom: error: argument --dicom: expected one argument", "exit 2"]

def test_phantom_cli_generates_in_seconds(tmp_path: Path):
    r = subprocess.run([*CLI, "data", "phantom", "--out", str(tmp_path / "p"), "--cases", "2", "--dense", "1",
                        "--sparse", "1", "--misregistration-mm", "4"], capture_output=True, text=True, check=True)
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["label"] for x in recs] == ["dense", "sparse"] and 0 < recs[1]["annotated_fraction"] < 0.2
    assert [x["variant"] for x in recs] == ["typical", "typical"]
    cfg = load_config("phantom")
    for cid in ("phantom000", "phantom001"):
        assert all(find_case(tmp_path / "p" / f"{cid}.nii.gz", cfg.modality_names).modalities.values())


def test_data_commands_do_not_write_over_cases_a_folder_holds(tmp_path: Path, capsys):
    """`data phantom` / `data brain` / `data import-nnunet` into a studies folder that holds the cases they would
    write: refused, nothing changed (they replaced the images and the labels, an annotator's too); cases of another
    prefix are added beside them."""
    from crossmodal.cli import main

    out = tmp_path / "p"
    assert main(["data", "phantom", "--out", str(out), "--cases", "2", "--size", "24", "--dense", "1"]) == 0
    save_volume(out / "labels" / "final" / "phantom001.nii.gz", np.ones((24, 24, 24), np.uint8),  # drawn
                load_volume(out / "phantom001.nii.gz").affine.numpy())  # on its image's grid (export checks it)
    before = snapshot(out)
    capsys.readouterr()
    assert main(["data", "phantom", "--out", str(out), "--cases", "3", "--size", "24"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"crossmodal: error: --out {out}: already holds phantom000, phantom001: writing would replace their images and "
        "labels (an annotator's too); give a new folder (or another --prefix), or remove it first")
    assert snapshot(out) == before
    assert main(["data", "phantom", "--out", str(out), "--cases", "1", "--size", "24", "--prefix", "extra"]) == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["extra000.nii.gz", "phantom000.nii.gz",
                                                            "phantom001.nii.gz"]
    assert {k: v for k, v in snapshot(out).items() if "extra000" not in k} == before
    ds = tmp_path / "Dataset003_P"
    assert main(["data", "export-nnunet", "--studies", str(out), "--out", str(ds), "--config", "phantom"]) == 0
    capsys.readouterr()
    assert main(["data", "import-nnunet", "--dataset", str(ds), "--out", str(out), "--config", "phantom"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"crossmodal: error: --out {out}: already holds extra000, phantom000, phantom001: writing would replace their "
        "images and labels (an annotator's too); give a new folder, or remove it first")
    # a case only half there (a killed generation's sidecar folder, a truth file kept for scoring) is held too
    (out / "modalities" / "more000").mkdir()
    save_volume(out / "truth" / "late000.nii.gz", np.zeros((24, 24, 24), np.uint8), np.eye(4))
    for prefix in ("more", "late"):
        assert main(["data", "phantom", "--out", str(out), "--cases", "1", "--size", "24", "--prefix", prefix]) == 2
        assert f"already holds {prefix}000: writing would replace" in capsys.readouterr().err
        assert not (out / f"{prefix}000.nii.gz").exists()


def test_phantom_cli_cycles_variants_by_case_index_and_rejects_unknown_ones(tmp_path: Path, capsys):
    from crossmodal.cli import main

    assert main(["data", "phantom", "--out", str(tmp_path / "p"), "--cases", "3", "--size", "24", "--variants",
                 "cold_lesion,typical"]) == 0
    out = capsys.readouterr().out
    assert [json.loads(line)["variant"] for line in out.splitlines()] == ["cold_lesion", "typical", "cold_lesion"]
    with pytest.raises(SystemExit) as bad:
        main(["data", "phantom", "--out", str(tmp_path / "q"), "--cases", "1", "--variants", "typical,hot"])
    assert "--variants 'typical,hot': unknown ['hot']" in str(bad.value.code)
    assert "other_mr_weighting" in str(bad.value.code) and not (tmp_path / "q").exists()


def test_offline_commands_on_cases_without_a_modality(tmp_path: Path, phantom_cfg, capsys):
    """A held-out case whose PET file is gone: `evaluate` stops naming it and what to do; with `--missing-modality
    zero_fill` it is segmented as the same case with its PET left out (`--drop pet`), and `train` with the option
    trains and evaluates."""
    from conftest import PRETRAINED_PHANTOM
    from crossmodal.cli import main

    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=4, dense=1, sparse=1, seed=21)
    model = PRETRAINED_PHANTOM.with_name("phantom_crossmodal.pt")
    base = ["evaluate", "--studies", str(studies), "--config", "phantom", "--model", str(model)]
    assert main([*base, "--drop", "pet", "--out", str(tmp_path / "dropped.json")]) == 0
    (studies / "modalities" / "phantom003" / "pet.nii.gz").unlink()
    capsys.readouterr()
    assert main(base) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "crossmodal: error: case 'phantom003': modality 'pet' is missing: expected <studies>/modalities/phantom003/"
        "pet.nii.gz (or .nii/.nrrd/.mha); add it (a running server takes it as PUT /datastore/image?image=phantom003 "
        'with params {"modality": "pet"}), or use the case without it (missing_modality zero_fill)')
    assert main([*base, "--missing-modality", "zero_fill", "--out", str(tmp_path / "filled.json")]) == 0
    dropped, filled = (json.loads((tmp_path / f).read_text())["per_case"] for f in ("dropped.json", "filled.json"))
    assert [r["case"] for r in filled] == ["phantom002", "phantom003"]
    assert filled[1]["dice"] == dropped[1]["dice"] and filled[1]["dice_mean"] > 0.5
    (studies / "truth" / "phantom003.nii.gz").unlink()  # an unlabelled training case now (a test case is not trained)
    assert main(["train", "--studies", str(studies), "--config", "phantom", "--model-dir", str(tmp_path / "m"),
                 "--epochs", "1", "--network", "crossmodal", "--missing-modality", "zero_fill"]) == 0
    out = capsys.readouterr()
    assert "test cases: 1, mean Dice" in out.out
    mean = json.loads((tmp_path / "m" / "evaluation.json").read_text())["dice_mean"]
    assert [line.split()[:3] for line in out.err.splitlines() if line.startswith("mean ")][-1] == \
        ["mean", "1", f"{mean:.3f}"]  # the evaluation's table to read, after the evaluate commands' ones
    assert "crossmodal - 1 of 3 training cases lack a modality (phantom003: pet): each trains" in out.err


def test_train_leaves_the_cases_it_evaluates_out_of_training(tmp_path: Path, phantom_cfg, capsys, caplog):
    """`crossmodal train`'s held-out cases (truth, no final label: those its evaluation scores) take no part in
    training, not even as unlabelled cases, unless --train-on-test-images asks for it. Until 2026-12-07 they joined
    its unlabelled pool (consistency terms, atlas pseudo-labels): it scored cases whose images it had trained on."""
    from crossmodal.cli import main

    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=6, dense=1, sparse=1, seed=31)
    for case in ("phantom002", "phantom004"):  # no truth: unlabelled training cases; phantom003 and 005 are tests
        (studies / "truth" / f"{case}.nii.gz").unlink()
    base = ["train", "--studies", str(studies), "--config", "phantom", "--epochs", "1", "--network", "crossmodal"]
    for name, flags, pool in (("m", [], 2), ("t", ["--train-on-test-images"], 4)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="crossmodal"):
            assert main([*base, "--model-dir", str(tmp_path / name), *flags]) == 0
        out = capsys.readouterr().out
        assert f"0 - unlabeled: {pool} cases, batch" in caplog.text
        left = "unlabelled cases: 2 of 4; the 2 held-out test cases (phantom003, phantom005) left out of training"
        assert (left in caplog.text) == (not flags)
        assert [c["case"] for c in json.loads((tmp_path / name / "evaluation.json").read_text())["per_case"]] == \
            ["phantom003", "phantom005"]
        assert ("(their images trained as unlabelled cases: --train-on-test-images)" in out) == bool(flags)


def test_predict_writes_each_case_as_the_infer_task_segments_it(tmp_path: Path, phantom_cfg, capsys, monkeypatch):
    """`crossmodal predict`: one uint8 label map per case on its primary image's grid, scored by `evaluate` to the
    same Dice; volumes in predictions.json that the files hold; a case it cannot segment is named, exit 2, and the
    others are written; an unknown `--cases` id, or an `--out` where it would replace images or labels, stops it
    before anything is written; a killed run leaves a folder the next run writes over."""
    from conftest import PRETRAINED_PHANTOM
    from crossmodal.cli import main

    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=4, dense=1, sparse=1, seed=21)
    model = str(PRETRAINED_PHANTOM.with_name("phantom_crossmodal.pt"))
    base = ["predict", "--studies", str(studies), "--config", "phantom", "--model", model]
    out = tmp_path / "out"
    assert main([*base, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"4 cases segmented -> {out} ({out / 'predictions.json'}); most uncertain first: " in printed
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["segmented"] == 4 and summary["failed"] == [] and summary["network"] == "crossmodal"
    assert main(["evaluate", "--studies", str(studies), "--config", "phantom", "--model", model,
                 "--out", str(tmp_path / "e.json")]) == 0
    evaluation = json.loads((tmp_path / "e.json").read_text())
    scored = {r["case"]: r["dice"] for r in evaluation["per_case"]}
    assert sorted(scored) == ["phantom002", "phantom003"]  # the held-out ones
    table = capsys.readouterr().err.splitlines()  # the table to read, on stderr (stdout: JSON)
    assert table[-5].split() == ["class", "cases", "Dice", "mean", "+-", "sd", "worst", "(case)", "HD95", "mm"]
    for line, name in zip(table[-4:], ["organ", "lesion", "vessel", "mean"], strict=True):
        per_case = {c: d[name] for c, d in scored.items()} if name != "mean" else \
            {r["case"]: r["dice_mean"] for r in evaluation["per_case"]}
        worst = min(per_case, key=lambda c: per_case[c])
        mean = evaluation["dice_mean"] if name == "mean" else evaluation["dice_per_class"][name]
        hd95 = evaluation["hd95_mean"] if name == "mean" else evaluation["hd95_per_class"][name]
        assert line.split() == [name, "2", f"{mean:.3f}", "+-", f"{np.std(list(per_case.values()), ddof=1):.3f}",
                                f"{per_case[worst]:.3f}", f"({worst})", f"{hd95:.2f}"], line
    for record in summary["per_case"]:
        cid = record["case"]
        image, pred = load_volume(studies / f"{cid}.nii.gz", cid), load_volume(out / f"{cid}.nii.gz", cid)
        assert pred.shape[1:] == image.shape[1:] and np.allclose(pred.affine, image.affine, atol=1e-5)
        labels = pred[0].numpy()
        assert nib_dtype(out / f"{cid}.nii.gz") == np.uint8 and set(np.unique(labels)) == {0, 1, 2, 3}
        assert record["modalities_used"] == ["ct", "pet", "mr"] and set(record["registered_mm"]) == {"pet", "mr"}
        assert set(record["coverage"]) == {"pet", "mr"} and min(record["coverage"].values()) > 0.95
        assert record["voxel_mm"] == {"case": [2.0, 2.0, 2.0], "network": [2.0, 2.0, 2.0]}  # not resampled
        ml = abs(np.linalg.det(pred.affine[:3, :3].numpy())) / 1000
        assert record["volume_ml"] == pytest.approx({n: float((labels == i).sum() * ml) for i, n in
                                                     enumerate(["organ", "lesion", "vessel"], 1)}, abs=1e-3)
        assert f"{cid}: organ {record['volume_ml']['organ']:.1f} ml" in printed and 0 < record["uncertainty"] < 0.2
        if cid in scored:  # the written map is what evaluate scores
            truth = np.rint(load_volume(studies / "truth" / f"{cid}.nii.gz", cid)[0].numpy())
            assert dice_per_class(labels, truth, 4) == pytest.approx(list(scored[cid].values()), abs=1e-6)
            assert min(scored[cid].values()) > 0.5

    uncertainty = {r["case"]: r["uncertainty"] for r in summary["per_case"]}
    assert summary["review_order"] == sorted(uncertainty, key=lambda c: -uncertainty[c])
    assert main([*base, "--out", str(tmp_path / "nopet"), "--drop", "pet"]) == 0  # the lesion's modality gone
    without_pet = json.loads((tmp_path / "nopet" / "predictions.json").read_text())["per_case"]
    assert all(r["uncertainty"] > uncertainty[r["case"]] for r in without_pet), (without_pet, uncertainty)
    # evaluate --predictions: the maps written, scored alike (as another tool's would be), checked before scoring
    ev = ["evaluate", "--studies", str(studies), "--config", "phantom"]
    assert main([*ev, "--predictions", str(out), "--out", str(tmp_path / "p.json")]) == 0
    from_files = json.loads((tmp_path / "p.json").read_text())
    assert {r["case"]: r["dice"] for r in from_files["per_case"]} == scored
    assert from_files["model"] is None and from_files["predictions"] == str(out) and from_files["seconds_mean"] is None
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(out / "phantom002.nii.gz", other / "phantom002.nii.gz")
    capsys.readouterr()
    for problem, message in (
            (None, f"case 'phantom003': file {other}: no prediction of this held-out case (phantom003.nii.gz, .nii "
                   "or .nrrd; the folder has 1)"),
            (np.zeros((24, 24, 24), np.uint8), f"case 'phantom003': file {other / 'phantom003.nii.gz'}: the "
                                               "prediction's grid (24, 24, 24) (affine [[1.0, 0.0, 0.0, 0.0]"),
            (np.full((48, 48, 48), 7, np.uint8), f"case 'phantom003': file {other / 'phantom003.nii.gz'}: values "
                                                 "[7.0] are not class indices 0..3")):
        if problem is not None:
            affine = np.eye(4) if problem.shape[0] == 24 else load_volume(out / "phantom003.nii.gz").affine.numpy()
            save_volume(other / "phantom003.nii.gz", problem, affine)
        assert main([*ev, "--predictions", str(other)]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"crossmodal: error: {message}")
    truth = studies / "truth" / "phantom003.nii.gz"  # a sparse label as truth: was an IndexError traceback
    lab = np.rint(load_volume(truth)[0].numpy()).astype(np.uint8)
    lab[:, :, :3] = 255
    save_volume(truth, lab, load_volume(truth).affine.numpy())
    assert main([*ev, "--predictions", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"crossmodal: error: case 'phantom003': file {truth}: truth values [255.0] are not class indices 0..3 (255 "
        "marks background in a sparse label: truth must be a dense label); give the case a dense label map as its "
        "truth, or remove its truth file")
    save_volume(truth, lab[::2, ::2, ::2] % 4, np.diag([4.0, 4.0, 4.0, 1.0]))  # a truth on another grid than its
    assert main([*ev, "--model", model]) == 2  # image: was a tensor-size RuntimeError traceback once segmented
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"crossmodal: error: case 'phantom003': file {truth}: label grid (24, 24, 24) / affine [[4.0, 0.0, 0.0, 0.0], "
        "[0.0, 4.0, 0.0, 0.0], [0.0, 0.0, 4.0, 0.0], [0.0, 0.0, 0.0, 1.0]] differs from the image grid (48, 48, 48)")
    for argv in ([], ["--model", model, "--predictions", str(out)]):
        assert main([*ev, *argv]) == 2
        assert capsys.readouterr().err.strip() == (
            "crossmodal: error: give --model (segment the held-out cases with it) or --predictions (score label maps "
            "made before), one of them")

    (studies / "modalities" / "phantom003" / "pet.nii.gz").unlink()
    assert main([*base, "--out", str(tmp_path / "out2")]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1] == (
        "crossmodal: error: 1 of 4 cases not segmented (['phantom003']; why: above and in "
        f"{tmp_path / 'out2' / 'predictions.json'}); the others were written")
    assert "phantom003: not segmented: case 'phantom003': modality 'pet' is missing" in captured.out
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == [
        "phantom000.nii.gz", "phantom001.nii.gz", "phantom002.nii.gz", "predictions.json"]
    for cid in ("phantom000", "phantom001", "phantom002"):  # the same maps as before
        assert (load_volume(tmp_path / "out2" / f"{cid}.nii.gz", cid)[0] == load_volume(out / f"{cid}.nii.gz",
                                                                                          cid)[0]).all()
    failed = json.loads((tmp_path / "out2" / "predictions.json").read_text())
    assert failed["failed"] == ["phantom003"] and "modality 'pet' is missing" in failed["per_case"][3]["error"]
    assert main([*base, "--out", str(tmp_path / "out3"), "--cases", "phantom003", "--missing-modality",
                 "zero_fill"]) == 0
    assert json.loads((tmp_path / "out3" / "predictions.json").read_text())["per_case"][0]["modalities_used"] == [
        "ct", "mr"]

    # an --out where predictions would overwrite images or labels: refused, nothing replaced
    before = snapshot(studies)
    for folder in (studies, studies / "truth"):
        assert main([*base, "--out", str(folder)]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"crossmodal: error: --out {folder}: a map would replace {folder / 'phantom000.nii.gz'}, which no "
            "earlier run wrote there (not in its predictions.json); give a new or empty folder")
    assert snapshot(studies) == before
    # a run killed after writing its second map: the folder is still predict's own, a rerun writes over it
    import crossmodal.serving.offline as offline

    calls = []

    def dies_on_the_second(*a, **k):  # killed once the second map is written, before it is reported
        calls.append(a[0])
        save_volume(*a, **k)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(offline, "save_volume", dies_on_the_second)
    assert main([*base, "--out", str(tmp_path / "out5"), "--cases", "phantom000", "phantom001"]) == 130  # Ctrl-C
    assert capsys.readouterr().err.endswith("\ncrossmodal predict: interrupted\n")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "out5").iterdir()) == [
        "phantom000.nii.gz", "phantom001.nii.gz", "predictions.json"]
    killed = json.loads((tmp_path / "out5" / "predictions.json").read_text())  # the case done, ready to review
    assert [r["case"] for r in killed["per_case"]] == killed["review_order"] == ["phantom000"]
    assert main([*base, "--out", str(tmp_path / "out5"), "--cases", "phantom001", "phantom000"]) == 0
    assert json.loads((tmp_path / "out5" / "predictions.json").read_text())["files"] == [
        "phantom000.nii.gz", "phantom001.nii.gz"]
    capsys.readouterr()

    assert main([*base, "--out", str(tmp_path / "out4"), "--cases", "phantom001", "nope"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"crossmodal: error: case 'nope': no primary image in {studies} (its cases: ['phantom000', 'phantom001', "
        "'phantom002', 'phantom003'])")
    assert not (tmp_path / "out4").exists()


def nib_dtype(path: Path) -> np.dtype:
    import nibabel as nib

    return nib.load(str(path)).get_data_dtype()


def test_offline_commands_accept_an_nnunet_dataset(tmp_path: Path, phantom_cfg, monkeypatch, capsys, caplog):
    """`crossmodal evaluate` and `crossmodal train` on an nnU-Net v2 raw dataset, with the committed weights; what
    they import or make for themselves leaves the temp folder with them (each run left a copy of the dataset)."""
    from conftest import PRETRAINED_PHANTOM

    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=3, dense=1, sparse=1, seed=21)
    temp = tmp_path / "temp"
    temp.mkdir()
    ds = tmp_path / "Dataset002_Phantom"
    # every command in this process (a subprocess would spend ~7 s importing MONAI for each), its temp folder `temp`
    from crossmodal.cli import main

    assert main(["data", "export-nnunet", "--studies", str(studies), "--out", str(ds), "--config", "phantom",
                 "--test", "phantom002"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    assert main(["evaluate", "--studies", str(ds), "--config", "phantom", "--model", str(PRETRAINED_PHANTOM),
                 "--network", "baseline_unet", "--out", str(tmp_path / "e.json")]) == 0
    out, err = capsys.readouterr()
    assert list(temp.iterdir()) == [] and "(for this command only)" in err
    summary = json.loads((tmp_path / "e.json").read_text())
    assert summary["cases"] == 1 and summary["per_case"][0]["case"] == "phantom002"  # the imagesTs case
    assert summary["dice_mean"] > 0.8, out
    assert summary["mirror_axes"] == [] and summary["per_case"][0]["seconds"] > 0  # one pass, its infer seconds
    assert summary["overlap"] == 0.25  # the preset's sliding window
    assert summary["seconds_mean"] == pytest.approx(summary["per_case"][0]["seconds"])
    # predict: the dataset's imagesTs cases, as nnU-Net predicts them; the map evaluate scored
    assert main(["predict", "--studies", str(ds), "--config", "phantom", "--model", str(PRETRAINED_PHANTOM),
                 "--network", "baseline_unet", "--out", str(tmp_path / "p")]) == 0
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["phantom002.nii.gz", "predictions.json"]
    assert list(temp.iterdir()) == [] and capsys.readouterr().out.strip().endswith(
        f"1 cases segmented -> {tmp_path / 'p'} ({tmp_path / 'p' / 'predictions.json'}); most uncertain first: "
        "phantom002")
    pred = np.rint(load_volume(tmp_path / "p" / "phantom002.nii.gz", "phantom002")[0].numpy())
    truth = np.rint(load_volume(ds / "labelsTs" / "phantom002.nii.gz", "phantom002")[0].numpy())
    assert np.mean(dice_per_class(pred, truth, 4)) == pytest.approx(summary["dice_mean"], abs=1e-6)
    assert main(["evaluate", "--studies", str(ds), "--config", "phantom", "--model", str(PRETRAINED_PHANTOM),
                 "--network", "baseline_unet", "--mirror-axes", "0,3"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "crossmodal: error: --mirror-axes: '0,3' must name spatial axes 0, 1 or 2, each once")
    assert main(["evaluate", "--studies", str(ds), "--config", "phantom", "--model", str(PRETRAINED_PHANTOM),
                 "--network", "baseline_unet", "--overlap", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "crossmodal: error: --overlap: '1' must be a number from 0 up to, not including, 1")
    # a window smaller than the case: the overlap reaches the sliding window and changes the label
    (tmp_path / "small.yaml").write_text("extends: phantom\ninfer:\n  roi_size: [16, 16, 16]\n")
    small = {}
    for overlap in ("0.25", "0.75"):
        assert main(["evaluate", "--studies", str(ds), "--config", str(tmp_path / "small.yaml"), "--model",
                     str(PRETRAINED_PHANTOM), "--network", "baseline_unet", "--overlap", overlap, "--out",
                     str(tmp_path / f"e{overlap}.json")]) == 0
        small[overlap] = json.loads((tmp_path / f"e{overlap}.json").read_text())
        assert small[overlap]["overlap"] == float(overlap)
    assert small["0.25"]["dice_mean"] != small["0.75"]["dice_mean"]
    capsys.readouterr()
    assert main(["train", "--studies", str(ds), "--config", "phantom", "--model-dir", str(tmp_path / "m"),
                 "--epochs", "1", "--network", "baseline_unet"]) == 0, capsys.readouterr().err[-2000:]
    assert (tmp_path / "m" / "phantom_baseline_unet.pt").is_file()
    # a method preset: ours on dense + sparse (nnU-Net ignore label) + unlabelled (no label file) training cases
    (ds / "labelsTr" / "phantom001.nii.gz").unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="crossmodal"):
        code = main(["train", "--studies", str(ds), "--config", "phantom", "--model-dir", str(tmp_path / "o"),
                     "--epochs", "1", "--method", "ours"])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    # phantom001 alone: the imagesTs case with its labelsTs label (phantom002) is the test case, not trained on
    assert "0 - unlabeled: 1 cases, batch 1" in caplog.text and "held-out test case (phantom002)" in caplog.text
    monkeypatch.undo()
    assert [p.name for p in temp.iterdir() if not p.name.startswith("torchinductor_")] == []  # torch's own cache
    assert load_config(str(tmp_path / "o" / "method_config.yaml")).model.name == "crossmodal"
    ev = json.loads((tmp_path / "o" / "evaluation.json").read_text())
    assert [c["case"] for c in ev["per_case"]] == ["phantom002"] and set(ev["per_case"][0]["hd95"]) == \
        {"organ", "lesion", "vessel"} and ev["hd95_mean"] > 0 and 0 <= ev["dice_mean"] <= 1
    assert "mean HD95" in out
    curve = next((tmp_path / "o").glob("train_*/learning_curve.png"))
    assert f'"learning_curve": "{curve}"' in out and curve.stat().st_size > 10_000
    assert main(["train", "--studies", str(ds), "--config", "phantom", "--model-dir", str(tmp_path / "x"),
                 "--method", "single_xray"]) == 2
    assert "single_ct, single_pet, single_mr" in capsys.readouterr().err
    (ds / "labelsTs" / "phantom002.nii.gz").unlink()  # no held-out label: said of the dataset (was: of the temp
    for given in (["--model", str(PRETRAINED_PHANTOM)], ["--predictions", str(tmp_path / "p")]):  # import folder)
        assert main(["evaluate", "--studies", str(ds), "--config", "phantom", "--network", "baseline_unet",
                     *given]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"crossmodal: error: {ds}: no held-out case to evaluate: none of its 1 imagesTs cases (phantom002) has its "
            f"label in labelsTs (e.g. {ds / 'labelsTs' / 'phantom002.nii.gz'}); held-out cases are imagesTs cases "
            "with their labels in labelsTs")
    # an imagesTs case without labelsTs (a Decathlon's test set) is no training case (it trained as an unlabeled one)
    with caplog.at_level(logging.INFO, logger="crossmodal"):
        code = main(["train", "--studies", str(ds), "--config", "phantom", "--model-dir", str(tmp_path / "u"),
                     "--epochs", "1", "--method", "ours"])
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    assert "crossmodal: 1 imagesTs case(s) without a labelsTs label (phantom002) left out of training: test images, " \
        "as nnU-Net has them (an unlabeled training case goes in imagesTr without a labelsTr label)" in err
    assert "unlabeled: 1 cases, batch 1" in caplog.text, caplog.text[-2000:]  # phantom001 alone
    label = ds / "labelsTr" / "phantom000.nii.gz"  # a label on another grid than its images: named in the dataset
    lab = load_volume(label)
    save_volume(label, np.rint(lab[0].numpy()[::2, ::2, ::2]).astype(np.uint8), np.diag([4.0, 4.0, 4.0, 1.0]))
    assert main(["data", "import-nnunet", "--dataset", str(ds), "--out", str(tmp_path / "imp"), "--config",
                 "phantom"]) == 2  # was imported so, and training named the temp import's copy
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"crossmodal: error: case 'phantom000': file {label}: label grid (24, 24, 24) / affine [[4.0, 0.0, 0.0, 0.0]")
    assert not (tmp_path / "imp").exists() or not any((tmp_path / "imp").iterdir())


def test_offline_train_on_a_bad_case_names_case_file_and_problem_without_a_traceback(tmp_path: Path, phantom_cfg,
                                                                                     capfd):
    """A loader's CaseError arrives wrapped by MONAI (`RuntimeError: applying transform ...`): the CLI digs it out
    (in this process, everything it writes to its stderr's file descriptor read: no interpreter's start spent)."""
    import nibabel as nib
    from crossmodal.cli import main

    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=3, dense=2, sparse=0, seed=5)
    label = studies / "labels" / "final" / "phantom001.nii.gz"
    img = nib.load(label)
    values = np.asarray(img.dataobj).copy()
    values[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(values, img.affine), label)
    capfd.readouterr()
    code = main(["train", "--studies", str(studies), "--config", "phantom", "--model-dir", str(tmp_path / "m"),
                 "--epochs", "1", "--network", "baseline_unet"])
    stderr = capfd.readouterr().err
    assert code == 2, stderr[-2000:]
    err = stderr.strip().splitlines()[-1]
    assert err.startswith("crossmodal: error: case 'phantom001': file ") and str(label) in err
    assert "label values [7] are not configured classes" in err
    assert "Traceback" not in stderr and "applying transform" not in stderr
    assert not list((tmp_path / "m").rglob("*.pt"))  # no model written



def test_offline_train_caches_the_labelled_cases_unless_told_to_read_them_as_they_come(tmp_path: Path, capsys,
                                                                                      monkeypatch):
    """``--dataset Dataset``: nothing is cached (a dataset of many large cases); the default caches each source."""
    import crossmodal.serving.train as train_task
    from crossmodal.cli import main

    built = []

    class CountingCache(train_task.CacheDataset):
        def __init__(self, data, *args, **kwargs):
            built.append(len(data))
            super().__init__(data, *args, **kwargs)

    monkeypatch.setattr(train_task, "CacheDataset", CountingCache)
    studies = make_phantom_studies(tmp_path / "s", load_config("phantom"), cases=3, dense=2, sparse=1, seed=3)
    for option, model_dir in (["--dataset", "Dataset"], "read"), ([], "cached"):
        code = main(["train", "--studies", str(studies), "--config", "phantom", "--model-dir",
                     str(tmp_path / model_dir), "--epochs", "1", "--network", "baseline_unet", *option])
        assert code == 0 and (tmp_path / model_dir / "phantom_baseline_unet.pt").is_file()
        if option:
            assert built == []  # read as they come
    assert built == [1, 1]  # the default: each source cached (one dense, one sparse; one dense case validates)
    # every case with truth carries a label: no held-out test case, so no empty evaluation is printed
    out = capsys.readouterr().out
    assert "test cases:" not in out and not (tmp_path / "cached" / "evaluation.json").exists()
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--studies", str(studies), "--model-dir", str(tmp_path / "x"), "--dataset", "Persistent"])
    assert exit_.value.code == 2 and "--dataset: invalid choice: 'Persistent'" in capsys.readouterr().err


def test_offline_commands_refuse_a_missing_folder_zero_epochs_and_an_absent_gpu(tmp_path: Path, capsys):
    from crossmodal.cli import main

    studies = make_phantom_studies(tmp_path / "s", load_config("phantom"), cases=2, dense=1, sparse=0, seed=8)
    capsys.readouterr()  # the generator's progress bar
    missing = tmp_path / "typo"
    cases = [(["train", "--studies", str(missing)], f"--studies {missing}: no such folder"),
             (["train", "--studies", str(studies), "--epochs", "0"], "--epochs 0: must be at least 1"),
             (["evaluate", "--studies", str(studies), "--model", "m.pt", "--device", "gpu"],
              "--device 'gpu': use auto, cpu, cuda or cuda:N")]
    # no held-out truth: an error, not a NaN summary with exit status 0 (checked before the model is read)
    no_truth = tmp_path / "no_truth"
    shutil.copytree(studies, no_truth)
    shutil.rmtree(no_truth / "truth")
    weights = str(PRETRAINED_PHANTOM.parent / "phantom_crossmodal.pt")  # a model that exists: the data set is wrong
    cases.append((["evaluate", "--studies", str(no_truth), "--model", weights],
                  f"{no_truth}: no held-out case to evaluate: {no_truth / 'truth'} holds no truth (NIfTI / NRRD) of "
                  "a case without a final label"))
    no_image = tmp_path / "no_image"  # truth of a case whose image is gone: named before anything is segmented
    shutil.copytree(studies, no_image)
    (no_image / "phantom001.nii.gz").unlink()
    for argv in (["evaluate", "--studies", str(no_image), "--model", weights],
                 ["train", "--studies", str(no_image), "--epochs", "1"]):  # train: said once the model was published
        cases.append((argv, f"case 'phantom001': file {no_image / 'truth' / 'phantom001.nii.gz'}: has truth but no "
                            f"primary image in {no_image}; remove the truth file, or put the case's image back"))
    if not torch.cuda.is_available():
        cases.append((["train", "--studies", str(studies), "--device", "cuda"],
                      "--device cuda: no CUDA device is visible here"))
    for argv, message in cases:
        code = main([*argv, "--config", "phantom", *(["--model-dir", str(tmp_path / "m")] if argv[0] == "train"
                                                     else [])])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"crossmodal: error: {message}"), (argv, err[-500:])
    assert not missing.exists() and not (tmp_path / "m").exists()  # nothing created, nothing trained
    # truth as NRRD counts as NIfTI does (only .nii.gz did: such a case was never evaluated); two files for one
    # case are an error naming both
    truth = load_volume(studies / "truth" / "phantom001.nii.gz")
    save_volume(studies / "truth" / "phantom001.nrrd", truth[0].numpy().astype(np.uint8), truth.affine.numpy())
    with pytest.raises(CaseError, match="case 'phantom001': file .*phantom001.nrrd: a second truth file beside "
                                        "phantom001.nii.gz; keep one"):
        held_out_cases(str(studies))
    (studies / "truth" / "phantom001.nii.gz").unlink()
    assert held_out_cases(str(studies)) == [studies / "truth" / "phantom001.nrrd"]


def test_data_commands_refuse_counts_sizes_and_folders_they_cannot_use(tmp_path: Path, capsys):
    """Each of these exited 0 having written nothing (``--cases 0``, an empty studies folder exported as an nnU-Net
    dataset of no case), read 0 as the default (``--size 0``, ``--step 0``), or stopped on ``[Errno 2]`` without
    naming the option; now each is exit 2 naming the option and what it must be, and writes nothing."""
    from crossmodal.cli import main

    out, empty = tmp_path / "out", tmp_path / "empty"
    empty.mkdir()
    label = tmp_path / "label.nii.gz"
    save_volume(label, np.ones((8, 8, 8), np.uint8), np.eye(4))
    parser_errors = [
        (["data", "phantom", "--out", str(out), "--cases", "0"],
         "crossmodal data phantom: error: argument --cases: must be at least 1, got 0"),
        (["data", "phantom", "--out", str(out), "--cases", "two"],
         "crossmodal data phantom: error: argument --cases: must be an integer, got 'two'"),
        (["data", "phantom", "--out", str(out), "--size", "0"],
         "crossmodal data phantom: error: argument --size: must be at least 16, got 0"),
        (["data", "phantom", "--out", str(out), "--dense", "-1"],
         "crossmodal data phantom: error: argument --dense: must be at least 0, got -1"),
        (["data", "phantom", "--out", str(out), "--misregistration-mm", "-4"],  # made cases recorded as -4 mm
         "crossmodal data phantom: error: argument --misregistration-mm: must be a finite number of at least 0.0, got "
         "'-4'"),
        (["data", "brain", "--out", str(out), "--templates", str(empty), "--misregistration-mm", "nan"],
         "crossmodal data brain: error: argument --misregistration-mm: must be a finite number of at least 0.0, got "
         "'nan'"),
        (["data", "sparsify", "--label", str(label), "--out", str(out / "s.nii.gz"), "--mode", "slices", "--step", "0"],
         "crossmodal data sparsify: error: argument --step: must be at least 1, got 0"),
        (["simulate", "--studies", str(empty), "--seeds", "0", "-1"],
         "crossmodal simulate: error: argument --seeds: must be at least 0, got -1"),
        (["train", "--studies", str(empty), "--model-dir", str(out), "--processes", "0"],
         "crossmodal train: error: argument --processes: must be at least 1, got 0")]
    for argv, message in parser_errors:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1] == message, argv
    for argv, message in (
            (["data", "to-dicom", "--studies", str(tmp_path / "typo"), "--out", str(out)],
             f"--studies {tmp_path / 'typo'}: no such folder (a studies folder or an nnU-Net v2 raw dataset)"),
            (["data", "export-nnunet", "--studies", str(tmp_path / "typo"), "--out", str(out)],
             f"--studies {tmp_path / 'typo'}: no such folder (a studies folder or an nnU-Net v2 raw dataset)"),
            (["data", "export-nnunet", "--studies", str(empty), "--out", str(out)],
             f"{empty}: no primary images (*.nii.gz, *.nii, *.nrrd, *.mha) in this studies folder: nothing to export"),
            (["evaluate", "--studies", str(empty), "--model", str(tmp_path / "nope.pt")],  # said "conf pretrained"
             f"--model {tmp_path / 'nope.pt'}: no such weights file")):
        assert main([*argv, "--config", "phantom"]) == 2, argv
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"crossmodal: error: {message}", argv
    assert not out.exists()
    # outputs that cannot be written are refused before any work: a folder option on a file was a FileExistsError
    # traceback, and `evaluate --out` under a file one after the whole evaluation
    a_file, model = tmp_path / "a_file", tmp_path / "model.pt"
    a_file.write_text("x")
    for argv, message in (
            (["train", "--studies", str(empty), "--model-dir", str(a_file)], f"--model-dir {a_file}: is a file; give a "
                                                                             "folder"),
            (["train", "--studies", str(empty), "--model-dir", str(out), "--publish", str(empty)],
             f"--publish {empty}: is a folder; give a file name"),
            (["evaluate", "--studies", str(empty), "--model", str(model), "--out", str(a_file / "x.json")],
             f"--out {a_file / 'x.json'}: {a_file} is a file, not a folder"),
            (["data", "phantom", "--out", str(a_file / "deeper" / "studies")],
             f"--out {a_file / 'deeper' / 'studies'}: {a_file} is a file, not a folder"),
            (["data", "sparsify", "--label", str(label), "--out", str(empty)], f"--out {empty}: is a folder; give a "
                                                                               "file name"),
            (["simulate", "--studies", str(empty), "--work", str(a_file)], f"--work {a_file}: is a file; give a "
                                                                           "folder")):
        assert main([*argv, "--config", "phantom"]) == 2, argv
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"crossmodal: error: {message}", argv
    assert not out.exists() and a_file.read_text() == "x" and not list(empty.iterdir())


def test_a_folder_without_config_gets_the_preset_naming_its_modalities(tmp_path: Path, phantom_cfg, capsys,
                                                                       monkeypatch):
    """Without ``--config`` (``--conf preset``) the commands took the brain preset on any folder: on a CT + PET + MR
    one each case "lacked" its T2 (`crossmodal train`: "add it ... or use the case without it"), and export-nnunet
    stopped there leaving a half dataset behind. Now the folder's modalities pick the preset, said on stderr; the
    brain's folders keep the default without a word; modalities no preset names (or several do) are an error that
    says what was found. An export stopped by a case leaves nothing at --out."""
    from conftest import APP
    from crossmodal.cli import main
    from crossmodal.config import ConfigError, default_configs_dir
    from crossmodal.data.studies import guess_preset
    from crossmodal.serving.app import AppParts

    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=3, dense=1, sparse=1)
    said = (f"--config not given: preset 'phantom' (ct + pet, mr), the one whose secondary modalities are those of the "
            f"cases under {studies} (the default, 'brain', takes t1 + t2, pd)")
    assert guess_preset(studies, "brain") == ("phantom", said)  # phantom_large extends phantom: not counted apart
    assert guess_preset(studies, "phantom") == ("phantom", None)

    def folder(name: str, files: dict[str, list[str]]) -> Path:
        for case, names in files.items():
            (tmp_path / name / "modalities" / case).mkdir(parents=True)
            for n in names:
                (tmp_path / name / "modalities" / case / n).write_bytes(b"")  # only the names are read
        (tmp_path / name).mkdir(exist_ok=True)
        return tmp_path / name

    brainlike = folder("b", {"c0": ["t2.nii.gz", "pd.nrrd"], "c1": ["t2.nii.gz"]})
    assert guess_preset(brainlike, "brain") == ("brain", None)
    assert guess_preset(brainlike, "phantom")[0] == "brain"
    assert guess_preset(folder("empty", {}), "brain") == ("brain", None)  # nothing to go by
    other = folder("o", {"c0": ["pet.nii.gz", "flair.nii.gz"]})
    with pytest.raises(ConfigError) as e:
        guess_preset(other, "brain")
    assert str(e.value).startswith(f"the modality files under {other} (flair, pet) are not the modalities of any "
                                   f"preset in {default_configs_dir()} (brain: t1 + t2, pd; phantom: ct + pet, mr; ")
    assert str(e.value).endswith("write a preset naming them (see the README, On your own data) and pass it with "
                                 "--config")
    configs = tmp_path / "configs"  # two presets of their own with these modalities: the user says which
    shutil.copytree(default_configs_dir(), configs)
    (configs / "petct.yaml").write_text("extends: base\nname: petct\nmodalities:\n  - {name: ct, kind: ct}\n"
                                        "  - {name: pet, kind: pet}\n  - {name: mr, kind: mr}\n")
    with pytest.raises(ConfigError, match=r"^the modality files under .* \(mr, pet\) fit the presets \['petct', "
                                          r"'phantom'\]; say which with --config$"):
        guess_preset(studies, "brain", configs)
    # the server: a local folder picks its preset; a PACS keeps the default
    parts = AppParts.from_conf(str(APP), {"model_dir": str(tmp_path / "m")}, studies=str(studies))
    assert (parts.preset, parts.cfg.name, parts.cfg.modality_names) == ("phantom", "phantom", ["ct", "pet", "mr"])
    assert AppParts.from_conf(str(APP), {"model_dir": str(tmp_path / "m")}, pacs=True,
                              studies="http://127.0.0.1:8042/dicom-web").preset == "brain"

    out = tmp_path / "Dataset003_Phantom"
    pet = studies / "modalities" / "phantom001" / "pet.nii.gz"
    pet.rename(tmp_path / "pet.nii.gz")
    capsys.readouterr()
    assert main(["data", "export-nnunet", "--studies", str(studies), "--out", str(out), "--test", "phantom002"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == f"crossmodal: {said}"
    assert err[-1] == "crossmodal: error: case 'phantom001': modality 'pet' is missing; nnU-Net needs every channel"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "configs", "empty", "m", "o", "pet.nii.gz", "s"]
    (tmp_path / "pet.nii.gz").rename(pet)
    out.mkdir()  # an empty folder is taken
    assert main(["data", "export-nnunet", "--studies", str(studies), "--out", str(out), "--test", "phantom002"]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "ct", "1": "pet", "2": "mr"} and meta["numTraining"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "imagesTr", "imagesTs", "labelsTr", "labelsTs"]
    assert out.stat().st_mode & 0o777 == 0o777 & ~_umask()
    with pytest.raises(ConfigError, match=r"^--studies .*Dataset003_Phantom: an nnU-Net dataset \(dataset.json, "
                       r"imagesTr\); the server takes a studies folder: `crossmodal data import-nnunet --dataset "
                       r".*Dataset003_Phantom --out <studies>`, then start it on <studies>$"):  # it served no case
        AppParts.from_conf(str(APP), {"model_dir": str(tmp_path / "m")}, studies=str(out))
    assert guess_preset(out, "brain") == ("phantom", "--config not given: preset 'phantom' (ct + pet, mr), the one "
                                                     f"whose modalities are {out / 'dataset.json'}'s channel_names "
                                                     "(the default, 'brain', takes t1 + t2, pd)")
    # an import stopped by a case that does not read leaves --out as it was (its cases before that one stayed, and
    # the next import refused them as already there)
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    bad = broken / "imagesTr" / "phantom001_0001.nii.gz"
    bad.write_bytes(bad.read_bytes()[:2000])
    back = tmp_path / "back"
    back.mkdir()
    (back / "keep.txt").write_text("an annotator's file")
    capsys.readouterr()
    assert main(["data", "import-nnunet", "--dataset", str(broken), "--out", str(back)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"crossmodal: error: case 'phantom001': file {bad}: cannot be read as NIfTI/NRRD (truncated or corrupt?)")
    assert [p.name for p in back.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left either
    moved: list[str] = []  # the files moved into --out, in order (os.replace spied on, not replaced)
    replace = os.replace

    def spy(a, b):
        if Path(b).is_relative_to(back):
            moved.append(Path(b).relative_to(back).as_posix())
        replace(a, b)

    monkeypatch.setattr(os, "replace", spy)
    assert main(["data", "import-nnunet", "--dataset", str(out), "--out", str(back)]) == 0
    assert len(moved) == 12 and moved[-3:] == ["phantom000.nii.gz", "phantom001.nii.gz", "phantom002.nii.gz"]
    assert capsys.readouterr().err.splitlines()[0] == f"crossmodal: {guess_preset(out, 'brain')[1]}"
    assert sorted(p.relative_to(back).as_posix() for p in back.rglob("*.nii.gz")) == [
        "labels/final/phantom000.nii.gz", "labels/final/phantom001.nii.gz",
        *[f"modalities/phantom00{i}/{m}.nii.gz" for i in range(3) for m in ("mr", "pet")],
        "phantom000.nii.gz", "phantom001.nii.gz", "phantom002.nii.gz", "truth/phantom002.nii.gz"]
    # the channels in another order (CT, MR, PET) each go to the modality they name (it was refused: "use a config
    # that names the same modalities in the same order")
    swapped = tmp_path / "swapped"
    shutil.copytree(out, swapped)
    for f in sorted(swapped.glob("images*/*_0001.nii.gz")):
        f.rename(f.with_name(f.name.replace("_0001", "_tmp")))
        f.with_name(f.name.replace("_0001", "_0002")).rename(f)
        f.with_name(f.name.replace("_0001", "_tmp")).rename(f.with_name(f.name.replace("_0001", "_0002")))
    meta["channel_names"] = {"0": "CT", "1": "MR", "2": "PET"}
    (swapped / "dataset.json").write_text(json.dumps(meta))
    assert guess_preset(swapped, "brain")[0] == "phantom"
    assert main(["data", "import-nnunet", "--dataset", str(swapped), "--out", str(tmp_path / "back2")]) == 0
    for rel in ("phantom001.nii.gz", "modalities/phantom001/mr.nii.gz", "modalities/phantom001/pet.nii.gz"):
        assert np.array_equal(load_volume(tmp_path / "back2" / rel)[0].numpy(), load_volume(back / rel)[0].numpy())
    meta["channel_names"] = {"0": "CT", "1": "MR", "2": "MR"}
    (swapped / "dataset.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["data", "import-nnunet", "--dataset", str(swapped), "--out", str(tmp_path / "back3"), "--config",
                 "phantom"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"crossmodal: error: {swapped / 'dataset.json'}: channel_names ['ct', 'mr', 'mr'] differ from the config's "
        "modalities ['ct', 'pet', 'mr']; use a config that names the same modalities")
    assert sorted(p.name for p in (tmp_path / "back" / "modalities" / "phantom000").iterdir()) == [
        "mr.nii.gz", "pet.nii.gz"]
    # the classes under other values (lesion 1, organ 2) come in as the preset's, by name (they trained as each
    # other); a class the preset lacks, or a region, is refused before any case is read
    meta["channel_names"] = {"0": "CT", "1": "MR", "2": "PET"}
    meta["labels"] = {"background": 0, "lesion": 1, "Organ": 2, "vessel": 3, "ignore": 4}
    (swapped / "dataset.json").write_text(json.dumps(meta))
    for f in [*swapped.glob("labelsTr/*.nii.gz"), *swapped.glob("labelsTs/*.nii.gz")]:
        vol = load_volume(f)
        arr = vol[0].numpy().astype(np.uint8)
        save_volume(f, np.choose(arr, [0, 2, 1, 3, 4]).astype(np.uint8), vol.affine.numpy())
    assert main(["data", "import-nnunet", "--dataset", str(swapped), "--out", str(tmp_path / "back4")]) == 0
    for rel in ("labels/final/phantom000.nii.gz", "labels/final/phantom001.nii.gz", "truth/phantom002.nii.gz"):
        mine = load_volume(tmp_path / "back4" / rel)[0].numpy()
        assert np.array_equal(mine, load_volume(back / rel)[0].numpy()) and set(np.unique(mine)) > {1, 2}
    # another tool's predictions on that dataset are in its values too: scored in the preset's (the truth, as
    # nnUNetv2_predict would write it, scores 1; read as they were, organ and lesion would be swapped)
    shutil.copytree(swapped / "labelsTs", tmp_path / "preds")
    assert main(["evaluate", "--studies", str(swapped), "--predictions", str(tmp_path / "preds"), "--out",
                 str(tmp_path / "e.json")]) == 0
    scored = json.loads((tmp_path / "e.json").read_text())
    assert scored["cases"] == 1 and scored["per_case"][0]["dice"] == {"organ": 1.0, "lesion": 1.0, "vessel": 1.0}
    # and predict writes its maps in the dataset's values, as its labelsTs (where it names every class)
    from conftest import PRETRAINED_PHANTOM

    maps = {}
    for ds in (out, swapped):
        assert main(["predict", "--studies", str(ds), "--model", str(PRETRAINED_PHANTOM), "--network", "baseline_unet",
                     "--out", str(tmp_path / f"p_{ds.name}")]) == 0
        maps[ds.name] = load_volume(tmp_path / f"p_{ds.name}" / "phantom002.nii.gz")[0].numpy().astype(np.uint8)
    assert set(np.unique(maps[out.name])) == {0, 1, 2, 3}
    assert np.array_equal(maps["swapped"], np.choose(maps[out.name], [0, 2, 1, 3]))
    (swapped / "dataset.json").write_text(json.dumps({**meta, "labels": {"background": 0, "lesion": 1, "Organ": 2}}))
    capsys.readouterr()
    assert main(["predict", "--studies", str(swapped), "--model", str(PRETRAINED_PHANTOM), "--network",
                 "baseline_unet", "--out", str(tmp_path / "p_three")]) == 0
    assert f"crossmodal: {swapped}/dataset.json names 3 of the preset's 4 classes; the maps hold the preset's " \
           "values {'background': 0, 'organ': 1, 'lesion': 2, 'vessel': 3}" in capsys.readouterr().err
    assert np.array_equal(load_volume(tmp_path / "p_three" / "phantom002.nii.gz")[0].numpy(), maps[out.name])
    for labels, problem in (({"background": 0, "liver": 1, "tumour": 2}, "labels ['liver', 'tumour'] are not "
                             "classes of the config ({'background': 0, 'organ': 1, 'lesion': 2, 'vessel': 3}); their "
                             "voxels would train as other classes: use a config whose labels.classes name them"),
                            ({"background": 0, "organ": [1, 2], "lesion": 2}, "labels ['organ'] are regions (lists "
                             "of values) or not integers; import takes one value a class (nnU-Net's region-based "
                             "labels are not supported)")):
        (swapped / "dataset.json").write_text(json.dumps({**meta, "labels": labels}))
        capsys.readouterr()
        assert main(["data", "import-nnunet", "--dataset", str(swapped), "--out", str(tmp_path / "back5")]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"crossmodal: error: {swapped / 'dataset.json'}: {problem}")
        assert not (tmp_path / "back5").exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_metaimage_header_and_raw_pair_is_named_with_what_to_do(tmp_path: Path, phantom_cfg, caplog):
    """A case as a MetaImage ``.mhd`` header and its ``.raw`` voxels (LUNA16's, PROMISE12's) was left out of every
    listing without a word: the offline commands' and the server's. Each listing now names it and says how to make
    it one file (``.mha``), which is read; the other cases are listed as before."""
    import SimpleITK as sitk
    from crossmodal import io
    from crossmodal.data.studies import primary_images
    from crossmodal.serving.datastore import CrossModalDatastore

    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=2, dense=1, sparse=0, seed=3)
    image, original = sitk.ReadImage(str(studies / "phantom001.nii.gz")), load_volume(studies / "phantom001.nii.gz")
    (studies / "phantom001.nii.gz").unlink()
    sitk.WriteImage(image, str(studies / "phantom001.mhd"))  # and phantom001.raw
    assert sorted(p.name for p in studies.glob("phantom001.*")) == ["phantom001.mhd", "phantom001.raw"]
    said = (f"{studies / 'phantom001.mhd'}: not read: a MetaImage header whose voxels lie in another file; save the "
            "volume as one .mha file (SimpleITK: sitk.WriteImage(sitk.ReadImage('phantom001.mhd'), 'phantom001.mha')) "
            "and remove the pair")
    io._UNREAD_SAID.clear()
    with caplog.at_level(logging.WARNING, logger="crossmodal.io"):
        assert list(primary_images(studies)) == list(primary_images(studies)) == ["phantom000"]
        assert [r.getMessage() for r in caplog.records] == [said]  # once a process
        caplog.clear()
        io._UNREAD_SAID.clear()  # a server's process
        store = CrossModalDatastore(str(studies), phantom_cfg.labels, phantom_cfg.modality_names)
        assert store.list_images() == ["phantom000"] and [r.getMessage() for r in caplog.records] == [said]
    sitk.WriteImage(sitk.ReadImage(str(studies / "phantom001.mhd")), str(studies / "phantom001.mha"))  # as it says
    for p in studies.glob("phantom001.*"):
        if p.suffix != ".mha":
            p.unlink()
    assert list(primary_images(studies)) == ["phantom000", "phantom001"]
    back = load_volume(studies / "phantom001.mha")
    np.testing.assert_array_equal(back.numpy(), original.numpy())
    np.testing.assert_allclose(back.affine.numpy(), original.affine.numpy(), atol=1e-5)
    # a modality as such a pair: the case's error names it
    pet = studies / "modalities" / "phantom000" / "pet.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(pet)), str(pet.with_name("pet.mhd")))
    pet.unlink()
    with pytest.raises(CaseError) as e:
        load_case(find_case(studies / "phantom000.nii.gz", phantom_cfg.modality_names), phantom_cfg)
    assert str(e.value).endswith(
        "modality 'pet' is missing: expected <studies>/modalities/phantom000/pet.nii.gz (or .nii/.nrrd/.mha); add "
        "it (a running server takes it as PUT /datastore/image?image=phantom000 with params {\"modality\": \"pet\"}) "
        "(pet.mhd there is a MetaImage header whose voxels lie in another file: save it as one pet.mha), or use the "
        "case without it (missing_modality zero_fill)"), str(e.value)
