"""Active learning: pure scoring / selection functions, the MONAI Label adapters on a real datastore, the simulator."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import APP, crop_slab, make_phantom_studies
from crossmodal.active import combine, mutual_information, score_image, score_network_outputs, scoring_input, select
from crossmodal.config import load_config, save_config
from crossmodal.io import load_volume, save_volume
from crossmodal.nets import CrossModalNet, build_network, record_voxel_mm
from crossmodal.serving.activelearning import (
    HANDOUT_KEY,
    SCORES_KEY,
    CrossModalScoring,
    CrossModalStrategy,
    candidates,
    model_key,
    stored_scores,
)
from crossmodal.serving.app import AppParts
from crossmodal.simulate import (
    area_under_curve,
    cases_to_reach,
    fewest_cases_possible,
    summarize,
    variant_report,
)
from crossmodal.transforms import preprocessing
from fastapi import HTTPException
from monailabel.utils.others.generic import device_map

CFG = load_config("phantom")
WEIGHTS = APP / "pretrained" / "phantom_crossmodal.pt"


def test_mutual_information_hand_computed():
    # two sources, one voxel: p = (0.5, 0.5) and (1, 0); mean (0.75, 0.25)
    p = torch.tensor([[[0.5], [0.5]], [[1.0], [0.0]]])
    h = lambda q: -sum(x * np.log(x) for x in q if x > 0)  # noqa: E731
    expected = (h([0.75, 0.25]) - (h([0.5, 0.5]) + 0.0) / 2) / np.log(2)
    assert float(mutual_information(p)[0]) == pytest.approx(expected, abs=1e-5)


def test_disagreement_grows_with_the_region_a_head_contradicts():
    fused = torch.zeros(2, 8, 8, 8)
    fused[1, :4] = 5.0  # foreground in half the volume
    scores = []
    for n in (0, 1, 2, 4):
        head = fused.clone()
        head[:, :n] = -head[:, :n]  # this head says the opposite on n slabs
        scores.append(score_network_outputs(fused, {"ct": fused, "pet": head}, None).disagreement)
    assert scores[0] == 0.0 and scores[1] < scores[2] < scores[3]
    same = torch.stack([fused] * 4)
    assert score_network_outputs(fused, {}, same).mc_uncertainty == 0.0


def test_entropy_is_the_volume_mean_of_the_predictive_entropy_of_fused_and_mc_samples():
    sure = torch.zeros(2, 4, 4, 4)
    sure[0] = 20.0  # background everywhere, confidently
    assert score_network_outputs(sure, {}, None).entropy == pytest.approx(0.0, abs=1e-3)
    half = sure.clone()
    half[:, :2] = 0.0  # 50/50 in half the volume
    assert score_network_outputs(half, {}, None).entropy == pytest.approx(0.5, abs=1e-6)
    # two MC samples that disagree with the sure fused output: the mean of the three is 2/3 vs 1/3 everywhere
    flipped = torch.stack([sure.flip(0), sure.flip(0)])
    h = -(2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3)) / np.log(2)
    assert score_network_outputs(sure, {}, flipped).entropy == pytest.approx(h, abs=1e-3)


def test_combine_and_select_trade_score_against_diversity():
    assert combine({"disagreement": {"a": 0.9, "b": 0.1, "c": 0.5}}, {"disagreement": 1.0}) == \
        {"a": 1.0, "b": 0.0, "c": 0.5}
    d = {"a": np.array([1.0, 0.0]), "a2": np.array([0.999, 0.04]), "z": np.array([0.0, 1.0])}
    scores = {"a": 1.0, "a2": 0.95, "z": 0.5}
    assert select(list(d), scores, d, 2, diversity=0.0) == ["a", "a2"]  # scores only: two near-copies
    assert select(list(d), scores, d, 2, diversity=0.5) == ["a", "z"]  # diversity: the near-copy loses
    assert select(list(d), {}, d, 1, avoid=[np.array([0.0, 1.0])]) == ["a"]  # cold start: farthest from labelled


def test_mc_samples_share_the_encoder_and_differ_in_the_decoder():
    torch.manual_seed(0)
    net = CrossModalNet(["ct", "pet"], 3, channels=(8, 16), strides=(2,), dropout=0.5).eval()
    x = torch.randn(1, 2, 16, 16, 16)
    out = net(x, mc_samples=3)
    assert tuple(out.mc_samples.shape) == (3, 1, 3, 16, 16, 16)
    assert not torch.allclose(out.mc_samples[0], out.mc_samples[1])
    torch.testing.assert_close(out.fused, net(x).fused)  # the plain output is the deterministic one


def test_mc_samples_in_one_batched_decode_are_the_separate_dropout_decodes():
    """The samples are decoded in one batch with the dropout masks drawn as separate decodes draw them: the same
    samples as T forwards with MC dropout (up to float rounding), the generator left where they leave it; without
    dropout every sample is the plain output."""
    torch.manual_seed(0)
    net = CrossModalNet(["ct", "pet", "mr"], 3, channels=(8, 16, 16), strides=(2, 2), dropout=0.3).eval()
    x = torch.randn(2, 3, 16, 16, 16)
    with torch.no_grad():
        torch.manual_seed(7)
        out = net(x, mc_samples=3)
        after = torch.rand(4)
        torch.manual_seed(7)
        separate = [net(x, heads=False, mc_dropout=True).fused for _ in range(3)]
        torch.testing.assert_close(torch.rand(4), after, rtol=0, atol=0)
        torch.testing.assert_close(out.mc_samples, torch.stack(separate), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.fused, net(x).fused, rtol=1e-4, atol=1e-4)
        assert (out.mc_samples[0] - out.mc_samples[1]).abs().max() > 1e-2  # different masks per sample
        plain = CrossModalNet(["ct", "pet", "mr"], 3, channels=(8, 16, 16), strides=(2, 2), dropout=0.0).eval()
        torch.manual_seed(7)
        none, drawn = plain(x, mc_samples=2), torch.rand(4)
        torch.manual_seed(7)
        torch.testing.assert_close(drawn, torch.rand(4), rtol=0, atol=0)  # no mask drawn
        for t in range(2):
            torch.testing.assert_close(none.mc_samples[t], none.fused, rtol=1e-4, atol=1e-4)


def test_misregistered_pet_raises_cross_modal_disagreement(tmp_path):
    """The signal nobody else has: shifting the PET by 8 mm makes the heads disagree more, on every case."""
    studies = make_phantom_studies(tmp_path / "s", CFG, cases=3, dense=0, sparse=0, seed=50)
    net = build_network(CFG)
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=False)
    net.load_state_dict(state.get("model", state) if isinstance(state, dict) and "model" in state else state)
    net.eval()
    for case in ("phantom000", "phantom001", "phantom002"):
        img = preprocessing(CFG, "infer")({"image": str(studies / f"{case}.nii.gz")})["image"].as_tensor()
        shifted = img.clone()
        shifted[1] = torch.roll(shifted[1], shifts=4, dims=0)  # 4 voxels of 2 mm
        a = score_image(net, scoring_input(img, CFG.active.scoring_scale, 8))
        b = score_image(net, scoring_input(shifted, CFG.active.scoring_scale, 8))
        assert b.disagreement > a.disagreement + 0.02, (case, a.disagreement, b.disagreement)


@pytest.fixture
def app_parts(tmp_path):
    studies = make_phantom_studies(tmp_path / "studies", CFG, cases=6, dense=1, sparse=1, seed=12)
    parts = AppParts.from_conf(str(APP), {"preset": "phantom", "model_dir": str(tmp_path / "model")})
    return parts, parts.datastore(str(studies)), studies


def test_scoring_stores_scores_once_per_model_and_rescored_after_training(app_parts):
    parts, store, _ = app_parts
    scoring = parts.scoring(parts.infer())
    out = scoring({}, store)
    unlabeled = store.get_unlabeled_images()
    assert out["scored"] == len(unlabeled) == 4 and not out["failed"] and out["model"]
    for i in unlabeled:
        s = store.get_image_info(i)[SCORES_KEY]
        assert 0.0 <= s["disagreement"] <= 1.0 and 0.0 <= s["mc_uncertainty"] <= 1.0 and 0.0 < s["entropy"] < 1.0
        assert len(s["descriptor"]) > 4 and abs(np.linalg.norm(s["descriptor"]) - 1) < 1e-4
    assert scoring({}, store)["scored"] == 0  # same model: nothing to recompute
    assert scoring.infer_task.get_path() == parts.models[0].pretrained  # no published model yet
    first = {i: store.get_image_info(i)[SCORES_KEY] for i in unlabeled}
    shutil.copyfile(parts.models[0].pretrained, parts.published)  # a newly published model (the committed file
    os.utime(parts.published, (time.time() + 5, time.time() + 5))  # itself stays untouched)
    assert scoring.infer_task.get_path() == parts.published
    torch.manual_seed(123)
    drawn = torch.rand(3)
    torch.manual_seed(123)
    assert scoring({}, store)["scored"] == 4
    assert torch.equal(torch.rand(3), drawn)  # torch's own generator is left as it was
    # the same weights score the same: the dropout samples are seeded by the case, not drawn in scoring order
    again = {i: store.get_image_info(i)[SCORES_KEY] for i in unlabeled}
    assert all(again[i]["mc_uncertainty"] == first[i]["mc_uncertainty"] > 0 for i in unlabeled), (first, again)
    assert len(list(Path(scoring.cache_dir).glob("*.pt"))) == 4  # preprocessed inputs cached for re-scoring


def test_scoring_writes_the_datastore_once_per_flush_not_once_per_case(app_parts):
    """The datastore is one JSON of every case: a pool of hundreds written once per case spends longer writing
    than scoring (bench/pool.py). Scores are stored in batches, at most every ``flush_s`` seconds."""
    parts, store, studies = app_parts
    writes = []
    write = store._update_datastore_file
    store._update_datastore_file = lambda lock=True: (writes.append(1), write(lock))[1]  # the real write, counted
    scoring = parts.scoring(parts.infer())
    assert scoring.flush_s == 5.0
    scoring.flush_s = 3600.0  # 4 cases take well under 5 s alone, but not on a machine busy with other work
    out = scoring({}, store)
    assert out["scored"] == 4 and len(writes) == 1  # all 4 within one flush period: one write
    fresh = type(store)(str(studies), CFG.labels)  # what another process reads: every case's scores
    assert sorted(i for i in fresh.get_unlabeled_images() if SCORES_KEY in fresh.get_image_info(i)) == \
        sorted(out["scores"])
    scoring.flush_s = 0.0  # after every case (the behaviour before)
    shutil.copyfile(parts.models[0].pretrained, parts.published)
    os.utime(parts.published, (time.time() + 5, time.time() + 5))
    writes.clear()
    assert scoring({}, store)["scored"] == 4 and len(writes) == 4


def test_batched_info_update_keeps_other_writes_and_returns_gone_cases(tmp_path):
    from crossmodal.serving.datastore import CrossModalDatastore

    studies = make_phantom_studies(tmp_path / "s", CFG, cases=4, dense=1, sparse=0, seed=3)
    server, child = CrossModalDatastore(str(studies), CFG.labels), CrossModalDatastore(str(studies), CFG.labels)
    server.update_image_info("phantom001", {HANDOUT_KEY: {"ts": 1.0, "client": "A"}})
    server.update_image_info("phantom003", {SCORES_KEY: {"disagreement": 0.3}})  # after the child's last read
    missing = child.update_image_infos({"phantom002": {SCORES_KEY: {"disagreement": 0.2}},
                                        "gone007": {SCORES_KEY: {"disagreement": 0.9}},
                                        "phantom001": {SCORES_KEY: {"disagreement": 0.1}}})
    assert missing == ["gone007"]
    fresh = CrossModalDatastore(str(studies), CFG.labels)
    assert fresh.get_image_info("phantom002")[SCORES_KEY] == {"disagreement": 0.2}
    assert fresh.get_image_info("phantom001")[SCORES_KEY] == {"disagreement": 0.1}
    assert fresh.get_image_info("phantom001")[HANDOUT_KEY]["client"] == "A"  # merged into, not replaced
    assert fresh.get_image_info("phantom003")[SCORES_KEY] == {"disagreement": 0.3}  # the other writer's
    assert "gone007" not in fresh.json()["objects"]
    with pytest.raises(HTTPException) as e:
        child.update_image_info("gone007", {})
    assert e.value.status_code == 404 and e.value.detail == "case 'gone007': no such image in the datastore"


def test_scoring_cache_follows_every_modality_file_and_a_broken_case_is_reported_by_name(app_parts):
    parts, store, studies = app_parts
    scoring = parts.scoring(parts.infer())
    case = sorted(store.get_unlabeled_images())[0]
    path = store.get_image_uri(case)
    x0, present0 = scoring.case_input(path)
    pet = studies / "modalities" / case / "pet.nii.gz"
    saved = pet.read_bytes()
    pet.unlink()  # the PET of the case goes: the cached input (with PET) must not be served
    x1, present1 = scoring.case_input(path)
    assert CFG.modality_names == ["ct", "pet", "mr"]
    assert present0 == [True, True, True] and present1 == [True, False, True]
    assert float(x1[0, 1].abs().max()) == 0.0 and float(x0[0, 1].abs().max()) > 0.0
    pet.write_bytes(saved[: len(saved) // 2])  # back, but truncated: reported, the other cases scored
    out = scoring({}, store)
    assert out["scored"] == 3 and list(out["failed"]) == [case]
    assert out["failed"][case].startswith(f"case {case!r}: file {pet}: cannot be read"), out["failed"]
    pet.write_bytes(saved)
    assert scoring({}, store)["scored"] == 1 and torch.equal(scoring.case_input(path)[0], x0)


def test_a_modality_covering_part_of_a_case_is_left_out_of_its_scoring(app_parts):
    """Scoring is one pass of the whole case: a modality on part of its grid (an MR slab) would throw the fusion and
    its own head off everywhere, so it is scored without it, as training leaves it out (inference runs twice)."""
    parts, store, studies = app_parts
    scoring = parts.scoring(parts.infer())
    case = sorted(store.get_unlabeled_images())[0]
    path = store.get_image_uri(case)
    x0, present0 = scoring.case_input(path)
    crop_slab(studies / "modalities" / case / "mr.nii.gz", 0.5)
    x1, present1 = scoring.case_input(path)
    assert present0 == [True, True, True] and present1 == [True, True, False]
    assert torch.equal(x1[0, :2], x0[0, :2]) and not torch.equal(x1[0, 2], x0[0, 2])
    assert scoring({}, store)["scored"] == 4 and not store.get_image_info(case)[SCORES_KEY].get("error")


def test_a_case_whose_modality_is_replaced_is_scored_again(app_parts, tmp_path):
    """Scores were recomputed for a new model only: a case whose PET was replaced through the datastore API (or on
    disk) kept the scores of its old images, and the strategy ranked it by them."""
    parts, store, studies = app_parts
    scoring = parts.scoring(parts.infer())
    assert scoring({}, store)["scored"] == 4
    case = sorted(store.get_unlabeled_images())[0]
    before = store.get_image_info(case)[SCORES_KEY]
    assert scoring({}, store)["scored"] == 0  # nothing changed
    pet = studies / "modalities" / case / "pet.nii.gz"
    img = load_volume(pet)
    save_volume(tmp_path / "pet.nii.gz", np.roll(img[0].numpy(), 6, axis=0), img.affine.numpy())  # 12 mm off
    store.add_image(case, str(tmp_path / "pet.nii.gz"), {"modality": "pet"})  # PUT /datastore/image, modality pet
    out = scoring({}, store)
    assert out["scored"] == 1 and list(out["scores"]) == [case]
    after = store.get_image_info(case)[SCORES_KEY]
    assert after["disagreement"] != before["disagreement"] and after["descriptor"] != before["descriptor"]
    assert after["files"] == scoring.files_stamp(store.get_image_uri(case))
    assert scoring({}, store)["scored"] == 0


def test_an_edited_config_rescores_and_rebuilds_the_cached_inputs_with_the_same_model(app_parts, tmp_path):
    """Scores were current by the model file's mtime alone, and cached inputs by the case's files alone: after an
    edit of the preset (here the CT window), served with the same weights, every case kept its scores and its input
    normalised the old way. Both are keyed by what the input is computed with now."""
    parts, store, studies = app_parts
    scoring = parts.scoring(parts.infer())
    assert scoring({}, store)["scored"] == 4
    case = sorted(store.get_unlabeled_images())[0]
    path = store.get_image_uri(case)
    x0 = scoring.case_input(path)[0]
    edited = load_config("phantom")
    edited.modalities[0].window = (-200.0, 300.0)
    save_config(edited, tmp_path / "edited.yaml")
    again = AppParts.from_conf(str(APP), {"preset": str(tmp_path / "edited.yaml"),
                                          "model_dir": str(tmp_path / "model"), "pretrained": str(WEIGHTS)})
    rescoring = again.scoring(again.infer())
    assert rescoring.cache_dir == scoring.cache_dir and rescoring.infer_task.get_path() == str(WEIGHTS)
    x1 = rescoring.case_input(path)[0]
    ref = preprocessing(edited, "infer", missing="zero_fill")({"image": path})["image"].as_tensor()
    torch.testing.assert_close(x1, scoring_input(ref, edited.active.scoring_scale, 8))
    assert not torch.equal(x0[0, 0], x1[0, 0]) and torch.equal(x0[0, 1:], x1[0, 1:])  # the CT channel alone
    before = store.get_image_info(case)[SCORES_KEY]
    out = rescoring({}, store)
    after = store.get_image_info(case)[SCORES_KEY]
    assert out["scored"] == 4 and after["model_key"] != before["model_key"]
    assert after["disagreement"] != before["disagreement"] and after["descriptor"] != before["descriptor"]
    assert rescoring({}, store)["scored"] == 0 and scoring({}, store)["scored"] == 4  # and back: scored again
    assert torch.equal(scoring.case_input(path)[0], x0)


def test_scoring_reads_a_case_at_the_voxel_size_the_model_in_service_was_trained_at(tmp_path):
    """Under a preset with ``data.spacing`` null, a model's weights record the voxel size they were trained at and
    inference resamples a case far from it to it; scoring (one pass of the same network) reads the case so too."""
    studies = make_phantom_studies(tmp_path / "studies", CFG, cases=3, dense=0, sparse=0, seed=12)
    null = load_config("phantom", overrides={"data": {"spacing": None}})  # the phantom preset sets 2 mm
    save_config(null, tmp_path / "null.yaml")
    parts = AppParts.from_conf(str(APP), {"preset": str(tmp_path / "null.yaml"), "model_dir": str(tmp_path / "m")})
    store = parts.datastore(str(studies))
    scoring = parts.scoring(parts.infer())
    assert scoring({}, store)["scored"] == 3  # the committed weights: no record, each case at its own 2 mm
    case = sorted(store.get_unlabeled_images())[0]
    path = store.get_image_uri(case)
    own = torch.load(scoring.cache_dir / f"{case}.pt", weights_only=True)["x"]
    net = build_network(null)
    net.load_state_dict(torch.load(WEIGHTS, weights_only=True))
    record_voxel_mm(net, (1.0, 1.0, 1.0))  # trained on 1 mm cases, say
    torch.save(net.state_dict(), parts.published)
    os.utime(parts.published, (time.time() + 5, time.time() + 5))
    working = scoring.infer_task.working_config()
    assert working.data.weights_spacing == (1.0, 1.0, 1.0) and working.data.spacing is None
    assert scoring({}, store)["scored"] == 3
    x = torch.load(scoring.cache_dir / f"{case}.pt", weights_only=True)["x"]
    fine = preprocessing(working, "infer", missing="zero_fill")({"image": path})["image"]
    assert fine.shape[1:] == (96, 96, 96)  # 48 voxels of 2 mm a side, at 1 mm
    torch.testing.assert_close(x, scoring_input(fine.as_tensor(), CFG.active.scoring_scale, 8))
    assert x.shape[2:] != own.shape[2:]


def test_model_key_tells_apart_two_weights_files_sharing_size_and_mtime(tmp_path):
    """Two weights files of one checkout can share a coarse mtime (and two presets' baseline weights their size):
    their cases' scores must not pass for each other's."""
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"x" * 64)
    b.write_bytes(b"y" * 64)
    os.utime(a, ns=(10**18, 10**18))
    os.utime(b, ns=(10**18, 10**18))
    assert model_key(CFG, str(a)) == model_key(CFG, str(a)) != model_key(CFG, str(b))
    assert model_key(CFG, str(a)) != model_key(load_config("brain"), str(a)) != model_key(CFG, None)
    os.utime(a, ns=(10**18, 10**18 + 1))  # rewritten by a training run
    assert model_key(CFG, str(a)) != model_key(CFG, str(b))


def test_a_deleted_cases_cached_scoring_input_goes_with_it(app_parts):
    """The scoring cache holds each case's images, downsampled: a case deleted from the datastore left them for
    good. The datastore's ``on_remove`` hook removes them at once; a case deleted by a process without the hook
    (another server on the folder) loses them at the next scoring, with temp files a killed scoring left."""
    parts, store, studies = app_parts
    scoring = parts.scoring(parts.infer())
    store.on_remove.append(scoring.forget)
    scoring({}, store)
    unlabeled = sorted(store.get_unlabeled_images())
    assert sorted(p.stem for p in scoring.cache_dir.glob("*.pt")) == unlabeled
    store.remove_image(unlabeled[0])
    assert sorted(p.stem for p in scoring.cache_dir.glob("*.pt")) == unlabeled[1:]
    parts.datastore(str(studies)).remove_image(unlabeled[1])  # no hook there
    assert (scoring.cache_dir / f"{unlabeled[1]}.pt").is_file()
    stale, fresh = scoring.cache_dir / "tmpkilled.tmp", scoring.cache_dir / "tmpwriting.tmp"
    for f in (stale, fresh):
        f.write_bytes(b"partial")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    out = scoring({}, store)
    assert out["scored"] == 0 and not out["failed"]
    assert sorted(p.name for p in scoring.cache_dir.iterdir()) == [f"{c}.pt" for c in unlabeled[2:]] + [fresh.name]


def test_servers_of_two_studies_sharing_a_model_dir_keep_their_scoring_caches_apart(app_parts, tmp_path):
    """Each server's scoring prunes the cache to its datastore's cases: two servers of different studies on one
    model dir removed each other's cached inputs (the cases read and preprocessed again at every scoring), and cases
    of the same id in both shared one file. Given the server's studies, each datastore has its own folder there;
    inputs an earlier version cached in the shared folder itself move into the first one made."""
    parts, store, studies = app_parts
    root = Path(parts.model_dir) / "scoring_cache"
    root.mkdir(parents=True)
    legacy = parts.scoring(parts.infer())  # the folder of before
    assert legacy.cache_dir == root
    legacy({}, store)
    unlabeled = sorted(store.get_unlabeled_images())
    assert sorted(p.stem for p in root.glob("*.pt")) == unlabeled
    kept = {p.name: p.stat().st_ino for p in root.glob("*.pt")}
    other = make_phantom_studies(tmp_path / "other" / "studies", CFG, cases=5, dense=1, sparse=0, seed=13)
    other_store = parts.datastore(str(other))
    a, b = parts.scoring(parts.infer(), str(studies)), parts.scoring(parts.infer(), str(other) + "/")
    assert a.cache_dir.parent == b.cache_dir.parent == root and a.cache_dir != b.cache_dir
    assert a.cache_dir.name.startswith("studies-") and b.cache_dir.name.startswith("studies-")
    assert {p.name: p.stat().st_ino for p in a.cache_dir.glob("*.pt")} == kept  # moved, not read again
    assert not list(root.glob("*.pt")) and not list(b.cache_dir.iterdir())
    assert parts.scoring(parts.infer(), str(studies)).cache_dir == a.cache_dir  # the same folder next start
    writes = []
    save = torch.save
    try:
        torch.save = lambda obj, f, **kw: (writes.append(Path(f).parent), save(obj, f, **kw))[1]  # count inputs
        out_b = b({}, other_store)
        assert out_b["scored"] == len(other_store.get_unlabeled_images()) == 4 and not out_b["failed"]
        assert writes == [b.cache_dir] * 4
        writes.clear()
        shutil.copyfile(parts.models[0].pretrained, parts.published)  # a new model: both score every case again
        os.utime(parts.published, (time.time() + 5, time.time() + 5))
        assert a({}, store)["scored"] == 4 and b({}, other_store)["scored"] == 4
        assert writes == []  # each server's inputs were still cached: neither pruned the other's
    finally:
        torch.save = save
    assert sorted(p.stem for p in a.cache_dir.glob("*.pt")) == unlabeled
    assert sorted(p.stem for p in b.cache_dir.glob("*.pt")) == sorted(other_store.get_unlabeled_images())


def test_image_infos_written_over_rest_do_not_break_selection(app_parts, caplog):
    """Image infos are writable by any client (``PUT /datastore/image/info``): a score, hand-out or descriptor that
    is not what the scoring stores failed every ``/activelearning/crossmodal`` (a 500: 'str' object has no attribute
    'get'); it counts as not scored now, logged."""
    parts, store, _ = app_parts
    parts.scoring(parts.infer())({}, store)
    ids = sorted(store.get_unlabeled_images())
    good = store.get_image_info(ids[0])[SCORES_KEY]
    store.update_image_info(ids[1], {SCORES_KEY: "high", HANDOUT_KEY: "mine"})
    store.update_image_info(ids[2], {SCORES_KEY: {**good, "disagreement": "lots", "descriptor": [1.0, "x"]},
                                     HANDOUT_KEY: {"ts": "yesterday", "client": "Z"}})
    store.update_image_info(ids[3], {SCORES_KEY: {**good, "mc_uncertainty": float("nan"), "descriptor": [0.5] * 3}})
    infos = {i: store.get_image_info(i) for i in ids}
    with caplog.at_level("WARNING"):
        scores, combined, desc = stored_scores(infos, CFG.active.weights)
    assert set(scores["disagreement"]) == {ids[0], ids[3]} and set(scores["mc_uncertainty"]) == {ids[0], ids[2]}
    assert set(desc) == {ids[0], ids[3]} and ids[1] not in combined
    assert f"case {ids[1]!r}: image info 'crossmodal_scores' = 'high' is not what the scoring stores" in caplog.text
    assert f"case {ids[2]!r}: stored descriptor is not a vector of numbers; ignored" in caplog.text
    picked = {CrossModalStrategy(CFG)({"client_id": c}, store)["id"] for c in "ABCD"}
    assert picked == set(ids)  # every case handed out once, the tampered ones too


def test_a_next_sample_on_a_fresh_datastore_scores_candidates_first(app_parts):
    """Nothing scored yet (a next-sample request before the start-up scoring stored anything): the strategy scores
    candidates itself for up to ``active.cold_scoring_s`` (10 s) and picks by those scores (it picked at random)."""
    parts, store, _ = app_parts
    scoring = parts.scoring(parts.infer())
    unlabeled = store.get_unlabeled_images()

    def strategy(**active: float) -> CrossModalStrategy:  # no hand-out lock: every pick sees every case
        cfg = load_config("phantom", overrides={"active": {"handout_window_s": 0, **active}})
        return CrossModalStrategy(cfg, scoring=lambda: scoring)

    assert load_config("phantom").active.cold_scoring_s == 10.0
    pick = strategy(cold_scoring_s=0)({"client_id": "A"}, store)
    assert pick["cold_start"] is True and pick["scored_now"] == 0 and pick["id"] in unlabeled
    assert not any(SCORES_KEY in store.get_image_info(i) for i in unlabeled)
    pick = strategy(cold_scoring_s=1e-9)({"client_id": "A"}, store)  # one case at least
    assert pick["cold_start"] is False and pick["scored_now"] == 1
    assert sum(SCORES_KEY in store.get_image_info(i) for i in unlabeled) == 1
    assert strategy()({"client_id": "B"}, store)["scored_now"] == 0  # not cold now: a case has scores
    for i in unlabeled:
        store.update_image_info(i, {SCORES_KEY: None})
    pick = strategy()({"client_id": "C"}, store)  # 10 s: all 4 cases
    assert pick["cold_start"] is False and pick["scored_now"] == 4 and pick["id"] in unlabeled
    assert all(0.0 <= store.get_image_info(i)[SCORES_KEY]["disagreement"] <= 1.0 for i in unlabeled)
    for i in unlabeled:
        store.update_image_info(i, {SCORES_KEY: None})
    assert parts.strategy()({"client_id": "D"}, store)["scored_now"] == 0  # without a scoring: as before


def test_strategy_hands_each_case_to_one_client_and_cold_starts_on_diversity(app_parts, tmp_path, caplog):
    parts, store, _ = app_parts
    strategy = parts.strategy()
    # cold start: no model, so the scoring stores image descriptors only; picks are diverse, not random
    cold = CrossModalScoring(CFG, type("NoModel", (), {"get_path": lambda self: None})(), str(tmp_path / "c"))
    assert cold({}, store)["model"] is False
    with pytest.raises(HTTPException) as bad:  # checked before a case is read (was torch's own error, a 500)
        cold({"device": "tpu"}, store)
    gpus = sorted(name for name, device in device_map().items() if name != device)  # a GPU machine's, by name
    assert (bad.value.status_code, bad.value.detail) == (422, "scoring request: device 'tpu' must be cpu, cuda" + (
        f", cuda:<index> or one of {gpus}" if gpus else " or cuda:<index>"))
    first = strategy({"client_id": "A"}, store)
    assert first["cold_start"] is True and first["id"] in store.get_unlabeled_images()
    # hand-out lock: client B never gets A's case within the window; every case goes to one client only
    given = {first["id"]: "A"}
    for client in ("B", "C", "D"):
        pick = strategy({"client_id": client}, store)
        assert pick["id"] not in given
        given[pick["id"]] = client
    with caplog.at_level("INFO", logger="crossmodal.serving.activelearning"):
        assert strategy({"client_id": "E"}, store) is None  # all 4 unlabelled cases held by others
    said = re.search(r"next sample for client 'E': every candidate case \(4\) is being annotated by another client "
                     r"\(handed out within active.handout_window_s = 600 s\); the first is free again in (\d+) s",
                     caplog.text)
    assert said and 500 < int(said[1]) <= 600, caplog.text  # handed out moments ago
    # per request, refine_sparse as a form or URL sends it: "false" is false (bool("false") handed the sparse case out)
    sparse_case = next(i for i in store.get_labeled_images() if store.label_kind(i) == "sparse")
    assert strategy({"client_id": "E", "refine_sparse": "false"}, store) is None
    assert strategy({"client_id": "E", "refine_sparse": None}, store) is None  # null: the config's (false)
    assert strategy({"client_id": "E", "refine_sparse": "True"}, store)["id"] == sparse_case
    with pytest.raises(HTTPException) as bad:
        strategy({"client_id": "F", "refine_sparse": "maybe"}, store)
    assert bad.value.status_code == 422
    assert bad.value.detail == "activelearning request: refine_sparse='maybe' must be true or false"
    assert strategy({"client_id": "A"}, store)["id"] == first["id"]  # A still gets its own case back
    info = store.get_image_info(first["id"])[HANDOUT_KEY]
    assert info["client"] == "A" and time.time() - info["ts"] < 60
    # with scores (a model exists) the combined score decides
    parts.scoring(parts.infer())({}, store)
    short = CrossModalStrategy(load_config("phantom", overrides={"active": {"handout_window_s": 0}}))
    pick = short({"client_id": "B"}, store)
    assert pick["cold_start"] is False and set(pick["scores"]) == {"disagreement", "mc_uncertainty", "entropy"}
    # cases with only a sparse label stay selectable when configured so (and are scored then)
    sparse = [i for i in store.get_labeled_images() if store.label_kind(i) == "sparse"]
    assert len(sparse) == 1 and sparse[0] not in candidates(store, False) and sparse[0] in candidates(store, True)
    refine_cfg = load_config("phantom", overrides={"active": {"handout_window_s": 0, "refine_sparse": True}})
    CrossModalScoring(refine_cfg, parts.infer(), str(tmp_path / "r"))({}, store)
    assert "disagreement" in store.get_image_info(sparse[0])[SCORES_KEY]


def test_area_under_curve_and_cases_to_reach():
    assert area_under_curve([2, 4, 8], [0.2, 0.6, 0.6]) == pytest.approx((0.8 + 2.4) / 6)
    recs = [{"round": 0, "annotated_cases": 2, "dice_mean": 0.5}, {"round": 1, "annotated_cases": 4, "dice_mean": 0.8}]
    assert cases_to_reach(recs, 0.79) == 4 and cases_to_reach(recs, 0.9) is None


def test_fewest_cases_possible_shares_round_zero_and_needs_one_round_elsewhere():
    # Random reached at round 0 (2 cases): everyone does; at 4 or later: nobody before 2 + k; never: unknown
    assert fewest_cases_possible([2, 4, 8, None], first=2, step=2) == [2, 4, 4, None]
    assert fewest_cases_possible([1, 3, 5], first=1, step=1) == [1, 2, 2]


def test_summary_gives_each_seeds_auc_whose_mean_is_the_mean_curves():
    def rec(seed: int, rnd: int, dice: float) -> dict:
        return {"dataset": "d", "strategy": "ours", "seed": seed, "round": rnd, "annotated_cases": 2 + 2 * rnd,
                "annotated_voxels": 100 * (rnd + 1), "dice_mean": dice, "scoring_seconds_per_case": 0.01}
    recs = [rec(1, 1, 0.8), rec(0, 0, 0.5), rec(0, 1, 0.7), rec(1, 0, 0.6)]  # out of order on purpose
    refs = [{"dataset": "d", "seed": s, "dice_mean": 0.8} for s in (0, 1)]
    ours = summarize(recs, refs)["d"]["strategies"]["ours"]
    assert ours["seeds"] == [0, 1]
    assert ours["auc_cases_per_seed"] == pytest.approx([0.6, 0.7])  # (0.5 + 0.7) / 2, (0.6 + 0.8) / 2
    assert ours["auc_cases"] == pytest.approx(0.65)
    assert ours["cases_to_95pct_full"] == [None, 4]  # 95% of 0.8 = 0.76


def test_variant_report_counts_annotated_shares_and_test_dice_by_variant():
    variants = {"a": "typical", "b": "cold_lesion", "c": "typical", "d": "cold_lesion", "t1": "typical",
                "t2": "cold_lesion"}
    recs = [  # two seeds of one strategy, two rounds; test cases t1 (typical) and t2 (cold)
        {"strategy": "ours", "round": 0, "annotated_cases": 2, "cases": ["a", "c"],
         "dice_per_case": {"t1": 0.9, "t2": 0.5}},
        {"strategy": "ours", "round": 0, "annotated_cases": 2, "cases": ["a", "b"],
         "dice_per_case": {"t1": 0.8, "t2": 0.6}},
        {"strategy": "ours", "round": 1, "annotated_cases": 4, "cases": ["a", "c", "b", "d"],
         "dice_per_case": {"t1": 0.9, "t2": 0.9}},
        {"strategy": "random", "round": 0, "annotated_cases": 2, "cases": ["c", "d"], "dice_per_case": {"t1": 0.7}}]
    rep = variant_report(recs, variants)
    assert [r["round"] for r in rep["ours"]] == [0, 1] and [r["round"] for r in rep["random"]] == [0]
    assert rep["ours"][0]["annotated_share"] == {"cold_lesion": 0.25, "typical": 0.75}  # (0 + 1/2) / 2 seeds
    assert rep["ours"][0]["test_dice"] == {"cold_lesion": 0.55, "typical": 0.85}
    assert rep["ours"][1]["annotated_share"] == {"cold_lesion": 0.5, "typical": 0.5}
    assert rep["random"][0]["test_dice"] == {"typical": 0.7}  # no cold test case scored: no entry


def test_simulate_cli_writes_learning_curves_for_three_strategies(tmp_path, capsys):
    from crossmodal.cli import main  # in-process: a subprocess spends ~7 s importing MONAI

    studies = make_phantom_studies(tmp_path / "s", CFG, cases=7, dense=0, sparse=0, seed=5)
    out = tmp_path / "results"
    code = main(["simulate", "--studies", str(studies), "--config", "phantom", "--name", "tiny", "--seeds", "0",
                 "--test", "2", "--rounds", "2", "--steps", "4", "--patch", "32", "--out", str(out), "--work",
                 str(tmp_path / "work")])
    assert code == 0, capsys.readouterr().err[-3000:]
    data = json.loads((out / "simulate_tiny.json").read_text())
    recs = data["records"]
    assert {(x["strategy"], x["round"]) for x in recs} == {(s, k) for s in ("ours", "random", "epistemic")
                                                           for k in (0, 1)}
    for x in recs:
        assert {"dataset", "strategy", "seed", "round", "annotated_cases", "annotated_voxels", "dice_mean"} <= set(x)
        assert x["annotated_cases"] == 2 + 2 * x["round"] and 0.0 <= x["dice_mean"] <= 1.0
        assert 0 < x["annotated_voxels"] < x["annotated_cases"] * 48 ** 3  # scribbles: a fraction of the voxels
        # the test split: the last 2 cases, never annotated; dice_mean is their per-case Dice's mean
        assert sorted(x["dice_per_case"]) == ["phantom005", "phantom006"] and not set(x["cases"]) & set(
            x["dice_per_case"])
        assert x["dice_mean"] == pytest.approx(sum(x["dice_per_case"].values()) / 2, abs=1e-3)
    seeds = {x["strategy"]: x["cases"][:2] for x in recs if x["round"] == 0}
    assert seeds["ours"] == seeds["random"] == seeds["epistemic"]  # the same seed set for every strategy
    # round 1 read the seed set's grown scribbles that round 0 made (as the app's one model folder keeps them): the
    # same files, not grown again (a file written again is a new one)
    for strategy in ("ours", "random", "epistemic"):
        grown = {p.name.split(".")[0]: p for p in (tmp_path / "work" / "tiny" / strategy / "seed0" / "model_r0" /
                                                    "propagated").glob("*.npz")}
        later = {p.name.split(".")[0]: p for p in (tmp_path / "work" / "tiny" / strategy / "seed0" / "model_r1" /
                                                    "propagated").glob("*.npz")}
        assert sorted(grown) == sorted(seeds[strategy]) and len(later) == 4
        assert all(later[c].samefile(grown[c]) for c in grown)
    cost = data["scoring_cost"]
    assert cost["epistemic_s"] > 0 and cost["ours_warm_s"] > 0 and cost["ratio_warm"] == pytest.approx(
        cost["ours_warm_s"] / cost["epistemic_s"], rel=1e-2)
    assert data["full_annotation"][0]["annotated_cases"] == 5
    assert (out / "simulate_tiny.png").stat().st_size > 10_000


def test_scores_written_by_a_child_process_reach_the_server_and_are_not_overwritten(tmp_path):
    """MONAI Label scores and trains in child processes with their own datastore object on the same folder."""
    from crossmodal.serving.datastore import CrossModalDatastore

    studies = make_phantom_studies(tmp_path / "s", CFG, cases=4, dense=1, sparse=0, seed=3)
    server, child = CrossModalDatastore(str(studies), CFG.labels), CrossModalDatastore(str(studies), CFG.labels)
    child.update_image_info("phantom002", {SCORES_KEY: {"disagreement": 0.4}})
    assert server.get_image_info("phantom002")[SCORES_KEY] == {"disagreement": 0.4}
    child.update_image_info("phantom003", {SCORES_KEY: {"disagreement": 0.1}})
    server.update_image_info("phantom001", {HANDOUT_KEY: {"ts": 1.0, "client": "A"}})  # must not drop the child's
    fresh = CrossModalDatastore(str(studies), CFG.labels)
    assert fresh.get_image_info("phantom003")[SCORES_KEY] == {"disagreement": 0.1}
    assert fresh.get_image_info("phantom001")[HANDOUT_KEY]["client"] == "A"


def test_a_child_write_in_the_same_mtime_tick_is_neither_missed_nor_overwritten(tmp_path):
    """Two writes a millisecond apart can share a coarse mtime: the server must still see the child's write and
    keep it when it writes next (it used to compare the mtime alone, and then overwrote the child's scores)."""
    from crossmodal.serving.datastore import CrossModalDatastore

    studies = make_phantom_studies(tmp_path / "s", CFG, cases=4, dense=1, sparse=0, seed=3)
    server, child = CrossModalDatastore(str(studies), CFG.labels), CrossModalDatastore(str(studies), CFG.labels)
    server.update_image_info("phantom001", {HANDOUT_KEY: {"ts": 1.0, "client": "A"}})
    path = server._datastore_config_path
    tick = os.stat(path).st_mtime_ns
    child.update_image_info("phantom002", {SCORES_KEY: {"disagreement": 0.4}})
    os.utime(path, ns=(tick, tick))  # the child's write lands in the server's last mtime tick
    assert server.get_image_info("phantom002")[SCORES_KEY] == {"disagreement": 0.4}
    child.update_image_info("phantom003", {SCORES_KEY: {"disagreement": 0.1}})
    os.utime(path, ns=(tick, tick))
    server.update_image_info("phantom001", {HANDOUT_KEY: {"ts": 2.0, "client": "B"}})
    fresh = CrossModalDatastore(str(studies), CFG.labels)
    assert fresh.get_image_info("phantom003")[SCORES_KEY] == {"disagreement": 0.1}
    assert fresh.get_image_info("phantom002")[SCORES_KEY] == {"disagreement": 0.4}
    assert fresh.get_image_info("phantom001")[HANDOUT_KEY]["client"] == "B"


def test_simulate_cli_rejects_a_pool_too_small_for_its_rounds_before_training(tmp_path, capsys):
    from crossmodal.cli import main  # in-process: a subprocess spends ~8 s importing MONAI

    studies = make_phantom_studies(tmp_path / "s", CFG, cases=5, dense=0, sparse=0, seed=6)
    out = tmp_path / "results"
    assert main(["simulate", "--studies", str(studies), "--config", "phantom", "--seeds", "0", "--test", "2",
                 "--initial", "1", "--k", "2", "--rounds", "3", "--out", str(out), "--work",
                 str(tmp_path / "work")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "crossmodal: error: --initial 1 + --k 2 x 2 more rounds = 5 cases to annotate, but the pool holds 3 "
        "(5 cases with truth, --test 2 held out); use --rounds 2 or fewer")
    assert not list(out.glob("*.json")) and not (tmp_path / "work").exists()  # no reference model trained first
    assert main(["simulate", "--studies", str(studies), "--config", "phantom", "--seeds", "0", "1", "0", "--out",
                 str(out), "--work", str(tmp_path / "work")]) == 2  # was: seed 0's curves trained twice, counted double
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "crossmodal: error: --seeds 0 1 0: [0] given more than once; each seed once")
    assert not list(out.glob("*.json")) and not (tmp_path / "work").exists()
    rc = main(["simulate", "--studies", str(studies), "--config", "phantom", "--test", "2", "--initial", "1", "--k",
               "1", "--rounds", "2", "--steps", "1", "--patch", "30", "--out", str(out), "--work",
               str(tmp_path / "work")])  # was a tensor-size RuntimeError traceback once training began
    assert (rc, capsys.readouterr().err.strip().splitlines()[-1]) == (2, (
        "crossmodal: error: --patch 30: train.patch_size: [30, 30, 30] must be three multiples of 8 (the product of "
        "model.strides [2, 2, 2]), each at least 16"))
    assert not list(out.glob("*.json")) and not (tmp_path / "work").exists()


def test_simulate_takes_only_dense_labels_as_truth_and_refuses_a_sparse_truth_before_training(tmp_path, capsys):
    """An nnU-Net dataset's sparse labels (its ignore label) are no ground truth for the simulated annotator: those
    cases are left out, said on stderr (they became truth with 255 in them, and the first evaluation an IndexError
    traceback after the reference model had trained); a studies folder's truth holding 255 is refused, naming it."""
    from crossmodal.cli import as_studies, main
    from crossmodal.data.nnunet import export_nnunet

    studies = make_phantom_studies(tmp_path / "s", CFG, cases=6, dense=2, sparse=2, seed=4)  # 4-5 unlabelled
    export_nnunet(studies, tmp_path / "Dataset009_Ph", CFG, test_cases=("phantom005",))
    oracle = Path(as_studies(str(tmp_path / "Dataset009_Ph"), "phantom", oracle=True, scratch=str(tmp_path)))
    assert sorted(p.name for p in (oracle / "truth").iterdir()) == [
        "phantom000.nii.gz", "phantom001.nii.gz", "phantom005.nii.gz"]  # the dense labels and labelsTs
    assert not list((oracle / "labels" / "final").iterdir())  # no case starts labelled
    for p in (oracle / "truth").iterdir():
        assert set(np.unique(load_volume(p)[0].numpy())) <= {0, 1, 2, 3}
    capsys.readouterr()
    assert main(["simulate", "--studies", str(tmp_path / "Dataset009_Ph"), "--test", "1", "--initial", "1",
                 "--rounds", "3", "--out", str(tmp_path / "r"), "--work", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert ("crossmodal: 3 of 6 cases have no dense ground truth and are left out of the simulation (phantom002, "
            "phantom003, phantom004): the simulated annotator labels a case from its truth") in err
    assert err.strip().splitlines()[-1] == (  # the pool counts the cases with truth only
        "crossmodal: error: --initial 1 + --k 2 x 2 more rounds = 5 cases to annotate, but the pool holds 2 (3 cases "
        "with truth, --test 1 held out); use --rounds 1 or fewer")
    # a studies folder whose truth holds a sparse label (255: marked background)
    truth = studies / "truth" / "phantom001.nii.gz"
    lab = np.rint(load_volume(truth)[0].numpy()).astype(np.uint8)
    lab[:, :, :4] = 255
    save_volume(truth, lab, load_volume(truth).affine.numpy())
    assert main(["simulate", "--studies", str(studies), "--test", "2", "--initial", "1", "--k", "1", "--rounds", "2",
                 "--out", str(tmp_path / "r"), "--work", str(tmp_path / "w")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"crossmodal: error: case 'phantom001': file {truth}: truth values [255.0] are not class indices 0..3 (255 "
        "marks background in a sparse label: truth must be a dense label); give the case a dense label map as its "
        "truth, or remove its truth file")
    assert not (tmp_path / "w").exists() and not list((tmp_path / "r").glob("*.json"))  # nothing trained first
    save_volume(truth, np.where(lab == 255, 0, lab), load_volume(truth).affine.numpy())
    (studies / "phantom002.nii.gz").unlink()  # truth without its image: was a StopIteration traceback
    assert main(["simulate", "--studies", str(studies), "--test", "2", "--initial", "1", "--k", "1", "--rounds", "2",
                 "--out", str(tmp_path / "r"), "--work", str(tmp_path / "w")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"crossmodal: error: case 'phantom002': file {studies / 'truth' / 'phantom002.nii.gz'}: has truth but no "
        f"primary image in {studies}; remove the truth file, or put the case's image back")
    assert not (tmp_path / "w").exists()


def test_simulate_resumes_a_killed_run_keeping_its_finished_curves(tmp_path, capsys, monkeypatch):
    """A simulation on a real dataset takes hours, and a kill lost it all: a rerun trained every curve again. With
    ``--resume`` the finished references and curves stay and the unfinished curve is trained again, to the same
    figures (seeded training); a JSON of another simulation is refused, naming what differs."""
    import crossmodal.simulate as sim
    from crossmodal.cli import main

    studies = make_phantom_studies(tmp_path / "s", CFG, cases=6, dense=0, sparse=0, seed=8)
    out = tmp_path / "results"
    args = ["simulate", "--studies", str(studies), "--config", "phantom", "--name", "tiny", "--strategies", "random",
            "--seeds", "0", "1", "--test", "2", "--rounds", "2", "--steps", "4", "--patch", "32", "--out", str(out)]
    evaluate, full, curve = sim.evaluate, sim.full_reference, sim.run_strategy
    calls: dict[str, list] = {"evaluate": [], "full": [], "curve": []}

    def killed_at_the_sixth(*a, **k):  # reference, r0, r1 of seed 0; reference, r0 of seed 1; then the kill
        calls["evaluate"].append(a[2])
        if len(calls["evaluate"]) == 6:
            raise KeyboardInterrupt
        return evaluate(*a, **k)

    def killed_at_the_first(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sim, "evaluate", killed_at_the_sixth)
    assert main(args) == 130
    assert capsys.readouterr().err.endswith("\ncrossmodal simulate: interrupted\n")
    killed = json.loads((out / "simulate_tiny.json").read_text())
    assert [(r["seed"], r["round"]) for r in killed["records"]] == [(0, 0), (0, 1), (1, 0)]
    assert [r["seed"] for r in killed["full_annotation"]] == [0, 1]

    monkeypatch.setattr(sim, "evaluate", evaluate)
    monkeypatch.setattr(sim, "full_reference", lambda *a, **k: (calls["full"].append(a[4]), full(*a, **k))[1])
    monkeypatch.setattr(sim, "run_strategy", lambda *a, **k: (calls["curve"].append(a[4:6]), curve(*a, **k))[1])
    assert main([*args, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "crossmodal: resuming " + str(out / "simulate_tiny.json") + ": kept 2 full-annotation reference(s) and 1 " \
        "finished curve(s) (random seed 0); training again: random seed 1 unfinished, and what was not run yet" in err
    assert calls["full"] == [] and calls["curve"] == [("random", 1)]  # only the unfinished curve trained
    resumed = json.loads((out / "simulate_tiny.json").read_text())
    assert sorted((r["seed"], r["round"]) for r in resumed["records"]) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert resumed["full_annotation"] == killed["full_annotation"] and resumed["records"][:2] == killed["records"][:2]
    again = next(r for r in resumed["records"] if (r["seed"], r["round"]) == (1, 0))
    assert {k: v for k, v in again.items() if k != "train_seconds"} == \
        {k: v for k, v in killed["records"][2].items() if k != "train_seconds"}  # the same figures, trained again
    assert resumed["summary"] == sim.summarize(resumed["records"], resumed["full_annotation"])

    assert main([*args[:-8], "--rounds", "2", "--steps", "5", "--patch", "32", "--out", str(out), "--resume"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"crossmodal: error: --resume: {out / 'simulate_tiny.json'} is of another simulation (steps differ); run it "
        "without --resume to replace it, or give another --out")
    assert main([*args, "--resume", "--name", "other"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"crossmodal: error: --resume: {out / 'simulate_other.json'}: no earlier run of this simulation there to "
        "resume (its --out and --name give the file)")
    assert json.loads((out / "simulate_tiny.json").read_text()) == resumed  # the refused runs replaced nothing

    # run again without --resume: the earlier results were written over at the first result (hours of curves lost
    # to a forgotten flag); now kept beside, and only once there is something to replace them with
    plot = (out / "simulate_tiny.png").read_bytes()
    calls["evaluate"].clear()
    monkeypatch.setattr(sim, "evaluate", killed_at_the_first)
    assert main(args) == 130
    assert f"crossmodal: replacing {out / 'simulate_tiny.json'} (--resume keeps its finished curves); it is kept as " \
        f"{out / 'simulate_tiny.previous.json'} once this run has a result to write" in capsys.readouterr().err
    assert json.loads((out / "simulate_tiny.json").read_text()) == resumed
    assert not (out / "simulate_tiny.previous.json").exists()
    calls["evaluate"].clear()
    def killed_at_the_second(*a, **k):
        calls["evaluate"].append(a[2])
        return evaluate(*a, **k) if len(calls["evaluate"]) == 1 else killed_at_the_first()

    monkeypatch.setattr(sim, "evaluate", killed_at_the_second)
    assert main(args) == 130  # killed after its first result, seed 0's full-annotation reference
    capsys.readouterr()
    assert json.loads((out / "simulate_tiny.previous.json").read_text()) == resumed
    assert (out / "simulate_tiny.previous.png").read_bytes() == plot  # its plot with it
    replaced = json.loads((out / "simulate_tiny.json").read_text())
    assert replaced["records"] == [] and replaced["full_annotation"] == resumed["full_annotation"][:1]
