"""Working grid and sliding-window inference helpers."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import APP, crop_slab, dice, make_phantom_studies
from crossmodal import transforms
from crossmodal.config import load_config
from crossmodal.inference import NetworkInferer, predict
from crossmodal.io import load_volume, save_volume
from crossmodal.nets import CrossModalNet, build_network
from crossmodal.resample import argmax_channels, resample_argmax, separable_resample
from crossmodal.transforms import LoadCased, preprocessing, to_primary_grid, to_primary_labels
from monai.data import MetaTensor


def test_working_spacing_and_back_to_the_primary_grid(tmp_path: Path):
    cfg = load_config("phantom", overrides={"data": {"spacing": [3.0, 3.0, 4.0]}})
    studies = make_phantom_studies(tmp_path / "s", cfg, cases=1, dense=1, sparse=0)
    d = LoadCased(cfg)({"image": str(studies / "phantom000.nii.gz"),
                        "label": str(studies / "labels" / "final" / "phantom000.nii.gz")})
    assert tuple(d["image"].shape) == (3, 32, 32, 24) and tuple(d["label"].shape) == (1, 32, 32, 24)
    assert d["image"].meta["primary_shape"] == (48, 48, 48)
    np.testing.assert_allclose(np.sqrt((d["image"].affine[:3, :3].numpy() ** 2).sum(0)), [3.0, 3.0, 4.0], atol=1e-4)
    onehot = torch.nn.functional.one_hot(d["label"][0].long(), 4).movedim(-1, 0).float()
    back = to_primary_grid(onehot, d["image"]).argmax(0).numpy()
    truth = load_volume(studies / "truth" / "phantom000.nii.gz")[0].numpy()
    assert back.shape == truth.shape
    organ = 2 * ((back == 1) & (truth == 1)).sum() / ((back == 1).sum() + (truth == 1).sum())
    assert organ > 0.9  # the coarse label maps back onto the truth
    logits = torch.nn.functional.avg_pool3d(onehot[None] + 0.3 * torch.randn(1, *onehot.shape), 3, 1, 1)[0]
    fast = to_primary_labels(logits, d["image"])
    assert fast.dtype == torch.uint8 and tuple(fast.shape) == (48, 48, 48)
    assert torch.equal(fast, argmax_channels(to_primary_grid(logits, d["image"])))


@pytest.mark.parametrize("smooth", [True, False])
def test_resample_argmax_equals_dense_resampling_then_argmax(smooth: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 23, 19, 11, generator=g)
    if smooth:  # few label boundaries: the sparse path; noise: the dense fallback
        x = torch.nn.functional.avg_pool3d(4 * x[None], 5, 1, 2, count_include_pad=False)[0]
    grids = [((57, 19, 30), (0.4, 1.0, 0.37), (-0.3, 0.0, -0.2)), ((10, 40, 5), (2.3, 0.47, 2.0), (0.6, -0.1, 0.4))]
    for dst, scale, offset in grids:
        dense = argmax_channels(separable_resample(x.clone(), dst, scale, offset))
        fast = resample_argmax(x, dst, scale, offset)
        assert fast.dtype == torch.uint8 and torch.equal(fast, dense)
        assert len(fast.unique()) > 1


def test_predict_and_inferer_for_both_networks():
    cfg = load_config("phantom")
    x = torch.randn(1, 3, 64, 64, 64)
    for name in ("crossmodal", "baseline_unet"):
        net = build_network(load_config("phantom", overrides={"model": {"name": name}})).eval()
        with torch.no_grad():
            out = NetworkInferer(cfg.infer, present=[True, False, True])(x, net)
            fused = NetworkInferer(cfg.infer, fused_only=True)(x, net)
        assert tuple(out["fused"].shape) == (1, 4, 64, 64, 64) and tuple(fused.shape) == (1, 4, 64, 64, 64)
        if isinstance(net, CrossModalNet):
            assert sorted(out) == ["ct", "fused", "mr"]  # only the present modalities' heads
            assert sorted(predict(net, x, heads=False)) == ["fused"]
        else:
            assert sorted(out) == ["fused"]


def test_inferer_takes_each_cases_modalities_per_call():
    """A training run's validation batch carries each case's modalities: the same output as an inferer made for
    them, case by case when they differ; a modality absent from a case is never read."""
    cfg = load_config("phantom")
    torch.manual_seed(0)
    net = build_network(cfg).eval()
    x = torch.randn(2, 3, 32, 32, 32)
    rows = torch.tensor([[True, False, True], [True, True, True]])
    with torch.no_grad():
        both = NetworkInferer(cfg.infer, fused_only=True)(x, net, present=rows)
        first = NetworkInferer(cfg.infer, fused_only=True, present=[True, False, True])(x[:1], net)
        second = NetworkInferer(cfg.infer, fused_only=True)(x[1:], net)
        assert torch.equal(both, torch.cat([first, second]))
        noisy = x.clone()
        noisy[0, 1] = torch.randn(32, 32, 32) * 5  # the absent PET of case 0: whatever it holds
        assert torch.equal(NetworkInferer(cfg.infer, fused_only=True)(noisy, net, present=rows), both)
        heads = NetworkInferer(cfg.infer)(x[:1], net, present=rows[:1])
        assert sorted(heads) == ["ct", "fused", "mr"] and torch.equal(heads["fused"], first)
        same = NetworkInferer(cfg.infer, fused_only=True)(x, net, present=torch.ones(2, 3, dtype=torch.bool))
        assert torch.equal(same, NetworkInferer(cfg.infer, fused_only=True)(x, net))


@pytest.mark.parametrize("fused_only", [True, False])
def test_single_window_matches_monai_sliding_window(fused_only: bool):
    from monai.inferers import SlidingWindowInferer

    cfg = load_config("phantom", overrides={"infer": {"roi_size": [48, 48, 40]}})
    net = build_network(cfg).eval()
    x = torch.randn(1, 3, 45, 37, 40)  # fits one window: padded unevenly on two axes
    inferer = NetworkInferer(cfg.infer, fused_only=fused_only)
    window = SlidingWindowInferer(roi_size=(48, 48, 40), sw_batch_size=1, overlap=0.25, mode="gaussian")

    def run(t: torch.Tensor) -> dict[str, torch.Tensor] | torch.Tensor:
        out = predict(net, t, heads=not fused_only)
        return out["fused"] if fused_only else out

    with torch.no_grad():
        fast, ref = inferer(x, net), window(x, run)
    fast, ref = (fast, ref) if isinstance(fast, dict) else ({"fused": fast}, {"fused": ref})
    assert sorted(fast) == sorted(ref) == (["fused"] if fused_only else ["ct", "fused", "mr", "pet"])
    for k in ref:
        assert tuple(fast[k].shape) == (1, 4, 45, 37, 40)
        torch.testing.assert_close(fast[k], ref[k], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fused_only", [True, False])
def test_mirroring_averages_the_softmax_of_every_mirrored_pass_mapped_back(fused_only: bool):
    cfg = load_config("phantom", overrides={"infer": {"roi_size": [32, 32, 32]}})
    net = build_network(cfg).eval()
    x = torch.randn(1, 3, 30, 32, 28)
    with torch.no_grad():
        got = NetworkInferer(cfg.infer, fused_only=fused_only, mirror_axes=(0, 2))(x, net)
        plain = NetworkInferer(cfg.infer, fused_only=fused_only)
        expected = {}
        for dims in ([], [2], [4], [2, 4]):  # the identity and every combination of the two axes
            out = plain(torch.flip(x, dims), net)
            for k, v in (out.items() if isinstance(out, dict) else [("fused", out)]):
                expected[k] = expected.get(k, 0) + torch.softmax(torch.flip(v, dims), 1) / 4
    got = got if isinstance(got, dict) else {"fused": got}
    assert sorted(got) == sorted(expected) == (["fused"] if fused_only else ["ct", "fused", "mr", "pet"])
    for k in expected:
        assert tuple(got[k].shape) == (1, 4, 30, 32, 28)
        torch.testing.assert_close(torch.softmax(got[k], 1), expected[k], rtol=1e-4, atol=1e-5)
    # an untrained net is not mirror-symmetric: the average differs from a single pass
    single = plain(x, net)
    single = single if isinstance(single, dict) else {"fused": single}
    assert (torch.softmax(single["fused"], 1) - expected["fused"]).abs().max() > 1e-3


def test_infer_requests_set_the_sliding_windows_overlap_and_batch():
    """``overlap`` / ``sw_batch_size`` of an infer request reach the sliding window (the preset's were used whatever
    the request said); on a case larger than one window more overlap gives other, smoother logits."""
    from crossmodal.serving.infer import CrossModalInfer

    cfg = load_config("phantom", overrides={"infer": {"roi_size": [16, 16, 16]}})
    net = build_network(cfg).eval()
    task = CrossModalInfer(cfg, net, [], "test")
    assert task.config()["overlap"] == 0.25 and task.config()["sw_batch_size"] == 2  # the viewers' options
    default = task.inferer({})
    asked = task.inferer({"overlap": 0.75, "sw_batch_size": 4})
    assert (default.window.overlap, default.window.sw_batch_size) == (0.25, 2)
    assert (asked.window.overlap, asked.window.sw_batch_size) == (0.75, 4)
    x = torch.randn(1, 3, 40, 24, 16)  # 3 x 2 x 1 windows at 0.25, 7 x 3 x 1 at 0.75
    with torch.no_grad():
        a, b = default(x, net)["fused"], asked(x, net)["fused"]
        same = task.inferer({"overlap": None, "sw_batch_size": None})(x, net)["fused"]
    assert a.shape == b.shape == (1, 4, 40, 24, 16) and not torch.allclose(a, b, atol=1e-4)
    assert torch.equal(same, a)  # null: the preset's
    one = task.inferer({"sw_batch_size": 1})(x, net)["fused"]  # a window a pass: the same logits, to rounding
    torch.testing.assert_close(one, a, rtol=1e-4, atol=1e-4)


def test_the_infer_writer_leaves_no_temp_file_when_the_write_fails(tmp_path: Path, monkeypatch):
    """The label map goes to a temp file MONAI Label sends and removes; a write that fails (a full disk) left that
    file behind, empty, in the temp folder (until 2026-12-07): one more at each failed request of a server."""
    import tempfile

    from crossmodal.serving import infer
    from monai.data import MetaTensor

    cfg = load_config("phantom")
    task = infer.CrossModalInfer(cfg, build_network(cfg).eval(), [], "test")
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    label = np.zeros((6, 5, 4), np.uint8)
    label[1:3, 2:4, 1] = 2
    data = {task.output_label_key: MetaTensor(torch.as_tensor(label), affine=torch.diag(torch.tensor([2.0, 2, 2, 1])))}
    path, _ = task.writer(data)  # written: the label map, on its grid
    assert Path(path).parent == temp and path.endswith(".nii.gz")
    written = load_volume(path)
    np.testing.assert_array_equal(written[0].numpy(), label)
    assert np.allclose(written.affine.numpy(), np.diag([2.0, 2, 2, 1]))
    Path(path).unlink()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(infer, "save_volume", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        task.writer(data)
    assert sorted(temp.iterdir()) == []


def _sagittal(src: Path, dst: Path) -> None:
    """``src`` (a RAS-stored volume) rewritten as a sagittally acquired series stores it, array axes (I, A, R): the
    same voxels in space."""
    from crossmodal.io import save_volume

    vol = load_volume(src)
    a, affine = vol[0].numpy(), vol.affine.double().numpy()
    b = np.transpose(a, (2, 1, 0))[::-1]  # b[p, j, q] = a[q, j, K - 1 - p]
    perm = np.zeros((4, 4))
    perm[0, 2] = perm[1, 1] = perm[2, 0] = perm[3, 3] = 1.0
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, b.shape[0] - 1
    save_volume(dst, np.ascontiguousarray(b), affine @ perm @ flip)


def _ras_and_sagittal(tmp_path: Path, cfg, dense: int, sparse: int) -> tuple[Path, Path, list[dict]]:
    """A one-case phantom studies folder (``ras``), its copy with the image and label stored sagittally (``sag``), and
    the case of each as training loads it."""
    import shutil

    ras = make_phantom_studies(tmp_path / "ras", cfg, cases=1, dense=dense, sparse=sparse, seed=3)
    sag = tmp_path / "sag"
    shutil.copytree(ras, sag)
    for path in (sag / "phantom000.nii.gz", sag / "labels" / "final" / "phantom000.nii.gz"):
        _sagittal(path, path)
    loaded = [LoadCased(cfg)({"image": str(s / "phantom000.nii.gz"), "label": str(s / "labels" / "final" /
                                                                                   "phantom000.nii.gz")})
              for s in (ras, sag)]
    return ras, sag, loaded


def test_a_case_stored_in_another_axis_order_is_read_and_segmented_as_in_ras(tmp_path: Path):
    """The network saw a sagittally stored series in that array order, not its training cases' (RAS): the demo's
    brain011 so stored lost 8.6 CSF Dice points. Cases now reach the network in the closest RAS order (exactly: a
    permutation and flips), and the segmentation goes back to the series' own grid."""

    from crossmodal.cli import main
    from crossmodal.serving.train import plain

    cfg = load_config("phantom")
    ras, sag, loaded = _ras_and_sagittal(tmp_path, cfg, dense=0, sparse=1)  # scribbles
    assert torch.equal(plain(loaded[0]["image"]), plain(loaded[1]["image"]))  # the same array for the network
    assert torch.equal(plain(loaded[0]["label"]), plain(loaded[1]["label"]))  # and the same training label
    assert torch.allclose(loaded[0]["image"].affine.double(), loaded[1]["image"].affine.double(), atol=1e-5)
    model = Path(__file__).parents[1] / "apps" / "crossmodal" / "pretrained" / "phantom_crossmodal.pt"
    for s in (ras, sag):
        assert main(["predict", "--studies", str(s), "--config", "phantom", "--model", str(model), "--out",
                     str(tmp_path / f"pred_{s.name}")]) == 0
    first, second = (load_volume(tmp_path / f"pred_{s}" / "phantom000.nii.gz") for s in ("ras", "sag"))
    assert torch.allclose(second.affine.double(), load_volume(sag / "phantom000.nii.gz").affine.double())
    back = np.transpose(second[0].numpy()[::-1], (2, 1, 0))  # onto the RAS file's array order
    assert np.array_equal(back, first[0].numpy()) and len(np.unique(back)) == 4
    # the scribbles grown as training grows them, written on the series' own grid
    for s in (ras, sag):
        assert main(["propagate", "--studies", str(s), "--config", "phantom", "--out", str(tmp_path / f"grown_{s.name}")
                     ]) == 0
    first, second = (load_volume(tmp_path / f"grown_{s}" / "phantom000.nii.gz") for s in ("ras", "sag"))
    assert torch.allclose(second.affine.double(), load_volume(sag / "phantom000.nii.gz").affine.double())
    back = np.transpose(second[0].numpy()[::-1], (2, 1, 0))
    assert np.array_equal(back, first[0].numpy()) and len(np.unique(back)) >= 4


def test_the_working_spacing_and_the_weights_record_lie_along_the_ras_axes(tmp_path: Path):
    """``data.spacing`` and the voxel size a model records were put on the primary's stored array axes, while the
    network sees every case in RAS order: an anisotropic preset resampled a sagittally stored case with its thick axis
    left-right instead of down-up, and under a null spacing, weights recording 2 x 2 x 3 mm resampled a sagittal
    case of those very voxels (array sizes 3, 2, 2) to the wrong ones. Both are sizes along R, A, S now."""

    from crossmodal.io import header_spacing, voxel_mm
    from crossmodal.serving.train import plain
    from crossmodal.transforms import working_spacing

    cfg = load_config("phantom", overrides={"data": {"spacing": [2.0, 2.0, 3.0]}})
    ras, sag, loaded = _ras_and_sagittal(tmp_path, cfg, dense=1, sparse=0)
    for d in loaded:  # 96 mm: 48 x 48 x 32 voxels of 2 x 2 x 3 mm, the thick axis down-up
        assert tuple(d["image"].shape) == (3, 48, 48, 32) and voxel_mm(d["image"].affine) == [2.0, 2.0, 3.0]
    torch.testing.assert_close(plain(loaded[1]["image"]), plain(loaded[0]["image"]), atol=1e-4, rtol=0)
    assert torch.equal(plain(loaded[0]["label"]), plain(loaded[1]["label"]))
    # a sagittal series of 2 x 2 x 3 mm voxels (array axes I, A, R: 3, 2, 2 mm) and weights recording 2 x 2 x 3 mm
    primary = load_volume(sag / "phantom000.nii.gz")
    thick = MetaTensor(primary.as_tensor(), affine=primary.affine @ torch.diag(torch.tensor([1.5, 1.0, 1.0, 1.0],
                                                                                            dtype=torch.float64)))
    assert voxel_mm(thick.affine) == [2.0, 2.0, 3.0]
    null = load_config("phantom", overrides={"data": {"spacing": None, "weights_spacing": [2.0, 2.0, 3.0]}})
    assert working_spacing(thick, null) is None  # its own voxels: left as they are
    assert working_spacing(primary, null) == (3.0, 2.0, 2.0)  # 2 mm all round: the I axis to 3 mm
    assert working_spacing(primary, cfg) == (3.0, 2.0, 2.0) and working_spacing(load_volume(ras / "phantom000.nii.gz"),
                                                                                cfg) == (2.0, 2.0, 3.0)
    # the headers read as the network sees the case (training's record and its mixed-size warning read them)
    save_volume(tmp_path / "thick.nii.gz", thick[0].numpy(), thick.affine.numpy())
    save_volume(tmp_path / "thick.nrrd", thick[0].numpy(), thick.affine.numpy())
    save_volume(tmp_path / "thick.mha", thick[0].numpy(), thick.affine.numpy())
    for ext in ("nii.gz", "nrrd", "mha"):
        assert header_spacing(tmp_path / f"thick.{ext}") == pytest.approx((2.0, 2.0, 3.0)), ext


def test_a_modality_covering_part_of_the_case_is_used_where_it_has_data(tmp_path: Path, capsys):
    """A secondary modality on part of the grid (zeros beyond its field of view) threw the network off everywhere,
    its own field of view included: the phantom with its MR on 48% of the grid fell from 0.93 to 0.74 mean Dice,
    below the 0.93 it has without the MR. Now the case runs twice, with the MR where it has data (its edge values
    carried outward) and without it, and each voxel takes the pass that fits it; training and scoring leave it out."""
    import shutil

    from crossmodal.cli import main
    from crossmodal.io import find_case
    from crossmodal.transforms import load_case

    cfg = load_config("phantom")
    full = make_phantom_studies(tmp_path / "full", cfg, cases=3, dense=0, sparse=0, seed=11)
    part = tmp_path / "part"
    shutil.copytree(full, part)
    for mr in sorted((part / "modalities").glob("*/mr.nii.gz")):
        crop_slab(mr, 0.5)
    image, used = load_case(find_case(part / "phantom000.nii.gz", cfg.modality_names), cfg)
    assert used == ["ct", "pet", "mr"] and 0.4 < image.meta["coverage"]["mr"] < 0.6
    assert image.meta["coverage"]["pet"] > 0.95 and sorted(image.meta["fov"]) == ["mr"]
    inside = image.meta["fov"]["mr"]
    assert inside.shape == image.shape[1:]
    assert float(inside.float().mean()) == pytest.approx(image.meta["coverage"]["mr"], abs=1e-4)
    assert float(image[2][~inside].abs().mean()) > 0.1  # the edge carried outward, not zeros
    infer = LoadCased(cfg)({"image": str(part / "phantom000.nii.gz")})
    assert infer["present"].tolist() == [True, True, True] and torch.equal(infer["fov"][2], inside)
    assert infer["fov"][:2] == [None, None]
    from crossmodal.serving.app import AppParts

    parts = AppParts.from_conf(str(APP), {"preset": "phantom", "model_dir": str(tmp_path / "m")})
    tasks = {m.name: parts.infer(m) for m in parts.models}
    assert tasks["crossmodal"].inferer(infer).fov is not None  # two passes
    assert tasks["baseline_unet"].inferer(infer).fov is None  # early fusion cannot leave a modality out: one pass
    train = LoadCased(cfg, partial="leave_out")({"image": str(part / "phantom000.nii.gz")})
    assert train["present"].tolist() == [True, True, False] and "fov" not in train
    assert not bool(train["image"][2].any()) and torch.equal(train["image"][:2], infer["image"][:2])
    assert preprocessing(cfg, "val")({"image": str(part / "phantom000.nii.gz")})["present"].tolist() == [True, True,
                                                                                                       False]

    model = Path(__file__).parents[1] / "apps" / "crossmodal" / "pretrained" / "phantom_crossmodal.pt"
    runs = {"full": (full, []), "part": (part, []), "without": (part, ["--drop", "mr"])}
    for name, (studies, extra) in runs.items():
        capsys.readouterr()
        assert main(["predict", "--studies", str(studies), "--config", "phantom", "--model", str(model), "--out",
                     str(tmp_path / f"pred_{name}"), *extra]) == 0
        printed = capsys.readouterr().out
        assert ("mr on 4" in printed and "% of the grid: used where it has data" in printed) == (name == "part")
    scores = {}
    for name in runs:
        per_case = []
        for case in ("phantom000", "phantom001", "phantom002"):
            truth = load_volume(full / "truth" / f"{case}.nii.gz")[0].numpy()
            pred = load_volume(tmp_path / f"pred_{name}" / f"{case}.nii.gz")[0].numpy()
            per_case.append(np.mean([dice(pred, truth, k) for k in (1, 2, 3)]))
        scores[name] = float(np.mean(per_case))
    assert scores["full"] > 0.9 and scores["without"] > 0.88
    # 0.915 here; 0.890 with the MR read everywhere (edge-filled), 0.868 with two passes but zeros beyond it (the
    # phantom's MR adds little:
    # the brain's T2 on half the grid gives 0.811 this way, 0.770 read everywhere, 0.774 left out)
    assert scores["part"] > scores["without"] - 0.02, scores


def test_the_shipped_presets_resample_a_case_of_another_voxel_size_to_their_weights(tmp_path: Path, caplog, capsys):
    """The committed weights were trained at 2 mm; with ``data.spacing`` null a case of 1 mm voxels reached the network
    at its own scale (the phantom's cases resampled to 1 mm: 0.39 mean Dice, 0.93 at 2 mm). The presets now work at
    2 mm: such a case is resampled to it, its labels back onto its own 1 mm grid. And weights that record the voxel
    size they were trained at (every training run's since) bring it with them to a preset that sets none."""
    from crossmodal.cli import main
    from crossmodal.config import save_config
    from crossmodal.data.phantom import make_phantom
    from crossmodal.data.studies import generate
    from crossmodal.nets import record_voxel_mm, weights_voxel_mm

    cfg = load_config("phantom")
    assert cfg.data.spacing == (2.0, 2.0, 2.0) and load_config("brain").data.spacing == (2.0, 2.0, 2.0)
    generate(tmp_path / "fine", cfg, lambda rng: make_phantom(cfg, rng, size=96, spacing=1.0), 2, 9, "phantom")
    save_config(load_config("phantom", overrides={"data": {"spacing": None}}), tmp_path / "null.yaml")
    model = Path(__file__).parents[1] / "apps" / "crossmodal" / "pretrained" / "phantom_crossmodal.pt"
    assert weights_voxel_mm(model) is None  # committed before the record: as a preset with null spacing had it
    net = build_network(load_config(str(tmp_path / "null.yaml")))
    net.load_state_dict(torch.load(model, weights_only=True))
    record_voxel_mm(net, (2.0, 2.0, 2.0))  # what its training would have recorded
    torch.save(net.state_dict(), tmp_path / "recorded.pt")
    assert weights_voxel_mm(tmp_path / "recorded.pt") == (2.0, 2.0, 2.0)
    transforms._RESAMPLED.clear()  # said once per case and size in a process
    scores = {}
    save_config(load_config("phantom", overrides={"data": {"spacing": [1.0, 1.0, 1.0]}}), tmp_path / "one.yaml")
    runs = {"phantom": ("phantom", model), "null": (str(tmp_path / "null.yaml"), model),
            "recorded": (str(tmp_path / "null.yaml"), tmp_path / "recorded.pt"),
            "one": (str(tmp_path / "one.yaml"), tmp_path / "recorded.pt")}  # a preset edited since: 1 mm
    for name, (config, weights) in runs.items():
        out = tmp_path / name
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert main(["predict", "--studies", str(tmp_path / "fine"), "--config", config, "--model", str(weights),
                         "--out", str(out)]) == 0
        said = "case 'phantom000': voxels of 1 x 1 x 1 mm, and the model was trained at 2 x 2 x 2 mm (data.spacing " \
            "not set): resampled to it, the labels back onto the case's grid"
        assert (said in caplog.text) == (name == "recorded"), caplog.text[-2000:]
        told = (f"the preset's data.spacing is 1 x 1 x 1 mm and the model {tmp_path / 'recorded.pt'} was trained at 2 "
                "x 2 x 2 mm: cases are segmented at 2 x 2 x 2 mm, its own; a training run trains at data.spacing (set "
                "it to [2.0, 2.0, 2.0] to keep the model's)")
        assert (told in caplog.text) == (name == "one"), caplog.text[-2000:]
        printed = capsys.readouterr().out  # predict's line of each case says at what voxel size it was segmented
        assert printed.count("; 1 x 1 x 1 mm voxels, segmented at 2 x 2 x 2 mm) -> ") == 2 * (name != "null"), printed
        report = json.loads((out / "predictions.json").read_text())["per_case"][0]
        assert report["voxel_mm"] == {"case": [1.0, 1.0, 1.0], "network": [1.0 + (name != "null")] * 3}
        per_case = []
        for case in ("phantom000", "phantom001"):
            truth = load_volume(tmp_path / "fine" / "truth" / f"{case}.nii.gz")
            pred = load_volume(out / f"{case}.nii.gz")
            assert pred.shape == truth.shape == (1, 96, 96, 96) and torch.allclose(pred.affine, truth.affine)
            per_case.append(np.mean([dice(pred[0].numpy(), truth[0].numpy(), k) for k in (1, 2, 3)]))
        scores[name] = float(np.mean(per_case))
    assert scores["phantom"] > 0.85 and scores["null"] < 0.7, scores
    assert scores["recorded"] == pytest.approx(scores["phantom"], abs=1e-4), scores  # the same resampling
    assert scores["one"] == pytest.approx(scores["phantom"], abs=1e-4), scores  # at 1 mm before: 0.37


def test_a_model_is_served_at_the_ct_window_it_records_and_refused_under_another_kind(tmp_path: Path, caplog):
    """The phantom's model was trained at CT window -150..250: under a preset edited to -1000..1000 it segmented the
    cases at that window, silently (this test's 2 cases: 0.590 mean Dice, 0.931 at its own). Weights now record each
    modality's kind, input channel and CT window, and each class's value: served at their windows, said once; refused
    where a modality is another kind, where an early-fusion model would take its channels in another order (the
    cross-modal net takes them by name), or where two classes swapped values."""
    import dataclasses

    from crossmodal.cli import main
    from crossmodal.config import save_config
    from crossmodal.nets import ModelFileError, check_weights, classes_of, record_preset, weights_windows
    from crossmodal.serving import infer
    from crossmodal.serving.train import CrossModalTrain

    cfg = load_config("phantom")
    studies = make_phantom_studies(tmp_path / "s", cfg, cases=2, dense=0, sparse=0, seed=123)
    committed = APP / "pretrained" / "phantom_crossmodal.pt"
    assert weights_windows(committed) == {}  # committed before the record: served at the preset's, as before
    net = build_network(cfg)
    net.load_state_dict(torch.load(committed, weights_only=True))
    record_preset(net, cfg)  # what its training would have recorded
    torch.save(net.state_dict(), tmp_path / "recorded.pt")
    assert weights_windows(tmp_path / "recorded.pt") == {"ct": (-150.0, 250.0)}
    wide = dataclasses.replace(cfg, modalities=[dataclasses.replace(cfg.modalities[0], window=(-1000.0, 1000.0)),
                                                *cfg.modalities[1:]])
    save_config(wide, tmp_path / "wide.yaml")
    # the cross-modal net takes its modalities by name: a preset listing them in another order serves it as before
    save_config(dataclasses.replace(wide, modalities=[wide.modalities[0], wide.modalities[2], wide.modalities[1]]),
                tmp_path / "reordered.yaml")
    infer._TOLD.clear()  # said once per model and windows in a process
    scores = {}
    runs = {"phantom": ("phantom", committed), "wide": (str(tmp_path / "wide.yaml"), committed),
            "recorded": (str(tmp_path / "wide.yaml"), tmp_path / "recorded.pt"),
            "reordered": (str(tmp_path / "reordered.yaml"), tmp_path / "recorded.pt")}
    for name, (config, weights) in runs.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert main(["predict", "--studies", str(studies), "--config", config, "--model", str(weights), "--out",
                         str(tmp_path / name)]) == 0
        told = (f"the model {tmp_path / 'recorded.pt'} was trained at other CT windows than the preset's (ct window "
                "-1000..1000 in the preset, -150..250 in the model): cases are segmented at the model's; a training "
                "run trains at the preset's (set them to the model's to keep them)")
        assert caplog.text.count(told) == (name == "recorded"), caplog.text[-2000:]  # once, not again reordered
        scores[name] = float(np.mean([dice(load_volume(tmp_path / name / f"{c}.nii.gz")[0].numpy(),
                                           load_volume(studies / "truth" / f"{c}.nii.gz")[0].numpy(), k)
                                      for c in ("phantom000", "phantom001") for k in (1, 2, 3)]))
    assert scores["phantom"] > 0.85 and scores["wide"] < scores["phantom"] - 0.2, scores
    assert scores["recorded"] == pytest.approx(scores["phantom"], abs=1e-4), scores
    assert scores["reordered"] == pytest.approx(scores["phantom"], abs=1e-4), scores
    # a training run under the wide preset holds itself to that model segmenting at its own window
    task = CrossModalTrain(wide, str(tmp_path / "m"), str(tmp_path / "m" / "x.pt"), None, "")
    assert task.beside_config(str(tmp_path / "recorded.pt")).modalities[0].window == (-150.0, 250.0)
    assert task.beside_config(str(committed)) is wide
    # a modality of another kind than the model's: refused, naming it
    mr = dataclasses.replace(cfg, modalities=[dataclasses.replace(cfg.modalities[0], kind="mr"), *cfg.modalities[1:]])
    with pytest.raises(ModelFileError) as e:
        check_weights(mr, str(tmp_path / "recorded.pt"))
    assert str(e.value) == (f"model {tmp_path / 'recorded.pt'}: was trained on ct of kind ct and preset 'phantom' has "
                            "ct of kind mr: another preset's model? Pick the matching --config (server: preset), or "
                            "train a new one")
    # early fusion takes its inputs by channel: another order is refused; a renamed modality's record is let go
    early = load_config("phantom", overrides={"model": {"name": "baseline_unet"}})
    base = build_network(early)
    base.load_state_dict(torch.load(APP / "pretrained" / "phantom_baseline_unet.pt", weights_only=True))
    record_preset(base, early)
    torch.save(base.state_dict(), tmp_path / "early.pt")
    check_weights(early, str(tmp_path / "early.pt"))
    swapped = dataclasses.replace(early, modalities=[early.modalities[0], early.modalities[2], early.modalities[1]])
    with pytest.raises(ModelFileError) as e:
        check_weights(swapped, str(tmp_path / "early.pt"))
    assert str(e.value) == (f"model {tmp_path / 'early.pt'}: baseline_unet was trained on its inputs in the order "
                            "ct, pet, mr and preset 'phantom' gives them as ct, mr, pet: list the modalities in the "
                            "model's order, or train a new one")
    renamed = dataclasses.replace(early, modalities=[*early.modalities[:2],
                                                     dataclasses.replace(early.modalities[2], name="t1")])
    check_weights(renamed, str(tmp_path / "early.pt"))
    build_network(renamed).load_state_dict(torch.load(tmp_path / "early.pt", weights_only=True))
    # the classes by value: two swapped would save each one's voxels under the other's name; a renamed one is let go
    assert classes_of(torch.load(tmp_path / "early.pt", weights_only=True)) == {
        "background": 0, "organ": 1, "lesion": 2, "vessel": 3}
    exchanged = load_config("phantom", overrides={"labels": {"classes": {
        "background": 0, "organ": 1, "lesion": 3, "vessel": 2}}})
    with pytest.raises(ModelFileError) as e:
        check_weights(exchanged, str(tmp_path / "recorded.pt"))
    assert str(e.value) == (f"model {tmp_path / 'recorded.pt'}: was trained with lesion = 2, vessel = 3 and preset "
                            "'phantom' has lesion = 3, vessel = 2: its labels would be saved under the wrong names. "
                            "Give the classes the model's values, or train a new one")
    # another number of classes: said as such, not as weights of another shape
    fewer = load_config("phantom", overrides={"labels": {"classes": {"background": 0, "organ": 1, "lesion": 2}}})
    with pytest.raises(ModelFileError) as e:
        check_weights(fewer, str(tmp_path / "recorded.pt"))
    assert str(e.value) == (f"model {tmp_path / 'recorded.pt'}: segments 4 classes (background, organ, lesion, "
                            "vessel) and preset 'phantom' has 3 (background, organ, lesion): train a new one with "
                            "this preset, or pick the preset the model was trained with (--config; server: preset)")
    liver = load_config("phantom", overrides={"labels": {"classes": {
        "background": 0, "liver": 1, "lesion": 2, "vessel": 3}}})
    check_weights(liver, str(tmp_path / "recorded.pt"))
    build_network(liver).load_state_dict(torch.load(tmp_path / "recorded.pt", weights_only=True))


def test_weights_without_the_records_load_without_monai_labels_warnings(tmp_path: Path, caplog):
    """The committed weights (saved before the voxel-size, input and class records existed) drew MONAI Label's
    "Checkpoint keys don't match network.state_dict()! ..." and "The run will now continue unless load_strict is
    set to True ... please check the loaded weights" at every model load (the server's log, each `predict` and
    `evaluate`): they load, strictly, with the records as not known. A key the network does not have is still warned
    of, and stops the load."""
    from crossmodal.serving.app import AppParts

    committed = APP / "pretrained" / "phantom_crossmodal.pt"
    state = torch.load(committed, weights_only=True)
    assert "voxel_mm" not in state and not any(k.startswith(("inputs.", "classes.")) for k in state)
    parts = AppParts.from_conf(str(APP), {"preset": "phantom", "model_dir": str(tmp_path / "m")})
    task = parts.infer()
    assert task.get_path() == str(committed)
    with caplog.at_level(logging.WARNING):
        network = task._get_network("cpu", {})
    assert "Checkpoint keys" not in caplog.text and "load_strict" not in caplog.text, caplog.text
    assert all(torch.equal(network.state_dict()[k], v) for k, v in state.items())
    stray = tmp_path / "stray.pt"
    torch.save({**state, "stray.weight": torch.zeros(1)}, stray)
    task.path = [str(stray)]
    task._networks.clear()
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: "
                                                                            r"\"stray.weight\""):
        task._get_network("cpu", {})
    assert "Checkpoint keys don't match network.state_dict()!" in caplog.text and "'stray.weight'" in caplog.text
    assert "The run will now continue unless load_strict is set to True" in caplog.text


def test_largest_component_clean_up_drops_islands_of_the_named_classes_and_of_the_foreground():
    """``infer.largest_component``: grey matter kept to its largest component, then every foreground class as one
    (a CSF island away from the rest goes); a name that is no foreground class is refused, naming the choices."""
    from crossmodal.config import ConfigError
    from crossmodal.serving.infer import CrossModalInfer

    lab = torch.zeros(12, 12, 12, dtype=torch.long)
    lab[1:5, 1:5, 1:5] = 1  # grey matter: a block of 64 voxels
    lab[5:7, 1:5, 1:5] = 2  # white matter touching it
    lab[7:9, 1:3, 1:3] = 1  # a grey matter island of 8 touching the white matter, not the block
    lab[10:12, 1:3, 10:12] = 3  # a CSF island of 8 away from the rest
    logits = MetaTensor(torch.nn.functional.one_hot(lab, 4).permute(3, 0, 1, 2).float(), affine=torch.eye(4))
    image = MetaTensor(torch.zeros(3, 12, 12, 12), affine=torch.eye(4))

    def labels(keep: list[str]) -> torch.Tensor:
        cfg = load_config("brain", overrides={"infer": {"largest_component": keep}})
        (post,) = CrossModalInfer(cfg, build_network(cfg).eval(), [], "test").post_transforms()
        return post({"pred": {"fused": logits}, "image": image})["pred"].as_tensor().long()

    assert torch.equal(labels([]), lab)  # the default: the map as the network gives it
    grey_island, csf_island = lab.clone(), lab.clone()
    grey_island[7:9, 1:3, 1:3] = 0
    csf_island[10:12, 1:3, 10:12] = 0
    assert torch.equal(labels(["grey_matter"]), grey_island)
    assert torch.equal(labels(["foreground"]), csf_island)  # the grey island is part of the largest foreground
    assert torch.equal(labels(["grey_matter", "foreground"]), grey_island * (csf_island > 0))
    with pytest.raises(ConfigError, match=r"infer.largest_component: \['gray_matter'\] must be among \['foreground', "
                                          r"'grey_matter', 'white_matter', 'csf'\]"):
        load_config("brain", overrides={"infer": {"largest_component": ["gray_matter"]}})
    # per infer request (the viewers' option, shown with the preset's default), checked before anything is read
    from fastapi import HTTPException

    cfg = load_config("brain", overrides={"infer": {"largest_component": ["grey_matter"]}})
    task = CrossModalInfer(cfg, build_network(cfg).eval(), [], "test")
    assert task.config()["largest_component"] == "grey_matter"

    def asked(value: object) -> torch.Tensor:
        (post,) = task.post_transforms({"largest_component": value})
        return post({"pred": {"fused": logits}, "image": image})["pred"].as_tensor().long()

    assert torch.equal(asked("none"), lab) and torch.equal(asked([]), lab)
    assert torch.equal(asked("foreground"), csf_island) and torch.equal(asked(None), grey_island)
    assert task.check_request({"image": "/d/brain003.nii.gz", "largest_component": "csf, foreground"}
                              )["largest_component"] == ["csf", "foreground"]
    with pytest.raises(HTTPException) as e:
        task.check_request({"image": "/d/brain003.nii.gz", "largest_component": "grey_matter,liver"})
    assert e.value.status_code == 422 and e.value.detail == (
        "case 'brain003': largest_component: ['liver'] must be among ['foreground', 'grey_matter', 'white_matter', "
        "'csf'] (or none)")
