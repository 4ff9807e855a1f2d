"""Scribble propagation by the multi-channel random walker: hand-built volumes, the coarse-grid path, the training
transform on a real phantom case (scribbles -> most of the case, checked against the truth)."""

import shutil
from pathlib import Path

import crossmodal.propagate as propagate_mod
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SPM_DIR, make_phantom_studies, snapshot
from crossmodal.config import ConfigError, CrossModalConfig, load_config
from crossmodal.io import write_cached_label
from crossmodal.labels import IGNORE_INDEX
from crossmodal.propagate import PropagationCache, heldout_accuracy, propagate_labels, refine_segmentation
from crossmodal.serving.offline import method_config
from crossmodal.transforms import LoadCased, PropagateSparseLabeld, preprocessing
from monai.data import CacheDataset, MetaTensor


def _tube() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(2, 24, 24, 24) image: a bright tube (radius 2) along z in channel 0, channel 1 flat (noise only); its truth; and
    scribbles: one line down the tube's axis (class 1), one background line far from it (class 0)."""
    g = torch.Generator().manual_seed(0)
    xx, yy = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    tube = ((xx - 8) ** 2 + (yy - 10) ** 2 <= 4).unsqueeze(-1).expand(24, 24, 24)
    image = torch.stack([tube.float() + 0.05 * torch.randn(24, 24, 24, generator=g),
                         0.05 * torch.randn(24, 24, 24, generator=g)])
    target = torch.full((1, 24, 24, 24), float(IGNORE_INDEX))
    target[0, 8, 10, 2:22] = 1
    target[0, 18, 4:20, 12] = 0
    return image, target, tube.long()


def test_a_line_inside_a_tube_labels_the_whole_tube():
    image, target, truth = _tube()
    out = propagate_labels(image, target, beta=130, threshold=0.9)[0].long()
    assert out.shape == truth.shape and out.dtype == torch.long
    drawn = target[0] != IGNORE_INDEX
    assert torch.equal(out[drawn], target[0][drawn].long())  # the drawn voxels stay as drawn
    labelled = out != IGNORE_INDEX
    assert labelled.float().mean() > 0.9  # 36 drawn voxels of 13824 -> most of the volume
    assert bool((out[labelled] == truth[labelled]).all())  # and nothing mislabelled
    tube = truth.bool()
    assert (out[tube] == 1).float().mean() > 0.9  # the tube, drawn on 20 of its 13 x 24 voxels, is filled


def test_coarse_grid_path_keeps_the_drawn_voxels_and_the_halves():
    img = torch.zeros(1, 16, 16, 16)
    img[:, 8:] = 1.0
    t = torch.full((1, 16, 16, 16), float(IGNORE_INDEX))
    t[0, 2, 8, 3:13] = 0
    t[0, 13, 8, 3:13] = 1
    t[0, 7, 5, 5] = 0  # beside the edge, in the same coarse voxel as nothing else
    out = propagate_labels(img, t, max_voxels=1000)[0]  # 4096 voxels -> grid coarsened by 2 per axis
    assert bool((out[:7] == 0).all()) and bool((out[9:] == 1).all())
    assert out[7, 5, 5] == 0 and bool((out[t[0] != IGNORE_INDEX] == t[0][t[0] != IGNORE_INDEX]).all())


@pytest.mark.parametrize("fill", ["one_class", "dense"])
def test_nothing_to_propagate_returns_the_label_unchanged(fill):
    image, target, truth = _tube()
    if fill == "one_class":  # a single class drawn would claim the whole case
        target[target == 0] = IGNORE_INDEX
    else:
        target = truth[None].float()
    assert torch.equal(propagate_labels(image, target), target)


def test_transform_grows_sparse_labels_of_a_phantom_case_only(tmp_path: Path, phantom_cfg: CrossModalConfig):
    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=2, dense=1, sparse=1, seed=5)
    load = LoadCased(phantom_cfg)
    sparse = load({"image": str(studies / "phantom001.nii.gz"), "label_kind": "sparse",
                   "label": str(studies / "labels" / "final" / "phantom001.nii.gz")})
    truth = load({"image": str(studies / "phantom001.nii.gz"),
                  "label": str(studies / "truth" / "phantom001.nii.gz")})["label"][0].long()
    before = sparse["label"]
    grown = PropagateSparseLabeld(phantom_cfg)(sparse)["label"]
    assert isinstance(grown, MetaTensor) and torch.equal(grown.affine, before.affine)
    drawn, labelled = before[0] != IGNORE_INDEX, grown[0] != IGNORE_INDEX
    assert drawn.float().mean() < 0.06 and labelled.float().mean() > 0.95  # ~4 % drawn -> nearly all labelled
    assert (grown[0][labelled].long() == truth[labelled]).float().mean() > 0.99
    vessel = truth == phantom_cfg.labels.classes["vessel"]
    assert (grown[0][vessel] == 3).float().mean() > 0.9 > 0.3 > (before[0][vessel] == 3).float().mean()
    dense = {"image": sparse["image"], "label": truth[None].float(), "label_kind": "dense"}
    assert PropagateSparseLabeld(phantom_cfg)(dense)["label"] is dense["label"]  # dense labels pass unchanged
    off = load_config("phantom", overrides={"train": {"propagate": {"method": "none"}}})
    assert PropagateSparseLabeld(off)(sparse)["label"] is before


def test_propagation_config_and_the_baselines():
    assert method_config("phantom", "ours").train.propagate.method == "random_walker"
    assert method_config("phantom", "baseline_unet").train.propagate.method == "none"  # nnU-Net's ignore label
    assert method_config("phantom", "single_ct").train.propagate.method == "none"
    given = method_config("phantom", "baseline_unet", {"train": {"propagate": {"method": "random_walker"}}})
    assert given.train.propagate.method == "random_walker"  # overrides win (bench: baseline_unet+propagation)
    assert load_config("brain").train.propagate.method == "none"  # measured: the walker's brain labels hurt
    # stroke transfer likewise: the preset's for ours, the drawn strokes alone for the baselines unless overridden
    assert method_config("brain", "ours").train.consistency.atlas_sparse == 6
    assert method_config("brain", "baseline_unet").train.consistency.atlas_sparse == 0
    assert method_config("brain", "single_t2").train.consistency.atlas_sparse == 0
    transfer = {"train": {"consistency": {"atlas_sparse": 6}}}  # bench: baseline_unet+transfer
    assert method_config("brain", "baseline_unet", transfer).train.consistency.atlas_sparse == 6
    with pytest.raises(ConfigError, match=r"train.propagate.method: 'graphcut' is not one of"):
        CrossModalConfig.from_dict({"train": {"propagate": {"method": "graphcut"}}})
    with pytest.raises(ConfigError, match=r"train.propagate.threshold: 0.4 must be in \[0.5, 1\]"):
        CrossModalConfig.from_dict({"train": {"propagate": {"threshold": 0.4}}})
    with pytest.raises(ConfigError, match=r"train.propagate.min_heldout_accuracy: 1.5 must be in \[0, 1\]"):
        CrossModalConfig.from_dict({"train": {"propagate": {"min_heldout_accuracy": 1.5}}})
    assert np.isclose(CrossModalConfig.from_dict({"train": {"propagate": {"beta": 50}}}).train.propagate.beta, 50)


def test_cache_walks_each_label_once_and_replaces_a_changed_one(tmp_path: Path, monkeypatch, caplog):
    calls: list[int] = []
    real = propagate_mod.propagate_labels
    monkeypatch.setattr(propagate_mod, "propagate_labels", lambda *a, **k: calls.append(1) or real(*a, **k))
    image, target, _ = _tube()
    cache = PropagationCache(tmp_path / "cache")
    first, hit = cache.propagate("case/7", image, target)
    again, hit_again = cache.propagate("case/7", image, target)
    assert (hit, hit_again, len(calls)) == (False, True, 1) and torch.equal(first, again)
    files = list((tmp_path / "cache").iterdir())
    assert [f.name.split(".")[0] for f in files] == ["case_7"] and torch.equal(first, propagate_labels(image, target))
    edited = target.clone()
    edited[0, 2, 2, 2] = 0  # the annotator adds a stroke: walked again, the old file goes
    _, hit = cache.propagate("case/7", image, edited)
    assert not hit and len(calls) == 2 and len(list((tmp_path / "cache").iterdir())) == 1
    _, hit = cache.propagate("case/7", image, edited, threshold=0.9)  # other settings: another walk
    assert not hit and len(calls) == 3
    stored = next((tmp_path / "cache").iterdir())
    stored.write_bytes(stored.read_bytes()[:40])  # a damaged (truncated) cache file is walked again, not trusted
    with caplog.at_level("WARNING", logger="crossmodal.propagate"):
        out, hit = cache.propagate("case/7", image, edited, threshold=0.9)
    assert not hit and len(calls) == 4 and torch.equal(out, propagate_labels(image, edited, threshold=0.9))
    assert f"case/7: cached propagation {stored} is unreadable (" in caplog.text
    write_cached_label(stored, np.zeros((1, 8, 8, 8), np.int8))  # whole, but of another grid
    caplog.clear()
    with caplog.at_level("WARNING", logger="crossmodal.propagate"):
        out, hit = cache.propagate("case/7", image, edited, threshold=0.9)
    assert not hit and len(calls) == 5 and torch.equal(out, propagate_labels(image, edited, threshold=0.9))
    assert f"cached propagation {stored} has shape (1, 8, 8, 8), not (1, 24, 24, 24); propagating again" in caplog.text


def test_training_pipeline_reads_the_cached_label_on_the_next_epoch(tmp_path: Path, phantom_cfg: CrossModalConfig,
                                                                    monkeypatch):
    calls: list[int] = []
    real = propagate_mod.propagate_labels
    monkeypatch.setattr(propagate_mod, "propagate_labels", lambda *a, **k: calls.append(1) or real(*a, **k))
    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=1, dense=0, sparse=1, seed=5)
    item = {"image": str(studies / "phantom000.nii.gz"), "label_kind": "sparse",
            "label": str(studies / "labels" / "final" / "phantom000.nii.gz")}
    pipeline = preprocessing(phantom_cfg, "train", cache_dir=tmp_path / "propagated")
    epochs = [pipeline(dict(item))]
    assert len(calls) == 2  # the held-out stroke check and the walk
    epochs.append(pipeline(dict(item)))  # a Dataset loads the case anew every epoch
    stored = list((tmp_path / "propagated").glob("phantom000.*.npz"))
    assert len(calls) == 2 and len(stored) == 1
    assert stored[0].stat().st_size < 48**3 / 20  # compressed: a few kB for 110592 voxels
    for samples in epochs:  # patches of the grown label: nearly every voxel annotated
        assert all((s["label"] != IGNORE_INDEX).float().mean() > 0.9 for s in samples)


def test_heldout_accuracy_on_strokes_left_out():
    img = torch.zeros(1, 16, 16, 16)
    img[:, 8:] = 1.0
    t = torch.full((1, 16, 16, 16), float(IGNORE_INDEX))
    for z in (2, 6, 10, 14):  # strokes of both classes drawn on four axial slices
        t[0, 3, 4:12, z] = 0
        t[0, 12, 4:12, z] = 1
    assert heldout_accuracy(img, t) == 1.0  # slices 6 and 14 grown from 2 and 10: every voxel right
    one = torch.where(torch.arange(16).view(1, 1, 1, 16) == 2, t, torch.full_like(t, IGNORE_INDEX))
    assert heldout_accuracy(img, one) == 1.0  # one drawn slice: every other row of its strokes left out instead
    dots = torch.full_like(t, IGNORE_INDEX)
    dots[0, 3, 4, 2], dots[0, 12, 4, 2] = 0, 1
    assert heldout_accuracy(img, dots) is None  # a dot per class: leaving one out loses its class


def test_heldout_check_grows_the_phantom_and_keeps_brain_scribbles_as_drawn(tmp_path: Path, phantom_cfg, caplog):
    from crossmodal.data.brain import load_templates, make_brain_case
    from crossmodal.data.studies import generate

    phantom = make_phantom_studies(tmp_path / "p", phantom_cfg, cases=1, dense=0, sparse=1, seed=5)
    item = LoadCased(phantom_cfg)({"image": str(phantom / "phantom000.nii.gz"), "label_kind": "sparse",
                                   "label": str(phantom / "labels" / "final" / "phantom000.nii.gz")})
    assert heldout_accuracy(item["image"].as_tensor(), item["label"].as_tensor()) >= 0.99
    assert (PropagateSparseLabeld(phantom_cfg)(item)["label"] != IGNORE_INDEX).float().mean() > 0.95

    cfg = load_config("brain", overrides={"train": {"propagate": {"method": "random_walker"}}})
    assert cfg.train.propagate.min_heldout_accuracy == 0.99  # the default
    templates = load_templates(SPM_DIR)
    generate(tmp_path / "b", cfg, lambda rng: make_brain_case(cfg, templates, rng), 1, 3, "brain", sparse=1)
    item = LoadCased(cfg)({"image": str(tmp_path / "b" / "brain000.nii.gz"), "label_kind": "sparse",
                           "label": str(tmp_path / "b" / "labels" / "final" / "brain000.nii.gz")})
    accuracy = heldout_accuracy(item["image"].as_tensor(), item["label"].as_tensor())
    assert 0.9 < accuracy < 0.99  # 3 mm tissue maps: the walker errs at every partial-volume edge
    with caplog.at_level("WARNING", logger="crossmodal.propagate"):
        kept = PropagateSparseLabeld(cfg)(item)["label"]
    assert torch.equal(kept.as_tensor(), item["label"].as_tensor())  # trained on the drawn voxels only
    assert f"brain000: the random walker labels only {accuracy:.1%} of the held-out strokes right" in caplog.text
    unchecked = load_config("brain", overrides={"train": {"propagate": {"method": "random_walker",
                                                                        "min_heldout_accuracy": 0}}})
    grown = PropagateSparseLabeld(unchecked)(item)["label"]
    assert (grown != IGNORE_INDEX).float().mean() > 2 * (item["label"] != IGNORE_INDEX).float().mean()


def test_propagate_command_writes_grown_labels_and_names_bad_cases(tmp_path: Path, phantom_cfg, capsys):
    import json

    from crossmodal.cli import main
    from crossmodal.io import load_volume

    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=2, dense=1, sparse=1, seed=5)
    assert main(["propagate", "--studies", str(studies), "--config", "phantom", "--out", str(tmp_path / "g")]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines[0] == {"case": "phantom000", "label": str(studies / "labels" / "final" / "phantom000.nii.gz"),
                        "kind": "dense", "propagated": False}
    sparse = lines[1]
    assert sparse["case"] == "phantom001" and sparse["propagated"] and sparse["heldout_accuracy"] >= 0.99
    assert sparse["drawn_fraction"] < 0.06 and sparse["labelled_fraction"] > 0.95
    assert lines[2] == {"grown": ["phantom001"], "kept_as_drawn": [], "dense": ["phantom000"]}
    grown = np.rint(load_volume(tmp_path / "g" / "phantom001.nii.gz")[0].numpy()).astype(int)
    truth = np.rint(load_volume(studies / "truth" / "phantom001.nii.gz")[0].numpy()).astype(int)
    labelled = grown != 0  # the viewer convention: 0 unannotated, 255 background painted, classes as themselves
    assert set(np.unique(grown)) <= {0, 1, 2, 3, 255} and labelled.mean() > 0.95
    assert (np.where(grown == 255, 0, grown)[labelled] == truth[labelled]).mean() > 0.99

    strict = ["propagate", "--studies", str(studies), "--config", "phantom", "--out", str(tmp_path / "h"),
              "--cases", "phantom001", "--min-heldout-accuracy", "1.0"]
    assert sparse["heldout_accuracy"] < 1.0  # 0.998: a bar of 1.0 keeps the case as drawn and says so
    assert main(strict) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.splitlines()[-1])["kept_as_drawn"] == ["phantom001"]
    assert "1 case(s) failed the held-out stroke check (min_heldout_accuracy 1.0)" in err
    kept = np.rint(load_volume(tmp_path / "h" / "phantom001.nii.gz")[0].numpy()).astype(int)
    drawn = np.rint(load_volume(studies / "labels" / "final" / "phantom001.nii.gz")[0].numpy()).astype(int)
    assert np.array_equal(kept, drawn)  # written back exactly as drawn
    bare = tmp_path / "bare"  # phantom000 without its label
    shutil.copytree(studies, bare)
    (bare / "labels" / "final" / "phantom000.nii.gz").unlink()
    for case, told in (("phantom0001", f"--cases phantom0001: not a case of {bare} (did you mean phantom001?); "
                                       "cases with a final label: phantom001"),  # was "has no final label"
                       ("phantom000", f"case 'phantom000': file {bare / 'labels' / 'final'}: has no final label to "
                                      "propagate; cases with a final label: phantom001")):
        assert main(["propagate", "--studies", str(bare), "--out", str(tmp_path / "x"), "--cases", case]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"crossmodal: error: {told}"
    assert not (tmp_path / "x").exists()
    # its own folder again: the grown map replaced; the labels' folder (or the studies one): refused, nothing changed
    assert json.loads((tmp_path / "h" / "propagated.json").read_text())["files"] == ["phantom001.nii.gz"]
    assert main([*strict[:-2], "--min-heldout-accuracy", "0.99"]) == 0
    assert np.rint(load_volume(tmp_path / "h" / "phantom001.nii.gz")[0].numpy()).astype(int).tolist() == \
        grown.tolist()
    before = snapshot(studies)
    final = studies / "labels" / "final"
    for folder in (final, studies):
        capsys.readouterr()
        assert main(["propagate", "--studies", str(studies), "--config", "phantom", "--out", str(folder)]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"crossmodal: error: --out {folder}: a map would replace {folder / 'phantom000.nii.gz'}, which no "
            "earlier run wrote there (not in its propagated.json); give a new or empty folder")
    assert snapshot(studies) == before


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * (a & b).sum() / max(1, int(a.sum() + b.sum())))


def test_refining_an_overshooting_segmentation_puts_its_boundaries_back_on_the_edges(tmp_path: Path,
                                                                                   phantom_cfg: CrossModalConfig):
    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=1, dense=0, sparse=0, seed=6)
    d = LoadCased(phantom_cfg)({"image": str(studies / "phantom000.nii.gz"),
                                "label": str(studies / "truth" / "phantom000.nii.gz")})
    truth = d["label"][0].long()
    # organ and lesion overshoot by a voxel (into the background; into the organ), as a network trained on a
    # single case draws them
    blurred = truth.clone()
    for c, into in ((1, (0,)), (2, (0, 1))):
        around = F.max_pool3d((truth == c).float()[None, None], 3, stride=1, padding=1)[0, 0] > 0
        blurred[around & torch.isin(truth, torch.tensor(into))] = c
    refined = refine_segmentation(d["image"], blurred, phantom_cfg.labels.num_classes)
    assert refined.shape == (1, *truth.shape)
    refined = refined[0].long()
    assert (refined != IGNORE_INDEX).float().mean() > 0.99
    before = {c: _dice(blurred == c, truth == c) for c in (1, 2, 3)}
    after = {c: _dice(refined == c, truth == c) for c in (1, 2, 3)}
    assert after[1] > before[1] + 0.1 and after[2] > before[2] + 0.1, (before, after)
    assert after[3] > 0.9  # the thin vessels (2-3 voxels across) survive the erosion and the walk
    assert torch.equal(refine_segmentation(d["image"], blurred[None], 4), refine_segmentation(d["image"], blurred, 4))
    # with the network's confidence: where it is sure, its class stays; only the unsure voxels are re-decided
    sure = torch.ones(truth.shape)
    assert torch.equal(refine_segmentation(d["image"], truth, 4, confidence=sure, keep_confident=0.9)[0].long(), truth)
    unsure_where_wrong = torch.where(blurred != truth, 0.6, 1.0)
    gated = refine_segmentation(d["image"], blurred, 4, confidence=unsure_where_wrong, keep_confident=0.9)[0].long()
    gated_dice = {c: _dice(gated == c, truth == c) for c in (1, 2, 3)}
    assert all(gated_dice[c] >= after[c] for c in (1, 2, 3)), (after, gated_dice)
    assert gated_dice[3] > 0.99  # the vessels, sure and right, are left alone


def test_pseudo_labels_reach_the_unlabelled_patches_as_the_store_changes(tmp_path: Path,
                                                                        phantom_cfg: CrossModalConfig):
    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=1, dense=0, sparse=0, seed=6)
    cfg = load_config("phantom", overrides={"train": {"patch_size": [32, 32, 32], "patches_per_case": 1}})
    store: dict[str, torch.Tensor] = {}
    data = CacheDataset([{"image": str(studies / "phantom000.nii.gz")}],
                        preprocessing(cfg, "unlabeled", pseudo_labels=store), progress=False)
    first = data[0][0]
    assert first["label"].shape == (1, 32, 32, 32) and bool((first["label"] == IGNORE_INDEX).all())
    image = LoadCased(cfg)({"image": str(studies / "phantom000.nii.gz")})["image"]
    # a label each patch can be checked against: CT above PET (the intensity jitter scales and shifts both alike)
    store["phantom000"] = (image[:1] > image[1:2]).float()
    for _ in range(3):  # the cached dataset reads the store anew, and crops and flips the label with the image
        patch = data[0][0]
        assert set(torch.unique(patch["label"]).tolist()) <= {0.0, 1.0}
        assert torch.equal((patch["image"][:1] > patch["image"][1:2]).float(), patch["label"].as_tensor())
    store["phantom000"] = torch.zeros(1, 5, 5, 5)  # a stale entry of another grid is not used
    assert bool((data[0][0]["label"] == IGNORE_INDEX).all())


def test_training_walks_a_sparse_case_s_strokes_on_its_partial_modality(tmp_path: Path, phantom_cfg):
    """Training leaves a modality on part of a case's grid (an MR slab) out of the network's input, and its strokes'
    walker walked without it too (zeros), where ``grow_scribbles`` walks on it edge-filled beyond its field of view.
    Training's walker now has it as ``grow_scribbles`` has it; the network's input still leaves it out."""
    from conftest import crop_slab
    from crossmodal.labels import DENSE, SPARSE
    from crossmodal.transforms import WALKER_KEY

    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=3, dense=0, sparse=3, seed=4)
    train = preprocessing(phantom_cfg, "train").transforms
    assert train[0].walker_key == WALKER_KEY and any(getattr(t, "walker_key", None) == WALKER_KEY for t in train[1:])
    load, grow = LoadCased(phantom_cfg, partial="leave_out", walker_key=WALKER_KEY), \
        PropagateSparseLabeld(phantom_cfg, walker_key=WALKER_KEY)
    right = {"now": [], "zeros": []}
    for case in ("phantom000", "phantom001", "phantom002"):
        crop_slab(studies / "modalities" / case / "mr.nii.gz", 0.5)
        item = {"image": str(studies / f"{case}.nii.gz"), "label": str(studies / "labels" / "final" /
                                                                        f"{case}.nii.gz"), "label_kind": SPARSE}
        d = grow(load(item))
        assert WALKER_KEY not in d and d["present"].tolist() == [True, True, False]
        assert float(d["image"][2].abs().max()) == 0.0  # the network's input: without the MR
        used = LoadCased(phantom_cfg, partial="use")(item)  # as grow_scribbles reads the case
        assert torch.equal(d["label"], PropagateSparseLabeld(phantom_cfg)(used)["label"])
        before = PropagateSparseLabeld(phantom_cfg)(LoadCased(phantom_cfg, partial="leave_out")(item))["label"]
        truth = LoadCased(phantom_cfg)({"image": item["image"], "label": str(studies / "truth" / f"{case}.nii.gz"),
                                        "label_kind": DENSE})["label"]
        for name, grown in (("now", d["label"]), ("zeros", before)):
            labelled = grown != IGNORE_INDEX
            right[name].append((int((grown[labelled] == truth[labelled]).sum()), int((grown[labelled] !=
                                                                                       truth[labelled]).sum())))
    # (right, wrong) grown voxels of the 110592 of each case: (108638, 802), (109169, 1000), (109384, 944) walked
    # with the MR; (108684, 1278), (109010, 1080), (108816, 1394) without it
    assert all(n[1] < z[1] for n, z in zip(right["now"], right["zeros"], strict=True)), right
    assert sum(n[1] for n in right["now"]) < 0.85 * sum(z[1] for z in right["zeros"]), right
    assert sum(n[0] for n in right["now"]) > 0.995 * sum(z[0] for z in right["zeros"]), right
