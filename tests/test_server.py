"""End to end: a real `monailabel start_server` with our app, driven by MONAILabelClient (Slicer's client code)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import requests
import torch
from conftest import APP, PRETRAINED_PHANTOM, dice, snapshot
from crossmodal.atlas import usable_cores
from crossmodal.config import load_config
from crossmodal.data.phantom import make_phantom
from crossmodal.data.sparse import scribbles
from crossmodal.data.studies import write_case
from crossmodal.io import load_volume, save_volume
from crossmodal.nets import check_weights
from crossmodal.serving.app import AppParts
from crossmodal.serving.runs import list_runs, publish_run
from crossmodal.serving.train import run_folders
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException
from scipy import ndimage

pytestmark = pytest.mark.slow
CFG = load_config("phantom")
CFG_BASELINE = load_config("phantom", overrides={"model": {"name": "baseline_unet"}})
UNLABELED = {"phantom003", "phantom004", "phantom005"}


@pytest.fixture(scope="module")
def client(phantom_server, tmp_path_factory) -> MONAILabelClient:
    return MONAILabelClient(phantom_server.url, tmpdir=str(tmp_path_factory.mktemp("client")))


def status_of(e: MONAILabelClientException) -> int:
    return int(e.msg.split("Status: ")[1].split(";")[0])


def truth(server, case: str) -> np.ndarray:
    return load_volume(server.studies / "truth" / f"{case}.nii.gz")[0].numpy()


def label_info(client, case: str) -> dict:
    return client.datastore()["objects"][case]["labels"]["final"]["info"]


def test_info_lists_model_trainer_strategy_scoring(client, phantom_server):
    info = client.info()
    assert ("--conf preset not given: preset 'phantom' (ct + pet, mr), the one whose secondary modalities are those "
            f"of the cases under {phantom_server.studies} (the default, 'brain', takes t1 + t2, pd)"
            in phantom_server.log.read_text())
    assert ("serving preset 'phantom': modalities ct, pet, mr (the first the primary), classes organ, lesion, vessel; "
            f"crossmodal: {APP / 'pretrained' / 'phantom_crossmodal.pt'} (pretrained); baseline_unet: "
            f"{PRETRAINED_PHANTOM} (pretrained)" in phantom_server.log.read_text())  # what it segments with, at start
    assert info["models"]["baseline_unet"]["labels"] == {"organ": 1, "lesion": 2, "vessel": 3, "marked_background": 255}
    assert info["models"]["baseline_unet"]["type"] == "segmentation"
    assert "baseline_unet" in info["trainers"] and {"crossmodal", "random"} <= set(info["strategies"])
    assert info["trainers"]["baseline_unet"]["config"]["publish"] == ["if_better", "best_of_run"]  # Slicer's options
    assert "crossmodal" in info["scoring"]
    assert "config" not in info  # 3D Slicer aborts on a top-level config key
    assert info["datastore"]["total"] == 6 and info["datastore"]["completed"] == 3


def test_next_sample_is_unlabeled(client):
    picks = [client.next_sample("crossmodal", {}) for _ in range(3)]
    assert {p["id"] for p in picks} <= UNLABELED
    # the server scores nothing at start here (MONAI_LABEL_AUTO_UPDATE_SCORING false), as a fresh datastore before
    # its start-up scoring: the first request scores the candidates itself and picks by the scores (was: at random)
    assert picks[0]["scored_now"] == 3 and picks[0]["cold_start"] is False  # the module's server: its first request
    assert [p["scored_now"] for p in picks[1:]] == [0, 0]


def test_crossmodal_scoring_stores_scores_and_the_strategy_uses_them(client, phantom_server):
    infos = {case: client.datastore()["objects"][case]["image"]["info"] for case in UNLABELED}
    unscored = sum("crossmodal_scores" not in info for info in infos.values())  # none after a next sample
    r = requests.post(f"{phantom_server.url}/scoring/crossmodal?run_sync=true", timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["scored"] == unscored and not r.json()["failed"]  # once per model: nothing scored twice
    objects = client.datastore()["objects"]
    for case in UNLABELED:
        scores = objects[case]["image"]["info"]["crossmodal_scores"]
        assert 0.0 <= scores["disagreement"] <= 1.0 and len(scores["descriptor"]) > 4
    pick = client.next_sample("crossmodal", {})
    assert pick["id"] in UNLABELED and pick["cold_start"] is False and 0.0 <= pick["score"] <= 1.0


def test_infer_returns_label_on_primary_grid_that_matches_truth(client, phantom_server):
    scores = []
    for case in sorted(UNLABELED):
        out, params = client.infer("baseline_unet", case, {})
        assert params["modalities_used"] == ["ct", "pet", "mr"] and params["case"] == case
        # co-registered phantom modalities: the translation search finds (almost) nothing to correct
        assert set(params["registered_mm"]) == {"pet", "mr"} and max(params["registered_mm"].values()) < 2.5
        assert set(params["coverage"]) == {"pet", "mr"} and min(params["coverage"].values()) > 0.95  # each covers it
        pred, image = load_volume(out), load_volume(phantom_server.studies / f"{case}.nii.gz")
        assert tuple(pred.shape) == tuple(image.shape)
        np.testing.assert_allclose(pred.affine.numpy(), image.affine.numpy(), atol=1e-4)
        gt = truth(phantom_server, case)
        scores.append([dice(pred[0].numpy(), gt, v) for v in (1, 2, 3)])
    mean = np.mean(scores, axis=0)
    # held-out Dice of the committed model: apps/crossmodal/pretrained/phantom_baseline_unet.eval.json (0.93)
    assert mean.min() > 0.75 and mean.mean() > 0.85, f"Dice organ/lesion/vessel {mean}"


def test_mirrored_infer_averages_eight_passes_and_refuses_other_axes(client, phantom_server):
    case = sorted(UNLABELED)[0]
    assert client.info()["models"]["crossmodal"]["config"]["mirror_axes"] == "none"  # Slicer's options panel
    plain, _ = client.infer("crossmodal", case, {})
    mirrored, params = client.infer("crossmodal", case, {"mirror_axes": "0,1,2"})
    one, eight, gt = load_volume(plain)[0].numpy(), load_volume(mirrored)[0].numpy(), truth(phantom_server, case)
    assert params["case"] == case and one.shape == eight.shape == gt.shape
    changed = float((one != eight).mean())
    assert 0 < changed < 0.02  # the 8-pass average moves a few boundary voxels, nothing else
    assert min(dice(eight, gt, v) for v in (1, 2, 3)) > 0.75
    with pytest.raises(MONAILabelClientException) as e:
        client.infer("crossmodal", case, {"mirror_axes": "0,3"})
    assert status_of(e.value) == 422
    assert f"case '{case}': mirror_axes: '0,3' must name spatial axes 0, 1 or 2, each once" in e.value.msg
    with pytest.raises(MONAILabelClientException) as e:  # was: ignored, the case segmented unmirrored
        client.infer("crossmodal", case, {"mirror_axis": "0,1,2"})
    assert status_of(e.value) == 422
    assert f"image '{case}': infer request: mirror_axis is not an option of model 'crossmodal'; did you mean " \
        "mirror_axes?" in e.value.msg
    # the largest-component clean-up per request, on the CT head's map (its organ in two pieces here; the fused map
    # has one piece per class): only the smaller organ piece goes, to background
    assert client.info()["models"]["crossmodal"]["config"]["largest_component"] == "none"
    head = load_volume(client.infer("crossmodal", case, {"prediction": "ct"})[0])[0].numpy()
    cleaned, _ = client.infer("crossmodal", case, {"prediction": "ct", "largest_component": "organ"})
    kept = load_volume(cleaned)[0].numpy()
    pieces = ndimage.label(head == 1, np.ones((3, 3, 3)))[0]
    sizes = np.bincount(pieces.ravel())[1:]
    assert len(sizes) == 2 and np.array_equal(kept == 1, pieces == 1 + int(np.argmax(sizes)))
    assert np.array_equal(kept[kept != 1], head[kept != 1] * (head[kept != 1] != 1))
    with pytest.raises(MONAILabelClientException) as e:
        client.infer("crossmodal", case, {"largest_component": "liver"})
    assert status_of(e.value) == 422
    assert f"case '{case}': largest_component: ['liver'] must be among ['foreground', 'organ', 'lesion', 'vessel'] " \
        "(or none)" in e.value.msg


def test_infer_nrrd_output_for_slicer_and_no_format_that_cannot_hold_the_label(client, phantom_server):
    nii, _ = client.infer("baseline_unet", "phantom003", {})
    a = load_volume(nii)
    for ext in (".nrrd", ".seg.nrrd", ".nii"):
        out, _ = client.infer("baseline_unet", "phantom003", {"result_extension": ext})
        assert out.endswith(ext)
        b = load_volume(out)
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        np.testing.assert_allclose(a.affine.numpy(), b.affine.numpy(), atol=1e-4)
        if ext == ".seg.nrrd":  # 3D Slicer shows the classes by name (it made up Segment_1, ... before)
            _, header = nrrd.read(out)
            assert [header[f"Segment{i}_Name"] for i in range(3)] == ["organ", "lesion", "vessel"]
            assert [int(header[f"Segment{i}_LabelValue"]) for i in range(3)] == [1, 2, 3]
    out, _ = client.infer("crossmodal", "phantom003", {"prediction": "uncertainty", "result_extension": ".seg.nrrd",
                                                       "mc_samples": 2})
    assert not any(k.startswith("Segment") for k in nrrd.read_header(out))  # a 0-100 map names no classes
    # MONAI Label's own writer answered .jpg / 'nii.gz' with a 500 after inference and .png with one 2D slice
    for ext in (".png", ".jpg", "nii.gz"):
        with pytest.raises(MONAILabelClientException) as e:
            client.infer("baseline_unet", "phantom003", {"result_extension": ext})
        assert status_of(e.value) == 422
        assert f"case 'phantom003': result_extension {ext!r} must be one of ['.nii.gz', '.nii', '.seg.nrrd', " \
               "'.nrrd', '.mha']" in e.value.msg
    # the label's numpy type: int16 as asked; a name numpy does not know was a 500 after inference
    out, _ = client.infer("baseline_unet", "phantom003", {"result_dtype": "int16"})
    assert nib.load(out).get_data_dtype() == np.int16 and np.array_equal(load_volume(out).numpy(), a.numpy())
    for dtype in ("foo", "bool", 3):
        with pytest.raises(MONAILabelClientException) as e:
            client.infer("baseline_unet", "phantom003", {"result_dtype": dtype})
        assert status_of(e.value) == 422 and f"case 'phantom003': result_dtype {dtype!r} must be a numpy integer or " \
            "float type name, e.g. uint8 (the default), int16 or float32" in e.value.msg, e.value.msg


def test_grow_scribbles_grows_uploaded_strokes_and_saves_nothing(client, phantom_server, tmp_path):
    assert client.info()["models"]["grow_scribbles"]["type"] == "scribbles"
    case, studies = "phantom004", phantom_server.studies
    gt = truth(phantom_server, case)
    strokes = scribbles(np.rint(gt).astype(np.int64), CFG.labels, np.random.default_rng(3))
    image = load_volume(studies / f"{case}.nii.gz")
    save_volume(tmp_path / "strokes.nii.gz", strokes.astype(np.uint8), image.affine.numpy())
    before = snapshot(studies)
    out, params = client.infer("grow_scribbles", case, {}, label_in=str(tmp_path / "strokes.nii.gz"))
    pred = load_volume(out)
    assert tuple(pred.shape) == tuple(image.shape)
    np.testing.assert_allclose(pred.affine.numpy(), image.affine.numpy(), atol=1e-4)
    assert params["case"] == case and params["drawn"] == pytest.approx((strokes != 0).mean(), abs=1e-4)
    assert params["drawn"] < 0.06 and params["labelled"] > 0.95 and params["heldout_accuracy"] > 0.99
    grown = [dice(pred[0].numpy(), gt, v) for v in (1, 2, 3)]
    drawn = [dice(strokes, gt, v) for v in (1, 2, 3)]
    assert grown[0] > 0.85 and grown[2] > 0.85 and all(g > d + 0.3 for g, d in zip(grown, drawn, strict=True))
    one_class = np.where(strokes == 1, 1, 0).astype(np.uint8)
    save_volume(tmp_path / "one.nii.gz", one_class, image.affine.numpy())
    with pytest.raises(MONAILabelClientException) as e:
        client.infer("grow_scribbles", case, {}, label_in=str(tmp_path / "one.nii.gz"))
    assert status_of(e.value) == 422 and f"case '{case}': strokes of 1 class(es) ['organ'] in the uploaded strokes; " \
        "draw at least two" in e.value.msg, e.value.msg  # was the server's temp file's path
    with pytest.raises(MONAILabelClientException) as e:
        client.infer("grow_scribbles", case, {})
    assert status_of(e.value) == 422 and "no strokes" in e.value.msg
    # the walker's settings: text that is a number is taken; other text was a 500 after the case had been read
    _, params_text = client.infer("grow_scribbles", case, {"threshold": "0.5", "beta": "130"},
                                  label_in=str(tmp_path / "strokes.nii.gz"))
    assert (params_text["threshold"], params_text["beta"], params_text["drawn"]) == (0.5, 130.0, params["drawn"])
    for bad in ({"threshold": "x"}, {"threshold": 2}, {"beta": 0}, {"beta": None, "threshold": "0.4"}):
        with pytest.raises(MONAILabelClientException) as e:
            client.infer("grow_scribbles", case, bad, label_in=str(tmp_path / "strokes.nii.gz"))
        t, b = bad.get("threshold", 0.5), bad.get("beta") if bad.get("beta") is not None else 130.0
        assert status_of(e.value) == 422 and (f"case '{case}': threshold {t!r} must be a number in [0.5, 1] and beta "
                                              f"{b!r} a number > 0") in e.value.msg, e.value.msg
    assert params["modalities_used"] == ["ct", "pet", "mr"]  # was [] (the grow task's loader dropped it)

    # 3D Slicer's scribbles panel sends every segment numbered 1, 2, ... in its order (the app's labels, then its
    # foreground / background scribbles), their names as label_info, and the label to grow; it fills that one
    # segment with the result's 1s. The same strokes so sent grow to the same organ (was a 422: `label values [5, 6]
    # are not configured classes`)
    order = ["organ", "lesion", "vessel", "marked_background", "foreground_scribbles", "background_scribbles"]
    as_drawn = {"lesion": 2, "vessel": 3, "foreground_scribbles": 1,
                "background_scribbles": CFG.labels.marked_background}
    exported = np.zeros_like(strokes, dtype=np.uint8)
    for n, name in enumerate(order):
        if name in as_drawn:
            exported[strokes == as_drawn[name]] = n + 1
    save_volume(tmp_path / "slicer.nrrd", exported, image.affine.numpy())
    slicer = {"label_info": [{"name": name, "id": n + 1} for n, name in enumerate(order)],
              "selected_label_name": "organ"}
    out_slicer, params_slicer = client.infer("grow_scribbles", case, slicer, label_in=str(tmp_path / "slicer.nrrd"))
    np.testing.assert_array_equal(load_volume(out_slicer)[0].numpy(), (pred[0].numpy() == 1).astype(np.float32))
    assert params_slicer["drawn"] == params["drawn"]
    save_volume(tmp_path / "stray.nrrd", np.full_like(exported, 9), image.affine.numpy())
    with pytest.raises(MONAILabelClientException) as e:  # a value no configured class has: named, not its temp file
        client.infer("grow_scribbles", case, {}, label_in=str(tmp_path / "stray.nrrd"))
    assert status_of(e.value) == 422 and f"case '{case}': uploaded strokes: label values [9] are not configured " \
        "classes" in e.value.msg and "tmp" not in e.value.msg, e.value.msg
    with pytest.raises(MONAILabelClientException) as e:
        client.infer("grow_scribbles", case, {**slicer, "selected_label_name": "liver"},
                     label_in=str(tmp_path / "slicer.nrrd"))
    assert status_of(e.value) == 422 and f"case '{case}': selected_label_name 'liver' is not a class of this app: " \
        "['organ', 'lesion', 'vessel']; pick the label to grow" in e.value.msg, e.value.msg

    # OHIF sends strokes as raw uint8 on the image's grid in Fortran order (`.bin`): the same result, and no copy of
    # them stays in the server's temp folder (MONAI Label's conversion did, on every request)
    temp_files = {p for p in phantom_server.tmp.rglob("*") if p.is_file()}
    strokes.astype(np.uint8).ravel(order="F").tofile(tmp_path / "strokes.bin")
    out_bin, params_bin = client.infer("grow_scribbles", case, {}, label_in=str(tmp_path / "strokes.bin"))
    np.testing.assert_array_equal(load_volume(out_bin).numpy(), pred.numpy())
    assert params_bin["drawn"] == params["drawn"]
    (tmp_path / "short.bin").write_bytes((tmp_path / "strokes.bin").read_bytes()[:1000])
    with pytest.raises(MONAILabelClientException) as e:
        client.infer("grow_scribbles", case, {}, label_in=str(tmp_path / "short.bin"))
    assert status_of(e.value) == 422 and f"case '{case}': the label short.bin (1000 bytes) is not one uint8 a voxel " \
        "of the image's grid (cannot reshape array of size 1000 into shape (48,48,48))" in e.value.msg  # was a 500
    with pytest.raises(MONAILabelClientException) as e:
        client.infer("grow_scribbles", "", {}, label_in=str(tmp_path / "strokes.bin"),
                     file=str(studies / f"{case}.nii.gz"))
    assert status_of(e.value) == 422 and "label strokes.bin: a .bin label takes its grid from a datastore image; " \
        "name it with `image`" in e.value.msg
    for _ in range(50):  # the endpoints' removals run as background tasks, after the response
        if {p for p in phantom_server.tmp.rglob("*") if p.is_file()} == temp_files:
            break
        time.sleep(0.1)
    assert {p for p in phantom_server.tmp.rglob("*") if p.is_file()} == temp_files
    assert snapshot(studies) == before  # growing shows a label; only saving one writes to the datastore


def test_missing_modality_is_reported_or_zero_filled(client, phantom_server):
    pet = phantom_server.studies / "modalities" / "phantom005" / "pet.nii.gz"
    saved = pet.read_bytes()
    pet.unlink()
    try:
        with pytest.raises(MONAILabelClientException) as e:
            client.infer("baseline_unet", "phantom005", {})
        assert status_of(e.value) == 422
        assert "case 'phantom005'" in e.value.msg and "modality 'pet' is missing" in e.value.msg
        out, params = client.infer("baseline_unet", "phantom005", {"missing_modality": "zero_fill"})
        assert params["modalities_used"] == ["ct", "mr"]
        # early fusion sees zeros for PET and degrades (organ Dice 0.44 measured); crossmodal is tested below
        assert load_volume(out)[0].numpy().shape == (48, 48, 48)
        models = {f: f.read_bytes() for f in phantom_server.model_dir.glob("*.pt")}
        refused = (
            "training stopped: case 'phantom005': modality 'pet' is missing: expected <studies>/modalities/phantom005/"
            "pet.nii.gz (or .nii/.nrrd/.mha); add it (a running server takes it as PUT /datastore/image?"
            'image=phantom005 with params {"modality": "pet"}), or use the case without it (missing_modality '
            "zero_fill)")
        r = requests.post(f"{phantom_server.url}/train/crossmodal?run_sync=true", json={"max_epochs": 1},
                          timeout=300)  # an unlabelled case without its PET: refused, saying what to do
        assert r.status_code == 422 and r.json()["detail"] == refused, r.text
        assert {f: f.read_bytes() for f in phantom_server.model_dir.glob("*.pt")} == models
        # the viewers' train option (the server's policy first): this run trains the case with PET left out
        assert client.info()["trainers"]["crossmodal"]["config"]["missing_modality"] == ["error", "zero_fill"]
        r = requests.post(f"{phantom_server.url}/train/crossmodal?run_sync=true",
                          json={"max_epochs": 1, "missing_modality": "leave_out"}, timeout=300)
        assert r.status_code == 422 and r.json()["detail"] == (
            "train request: missing_modality='leave_out' must be one of ['error', 'zero_fill']"), r.text
        try:
            r = requests.post(f"{phantom_server.url}/train/crossmodal?run_sync=true", timeout=300,
                              json={"max_epochs": 1, "missing_modality": "zero_fill", "name": "train_missing"})
            assert r.status_code == 200, r.text
            stats = r.json()
            assert stats["epoch"] == 1 and 0 < stats["best_metric"] <= 1, stats
            assert ("1 of 6 training cases lack a modality (phantom005: pet): each trains with it left out"
                    in phantom_server.log.read_text())
            run_cfg = load_config(str(phantom_server.model_dir / "train_missing" / "config.yaml"))
            assert run_cfg.infer.missing_modality == "zero_fill"
            with pytest.raises(MONAILabelClientException) as e:  # the infer task keeps the server's policy
                client.infer("crossmodal", "phantom005", {})
            assert status_of(e.value) == 422 and "modality 'pet' is missing" in e.value.msg
            r = requests.post(f"{phantom_server.url}/train/crossmodal?run_sync=true", json={"max_epochs": 1},
                              timeout=300)  # and the next run without the option the server's again
            assert r.status_code == 422 and r.json()["detail"] == refused, r.text
        finally:  # the committed models in service again for the tests below
            for f in phantom_server.model_dir.glob("*.pt"):
                if f not in models:
                    f.unlink()
    finally:
        pet.write_bytes(saved)


def test_saved_labels_record_their_kind(client, phantom_server, tmp_path):
    ref = load_volume(phantom_server.studies / "phantom003.nii.gz")
    aff = ref.affine.numpy()
    gt = truth(phantom_server, "phantom003")
    strokes = scribbles(gt, CFG.labels, np.random.default_rng(0))
    save_volume(tmp_path / "scribbles.nii.gz", strokes, aff)
    client.save_label("phantom003", str(tmp_path / "scribbles.nii.gz"))
    info = label_info(client, "phantom003")
    assert info["label_kind"] == "sparse" and info["annotated_fraction"] == pytest.approx((strokes != 0).mean(), 1e-4)

    small = np.zeros_like(gt, dtype=np.uint8)  # dense label of a small lesion on two slices
    small[20:23, 20:23, 24:26] = 2
    save_volume(tmp_path / "small.nrrd", small, aff)  # Slicer saves NRRD
    client.save_label("phantom004", str(tmp_path / "small.nrrd"))
    info = label_info(client, "phantom004")
    assert info["label_kind"] == "dense" and info["annotated_fraction"] == 1.0
    stored = load_volume(phantom_server.studies / "labels" / "final" / "phantom004.nrrd")[0].numpy()
    np.testing.assert_array_equal(stored, small)

    client.save_label("phantom004", str(tmp_path / "scribbles.nii.gz"), params={"label_kind": "dense"})
    assert label_info(client, "phantom004")["label_kind"] == "dense"  # explicit override of a scripted client
    assert client.info()["datastore"]["completed"] == 5
    assert {client.next_sample("crossmodal", {})["id"] for _ in range(3)} == {"phantom005"}


def test_a_label_saved_cropped_to_its_segments_is_placed_on_the_image_grid(client, phantom_server, tmp_path):
    """3D Slicer saves a segmentation cropped to its segments' extent ("Crop to minimum extent", or one without a
    reference geometry), on the image's voxel lattice: it was a 422 ("label grid ... differs from the image grid");
    now stored placed on the image's grid, exactly. Labelled voxels outside the image are a 422, nothing stored."""
    ref = load_volume(phantom_server.studies / "phantom004.nii.gz")
    aff = ref.affine.double().numpy()
    gt = truth(phantom_server, "phantom004").astype(np.uint8)
    found = np.argwhere(gt)
    lo, hi = found.min(0), found.max(0) + 1
    cropped = aff.copy()
    cropped[:3, 3] = aff[:3, :3] @ lo + aff[:3, 3]
    save_volume(tmp_path / "crop.nrrd", gt[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], cropped)
    stored = phantom_server.studies / "labels" / "cropped" / "phantom004.nrrd"
    try:
        client.save_label("phantom004", str(tmp_path / "crop.nrrd"), tag="cropped")
        back = load_volume(stored)
        assert back.shape[1:] == ref.shape[1:] and np.allclose(back.affine.double().numpy(), aff, atol=1e-4)
        np.testing.assert_array_equal(back[0].numpy(), gt)
        grown = np.zeros((gt.shape[0] + 2, *gt.shape[1:]), np.uint8)  # two slices before the image's first
        grown[2:] = gt
        grown[0, 10, 10] = 1
        before = aff.copy()
        before[:3, 3] = aff[:3, 3] - 2 * aff[:3, 0]
        save_volume(tmp_path / "past.nrrd", grown, before)
        stored.unlink()
        with pytest.raises(MONAILabelClientException) as e:
            client.save_label("phantom004", str(tmp_path / "past.nrrd"), tag="cropped")
        assert status_of(e.value) == 422 and (
            f"case 'phantom004': uploaded 'cropped' label: 1 labelled voxels lie outside the image (the label's grid "
            f"{grown.shape} from voxel (-2, 0, 0) of the image's {gt.shape}); draw within the image") in e.value.msg, \
            e.value.msg
        assert not stored.exists()
    finally:
        requests.delete(f"{phantom_server.url}/datastore/label", params={"id": "phantom004", "tag": "cropped"},
                        timeout=30)


def test_labels_as_slicer_exports_them_are_renumbered_to_the_classes(client, phantom_server, tmp_path):
    """3D Slicer numbers the segments it exports 1, 2, ... in their order, whatever their names, and its MONAI Label
    module sends the names in that order as ``label_info`` (its ``idx`` counts a left-out 'background' segment
    too); a ``.seg.nrrd`` names them in its header. Scribbles of a lesion with marked background came as 1 / 2 and
    were stored as organ / lesion, a dense label (in the brain app, marked background as Slicer's fourth segment,
    4, was refused as not configured). Now each segment gets its class's value by name; a segment that is no class,
    or overlapping segments, is a 422 naming it, and nothing is stored. A label saved in another format than the
    one before replaces it (the earlier file stayed in the labels folder)."""
    import nrrd

    studies: Path = phantom_server.studies
    ref = load_volume(studies / "phantom003.nii.gz")
    aff = ref.affine.numpy()
    exported = np.zeros(ref.shape[1:], np.uint8)
    exported[20:24, 20:24, 20:22], exported[2:6, 2:6, 2:4] = 1, 2  # Slicer's segments: lesion, marked_background
    save_volume(tmp_path / "slicer.nrrd", exported, aff)
    slicer_info = [{"name": "lesion", "idx": 2}, {"name": "marked_background", "idx": 3}]  # 'background' left out
    client.save_label("phantom003", str(tmp_path / "slicer.nrrd"), params={"label_info": slicer_info})
    stored = load_volume(studies / "labels" / "final" / "phantom003.nrrd")[0].numpy()
    want = np.zeros_like(exported)
    want[exported == 1], want[exported == 2] = CFG.labels.classes["lesion"], CFG.labels.marked_background
    np.testing.assert_array_equal(stored, want)
    info = label_info(client, "phantom003")
    assert info["label_kind"] == "sparse" and info["label_info"] == slicer_info

    segmentation = np.zeros(ref.shape[1:], np.uint8)  # a .seg.nrrd: 'background' painted (value 1), 'Organ' 2
    segmentation[10:30, 10:30, 10:30], segmentation[15:25, 15:25, 15:25] = 1, 2
    save_volume(tmp_path / "plain.seg.nrrd", segmentation, aff)
    data, header = nrrd.read(str(tmp_path / "plain.seg.nrrd"))
    fields = {"Segment0_Name": "background", "Segment0_LabelValue": "1", "Segment0_Layer": "0",
              "Segment1_Name": "Organ", "Segment1_LabelValue": "2", "Segment1_Layer": "0"}
    nrrd.write(str(tmp_path / "slicer.seg.nrrd"), data, {**header, **fields})
    client.save_label("phantom003", str(tmp_path / "slicer.seg.nrrd"))
    stored = load_volume(studies / "labels" / "final" / "phantom003.nrrd")[0].numpy()
    np.testing.assert_array_equal(stored, (segmentation == 2).astype(np.uint8) * CFG.labels.classes["organ"])
    assert label_info(client, "phantom003")["label_kind"] == "dense"
    # the label saved before as NIfTI goes: the datastore's entry names the .nrrd, and no stale file is left
    assert sorted(p.name for p in (studies / "labels" / "final").glob("phantom003*")) == ["phantom003.nrrd"]

    before = snapshot(studies)
    with pytest.raises(MONAILabelClientException) as e:
        client.save_label("phantom003", str(tmp_path / "slicer.nrrd"),
                          params={"label_info": [{"name": "tumour", "idx": 1}, {"name": "organ", "idx": 2}]})
    assert status_of(e.value) == 422 and "case 'phantom003': uploaded 'final' label: segment 'tumour' (value 1 in " \
        "the file) is not a class of this app: ['organ', 'lesion', 'vessel', 'marked_background']; rename the " \
        "segment to one of them, or delete it, and save again" in e.value.msg, e.value.msg
    fields["Segment1_Layer"] = "1"  # a segment on a second layer of a file that holds one
    nrrd.write(str(tmp_path / "overlap.seg.nrrd"), data, {**header, **fields})
    with pytest.raises(MONAILabelClientException) as e:
        client.save_label("phantom003", str(tmp_path / "overlap.seg.nrrd"))
    assert status_of(e.value) == 422 and "case 'phantom003': uploaded 'final' label: its segments name 2 layers, " \
        "but it holds one 3D array (48, 48, 48), not one 3D layer per segment layer; save it again from 3D Slicer" \
        in e.value.msg, e.value.msg
    with pytest.raises(MONAILabelClientException) as e:  # a value no segment of the save numbers
        client.save_label("phantom003", str(tmp_path / "slicer.nrrd"), params={"label_info": slicer_info[:1]})
    assert status_of(e.value) == 422 and "label values [2] in the file are none of the 1 segments the save names" \
        in e.value.msg, e.value.msg
    assert snapshot(studies) == before

    gt = truth(phantom_server, "phantom003")  # the label of the tests before, back
    save_volume(tmp_path / "scribbles.nii.gz", scribbles(gt, CFG.labels, np.random.default_rng(0)), aff)
    client.save_label("phantom003", str(tmp_path / "scribbles.nii.gz"))


def test_bad_input_is_4xx_names_the_problem_and_changes_nothing(client, phantom_server, tmp_path):
    studies: Path = phantom_server.studies
    ref = load_volume(studies / "phantom000.nii.gz")
    aff, shape = ref.affine.numpy(), tuple(ref.shape[1:])
    before = snapshot(studies)

    def rejected(call, *texts):
        with pytest.raises(MONAILabelClientException) as e:
            call()
        assert 400 <= status_of(e.value) < 500, e.value.msg
        for t in texts:
            assert t in e.value.msg, e.value.msg

    save_volume(tmp_path / "grid.nii.gz", np.zeros(shape, np.uint8), aff @ np.diag([1.0, 1.0, 1.25, 1.0]))
    rejected(lambda: client.save_label("phantom000", str(tmp_path / "grid.nii.gz")),
             "case 'phantom000'", "differs from the image grid")
    values = np.zeros(shape, np.uint8)
    values[5, 5, 5] = 7
    save_volume(tmp_path / "values.nii.gz", values, aff)
    rejected(lambda: client.save_label("phantom000", str(tmp_path / "values.nii.gz")),
             "case 'phantom000'", "label values [7] are not configured")
    good = (studies / "labels" / "final" / "phantom000.nii.gz").read_bytes()
    (tmp_path / "trunc.nii.gz").write_bytes(good[: len(good) // 3])
    rejected(lambda: client.save_label("phantom000", str(tmp_path / "trunc.nii.gz")),
             "case 'phantom000'", "uploaded 'final' label", "cannot be read")
    rejected(lambda: client.save_label("phantom000", str(tmp_path / "values.nii.gz"), params={"label_kind": "x"}),
             "label values [7]")
    save_volume(tmp_path / "empty.nii.gz", np.zeros(shape, np.uint8), aff)  # Slicer's submit before painting
    rejected(lambda: client.save_label("phantom000", str(tmp_path / "empty.nii.gz")),
             "case 'phantom000': uploaded 'final' label: the label is empty",
             'save it with params {\\"allow_empty\\": true}')  # JSON-escaped

    nan = ref[0].numpy().copy()
    nan[3, 3, 3] = np.nan
    save_volume(tmp_path / "nan_image.nii.gz", nan, aff)
    rejected(lambda: client.upload_image(str(tmp_path / "nan_image.nii.gz"), "nan_case"),
             "case 'nan_case'", "uploaded image", "holds 1 non-finite voxels")
    rejected(lambda: client.infer("baseline_unet", "uploaded", {}, file=str(tmp_path / "nan_image.nii.gz")),
             "non-finite")
    # ids and tags are joined to the studies folder: '../x' was written outside it (upload 200, label 200)
    rejected(lambda: client.upload_image(str(studies / "phantom005.nii.gz"), "../outside"),
             "case '../outside': an image id must be a file name (no '/' or ",  # the backslash comes JSON-escaped
             "not starting with '.'), got '../outside'")
    rejected(lambda: client.save_label("phantom000", str(studies / "labels" / "final" / "phantom000.nii.gz"),
                                       tag="../../escaped"),
             "case 'phantom000': a label tag must be a file name", "got '../../escaped'")
    assert not (studies.parent / "outside.nii.gz").exists() and not (studies.parent / "escaped").exists()
    (tmp_path / "trunc_image.nii.gz").write_bytes((studies / "phantom000.nii.gz").read_bytes()[:5000])
    rejected(lambda: client.upload_image(str(tmp_path / "trunc_image.nii.gz"), "trunc_case"),
             "case 'trunc_case'", "cannot be read")

    mr = studies / "modalities" / "phantom005" / "mr.nii.gz"
    saved = mr.read_bytes()
    mr.write_bytes(saved[: len(saved) // 2])  # an unreadable modality file of a case
    try:
        rejected(lambda: client.infer("baseline_unet", "phantom005", {}),
                 "case 'phantom005'", "modalities/phantom005/mr.nii.gz", "cannot be read")
    finally:
        mr.write_bytes(saved)

    rejected(lambda: client.upload_image(str(studies / "phantom005.nii.gz"), "phantom000"),
             "case 'phantom000' already exists")
    (tmp_path / "noext").write_bytes((studies / "phantom005.nii.gz").read_bytes())  # was: "cannot be read ... <temp>"
    rejected(lambda: client.upload_image(str(tmp_path / "noext"), "noext"),
             "case 'noext': uploaded image: extension '' is not one of ['.nii.gz', '.nii', '.nrrd', '.mha']")
    (tmp_path / "pair.mhd").write_text("NDims = 3\nDimSize = 2 2 2\nElementType = MET_UCHAR\n"
                                       "ElementDataFile = pair.raw\n")
    (tmp_path / "pair.raw").write_bytes(bytes(8))
    rejected(lambda: client.upload_image(str(tmp_path / "pair.mhd"), "pair"),
             "case 'pair': uploaded image: extension '.mhd' is not one of ['.nii.gz', '.nii', '.nrrd', '.mha'] (the "
             "upload's file name gives it) (a .mhd header's voxels lie in another file, which an upload does not "
             "carry: send one .mha)")
    (tmp_path / "drawn.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    rejected(lambda: client.save_label("phantom000", str(tmp_path / "drawn.png")),
             "case 'phantom000': label extension '.png' unsupported; send it as .nii.gz, .nii, .seg.nrrd, .nrrd or "
             ".mha")
    rejected(lambda: client.upload_image(str(mr), "phantom000", params={"modality": "spect"}),
             "case 'phantom000': modality 'spect' is not one of the secondary modalities ['pet', 'mr']")

    # a `params` / `info` form field that is not a JSON object (each was a 500 from MONAI Label's json.loads)
    url, final = phantom_server.url, studies / "labels" / "final" / "phantom000.nii.gz"
    for method, path, field, value, files in (
            ("post", "/infer/baseline_unet?image=phantom000", "params", "{bad", None),
            ("put", "/datastore/label?image=phantom000&tag=final", "params", "[1]", {"label": final}),
            ("put", "/datastore/?image=phantom000", "params", "{bad", {"file": studies / "phantom000.nii.gz"}),
            ("put", "/datastore/image/info?image=phantom000", "info", "{bad", None),
            ("put", "/datastore/label/info?label=phantom000&tag=final", "info", '"final"', None)):
        opened = {k: (f.name, f.read_bytes()) for k, f in (files or {}).items()}
        r = getattr(requests, method)(url + path, data={field: value}, files=opened or None, timeout=60)
        problem = "is not JSON (Expecting" if value == "{bad" else "is JSON but not an object"
        assert r.status_code == 422 and r.json()["detail"].startswith(
            f"image 'phantom000': the form field `{field}` {problem}"), (path, r.status_code, r.text)
        assert f"send a JSON object, e.g. {field}=" in r.json()["detail"]
    # NaN / Infinity, which Python's json reads and JSON has not: a next-sample request's client_id NaN was recorded
    # in the case's info (200), and the listing, that case's info and every next-sample request were 500s for good
    r = requests.put(f"{url}/datastore/image/info?image=phantom000", data={"info": '{"note": NaN}'}, timeout=60)
    assert r.status_code == 422 and r.json()["detail"] == (
        "image 'phantom000': the form field `info` holds NaN, which JSON does not have: '{\"note\": NaN}'; send a "
        "number or null")
    for path, body, what in (("/activelearning/random", '{"client_id": NaN}', "next-sample request: `client_id`"),
                             ("/activelearning/crossmodal", '{"client_id": "a", "x": [1, -Infinity]}',
                              "next-sample request: `x[1]`"),
                             ("/train/baseline_unet?run_sync=true", '{"max_epochs": 1, "x": {"y": Infinity}}',
                              "train request: `x.y`")):
        r = requests.post(url + path, data=body, headers={"Content-Type": "application/json"}, timeout=60)
        assert r.status_code == 422 and r.json()["detail"] == (
            f"{what} is NaN or Infinity, which JSON does not have; send a number or null"), r.text
    assert requests.get(f"{url}/datastore/?output=all", timeout=60).status_code == 200

    assert snapshot(studies) == before
    assert requests.get(f"{phantom_server.url}/info/", timeout=10).status_code == 200
    # no copy of a refused upload stays in the server's temp folder (each one did, mode 0644, for good)
    refused = {p.read_bytes() for p in (tmp_path / "grid.nii.gz", tmp_path / "values.nii.gz", tmp_path / "trunc.nii.gz",
                                        tmp_path / "nan_image.nii.gz", tmp_path / "trunc_image.nii.gz", mr,
                                        studies / "phantom005.nii.gz", studies / "labels/final/phantom000.nii.gz",
                                        tmp_path / "drawn.png", tmp_path / "empty.nii.gz")}
    kept = [p.name for p in phantom_server.tmp.rglob("*") if p.is_file() and p.read_bytes() in refused]
    assert kept == []


def test_unknown_names_and_bad_train_numbers_are_4xx_that_say_what_is_served(client, phantom_server):
    url, before = phantom_server.url, snapshot(phantom_server.studies)
    r = requests.post(f"{url}/infer/nomodel?image=phantom003", timeout=60)
    assert r.status_code == 404 and r.json()["detail"] == (
        "model 'nomodel' is not served here; served: ['baseline_unet', 'crossmodal', 'grow_scribbles']")
    r = requests.post(f"{url}/infer/crossmodal?image=nope", timeout=60)
    assert r.status_code == 404 and r.json()["detail"] == "case 'nope': no such image in the datastore"
    r = requests.post(f"{url}/infer/crossmodal", params={"image": "phantom003", "output": "dicom_seg"}, timeout=60)
    assert r.status_code == 422 and r.json()["detail"].startswith(  # was a 500 after the inference, its file left
        "output=dicom_seg: this server writes no DICOM SEG in an infer response; ask for output=image")
    assert list(phantom_server.tmp.glob("crossmodal-*")) == []
    r = requests.post(f"{url}/train/nomodel", json={}, timeout=60)  # was 200 SUBMITTED, then a failed task
    assert r.status_code == 404 and r.json()["detail"] == (
        "model 'nomodel' is not served here; served: ['baseline_unet', 'crossmodal', 'grow_scribbles']")
    r = requests.post(f"{url}/activelearning/nostrategy", json={}, timeout=60)
    assert r.status_code == 404 and r.json()["detail"] == (
        "strategy 'nostrategy' is not served here; served: ['crossmodal', 'random']")
    r = requests.post(f"{url}/activelearning/crossmodal", json={"refine_spars": True}, timeout=60)  # was ignored
    assert r.status_code == 422 and r.json()["detail"] == (
        "next-sample request: refine_spars is not an option; did you mean refine_sparse?")
    for sync in ("true", "false"):  # was ignored; then asynchronous: 200 SUBMITTED, the task failed in the background
        r = requests.post(f"{url}/scoring/crossmodal?run_sync={sync}", json={"devce": "cpu"}, timeout=60)
        assert r.status_code == 422 and r.json()["detail"] == (
            "scoring request: devce is not an option; did you mean device?")
    for body, detail in (  # each was 200 SUBMITTED, then every case failed with it in the background
            ({"mirror_axis": [0]}, "mirror_axis is not an option of model 'crossmodal'; did you mean mirror_axes?"),
            ({"device": "tpu"}, "device 'tpu' must be cpu, cuda or cuda:<index>"),
            ({"prediction": "xray"}, "prediction 'xray' must be one of ['fused', 'uncertainty', 'ct', 'pet', 'mr']")):
        r = requests.post(f"{url}/batch/infer/crossmodal", params={"images": "unlabeled"}, json=body, timeout=60)
        assert r.status_code == 422 and r.json()["detail"] == f"batch infer request: {detail}", r.text
    with open(phantom_server.studies / "modalities" / "phantom003" / "mr.nii.gz", "rb") as f:  # was a 409 "exists"
        r = requests.put(f"{url}/datastore/image", params={"image": "phantom003"}, timeout=60,
                         files={"file": ("mr.nii.gz", f)}, data={"params": json.dumps({"modalty": "mr"})})
    assert r.status_code == 422 and r.json()["detail"] == (
        "case 'phantom003': upload params: modalty is not an option; did you mean modality?")
    for sync in ("true", "false"):  # was a bare 500; asynchronous: 200, then a task that failed out of sight
        r = requests.post(f"{url}/scoring/nomethod?run_sync={sync}", timeout=60)
        assert r.status_code == 404 and r.json()["detail"] == (
            "scoring method 'nomethod' is not served here; served: ['crossmodal']")
    for path, params, detail in (  # each was {} 200, as for a case without infos
            ("image/info", {"image": "nope"}, "case 'nope': no such image in the datastore"),
            ("label/info", {"label": "nope", "tag": "final"}, "case 'nope': no such image in the datastore"),
            ("label/info", {"label": "phantom000", "tag": "finale"},
             "case 'phantom000': no 'finale' label (its labels: ['final'])")):
        r = requests.get(f"{url}/datastore/{path}", params=params, timeout=60)
        assert r.status_code == 404 and r.json()["detail"] == detail, (path, params, r.text)
    r = requests.get(f"{url}/datastore/label/info", params={"label": "phantom000", "tag": "final"}, timeout=60)
    assert r.status_code == 200 and r.json()["label_kind"] == "dense"
    r = requests.get(f"{url}/datastore/image/info", params={"image": "phantom000"}, timeout=60)
    assert r.status_code == 200 and r.json()["name"] == "phantom000.nii.gz"
    r = requests.delete(f"{url}/datastore/image", params={"id": "nope"}, timeout=60)  # was a bare 500
    assert r.status_code == 404 and r.json()["detail"] == "case 'nope': no such image in the datastore"
    r = requests.delete(f"{url}/datastore/label", params={"id": "nope", "tag": "final"}, timeout=60)  # was 200
    assert r.status_code == 404 and r.json()["detail"] == "case 'nope': no such image in the datastore"
    r = requests.delete(f"{url}/datastore/label", params={"id": "phantom000", "tag": "finale"}, timeout=60)  # was 200
    assert r.status_code == 404 and r.json()["detail"] == "case 'phantom000': no 'finale' label (its labels: ['final'])"
    r = requests.get(f"{url}/train/", params={"all": "true"}, timeout=60)  # 404 where no task ever ran
    queued = r.json() if r.status_code == 200 else []
    for params, detail in (({"max_epochs": -3}, "train request: max_epochs=-3 must be a positive integer"),
                           ({"max_epoch": 1},  # was: ignored, and the run trained the preset's epochs
                            "train request: max_epoch is not an option of this task; did you mean max_epochs?"),
                           ({"learning_rate": "fast"}, "train request: learning_rate='fast' must be a number > 0"),
                           ({"dataset": "PersistentDataset"},  # was: read as Dataset, silently
                            "train request: dataset='PersistentDataset' must be one of ['Dataset', 'CacheDataset']"),
                           ({"pretrained": "maybe"}, "train request: pretrained='maybe' must be true or false"),
                           ({"seed": -1}, "train request: seed=-1 must be an integer from 0 to 2^32 - 1"),
                           ({"val_batch_size": 2},  # MONAI's collate: "Collate error on the key 'image'" for two sizes
                            "train request: val_batch_size=2 must be 1: validation segments each held-out case whole, "
                            "and cases of different sizes do not stack into one batch (the sliding window batches "
                            "within a case: infer.sw_batch_size)"),
                           ({"val_interval": 5, "max_epochs": 3},  # was: trained, validated never, published nothing
                            "train request: val_interval=5 is more than max_epochs=3: no epoch would validate, so none "
                            "would be published; lower val_interval or raise max_epochs"),
                           ({"processes": 4096, "device": "cpu"},  # was: 4096 trainers spawned, killed for memory
                            f"train request: processes=4096 but this machine has {usable_cores()} usable CPU core(s): "
                            "at most one process a core"),
                           ({"name": "../../outside"},  # was: the run folder written outside the model dir
                            "train request: name='../../outside' must be a folder name (letters, digits, '_', '.', "
                            "'-'), or empty for the next train_NN")):
        for sync in ("true", "false"):  # asynchronous (the viewers'): was 200 SUBMITTED, the 422 in the task's status
            r = requests.post(f"{url}/train/baseline_unet?run_sync={sync}", json=params, timeout=120)
            assert r.status_code == 422 and r.json()["detail"] == detail, (sync, r.text)
    r = requests.post(f"{url}/train/crossmodal", json={"max_epochs": 0}, timeout=60)
    assert r.status_code == 422 and r.json()["detail"] == "train request: max_epochs=0 must be a positive integer"
    r = requests.get(f"{url}/train/", params={"all": "true"}, timeout=60)
    assert queued == (r.json() if r.status_code == 200 else [])  # none of them was queued
    assert not list(phantom_server.model_dir.glob("*.pt"))  # nothing trained or published
    assert not run_folders(phantom_server.model_dir)  # and no run folder left by a refused request
    assert snapshot(phantom_server.studies) == before


def wait_for_training(client, seconds: float = 400) -> None:
    """Until the running training ends (at most ``seconds``)."""
    deadline = time.time() + seconds
    time.sleep(3)
    while client.train_status(check_if_running=True) and time.time() < deadline:
        time.sleep(2)


def test_train_publishes_a_model_that_infer_reloads(client, phantom_server):
    """The default run (publish=if_better) validates the committed model first and publishes an epoch only when it
    beats it; publish=best_of_run publishes the run's best, which infer then reloads."""
    published = phantom_server.model_dir / "phantom_baseline_unet.pt"
    assert not published.exists()
    client.infer("baseline_unet", "phantom005", {})  # the committed model in the server's cache, to be replaced
    client.train_start("baseline_unet", {"max_epochs": 2})
    wait_for_training(client)
    info = client.info()["train_stats"]
    stats = info["baseline_unet"]
    assert 0.5 < stats["start_metric"] <= 1 and stats["epoch"] == 2
    # each model's own stats (one train_stats.json for both showed this run as the cross-modal model's too)
    assert json.loads((phantom_server.model_dir / "phantom_baseline_unet_train_stats.json").read_text()) == stats
    assert info["crossmodal"] != stats
    assert published.is_file() == (stats["best_metric"] > stats["start_metric"]), stats
    assert "held-out val_mean_dice of the starting model" in phantom_server.log.read_text()
    published.unlink(missing_ok=True)  # the committed model in service again

    started = time.time()
    client.train_start("baseline_unet", {"max_epochs": 2, "tracking": "mlflow", "publish": "best_of_run",
                                         "val_interval": 2, "seed": 1})  # validates the second epoch only
    # (another seed: with the first's, from the same model on the same cases, it trained the first's weights, bit
    # for bit, where no test before this one had trained)
    wait_for_training(client)
    assert published.is_file() and published.stat().st_mtime > started
    stats = client.info()["train_stats"]["baseline_unet"]
    assert "start_metric" not in stats
    assert stats["total_epochs"] == 2 and stats["epoch"] == 2
    assert 0.0 < stats["best_metric"] <= 1.0
    assert (phantom_server.model_dir / "mlflow.db").is_file()  # MLflow on sqlite, not the rejected file:// URI
    # each run in its own folder (MONAI Label's train_01 was both's): the first's model is kept, out of service
    runs = list_runs(phantom_server.model_dir)
    assert [(r.name, r.network, r.in_service, r.epoch, r.stopped) for r in runs] == [
        ("train_01", "baseline_unet", False, 2, None), ("train_02", "baseline_unet", True, 2, None)]
    assert runs[0].start is not None and runs[1].start is None and runs[1].best == pytest.approx(stats["best_metric"])
    curve = json.loads((phantom_server.model_dir / "train_02" / "learning_curve.json").read_text())
    assert [r["epoch"] for r in curve] == [1, 2] and all(r["loss_supervised"] > 0 for r in curve)
    assert "val_mean_dice" not in curve[0] and curve[1]["val_mean_dice"] == pytest.approx(stats["best_metric"],
                                                                                         abs=1e-5)
    assert (phantom_server.model_dir / "train_02" / "learning_curve.png").stat().st_size > 10_000
    # the sparse labels were grown by the random walker once, then read from the cache in the second epoch
    objects = client.datastore()["objects"]
    kinds = {c: o["labels"].get("final", {}).get("info", {}).get("label_kind") for c, o in objects.items()}
    sparse = {c for c, kind in kinds.items() if kind == "sparse"}
    grown = {p.name.split(".")[0] for p in (phantom_server.model_dir / "propagated").glob("*.npz")}
    assert grown and grown <= sparse
    log = phantom_server.log.read_text()
    assert "sparse label grown by the random walker" in log and "of the voxels in" in log and "(cached)" in log

    out, params = client.infer("baseline_unet", "phantom005", {})
    reloads = phantom_server.log.read_text().count("Reload model from cache")
    assert reloads >= 1
    assert dice(load_volume(out)[0].numpy(), truth(phantom_server, "phantom005"), 1) > 0.5
    # `crossmodal models --publish train_01` while the server runs: the next infer request reloads that model
    publish_run(phantom_server.model_dir, "train_01")
    assert [r.in_service for r in list_runs(phantom_server.model_dir)] == [True, False]
    again, _ = client.infer("baseline_unet", "phantom005", {})
    assert phantom_server.log.read_text().count("Reload model from cache") == reloads + 1
    assert dice(load_volume(again)[0].numpy(), truth(phantom_server, "phantom005"), 1) > 0.5


def test_a_training_stopped_mid_run_leaves_a_whole_model_in_service(client, phantom_server, tmp_path):
    """The viewers' Stop (MONAI Label SIGKILLs the training process) during a run that publishes: every read of the
    published file meanwhile is a whole checkpoint (temp file + os.replace), and afterwards infer serves it.
    Runs after test_train_publishes..., whose model is the one in service at the start."""
    import io

    published = phantom_server.model_dir / "phantom_baseline_unet.pt"
    start = published.read_bytes()
    client.train_start("baseline_unet", {"max_epochs": 50, "publish": "best_of_run"})  # publishes its first epoch
    reads, changed_at, deadline = 0, None, time.time() + 180
    while time.time() < deadline and (changed_at is None or time.time() < changed_at + 4):
        data = published.read_bytes()
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)  # never half-written
        reads += 1
        if changed_at is None and data != start:
            changed_at = time.time()  # the run published its first epoch; keep reading through a few more
    assert changed_at is not None, "the run published nothing within 180 s"
    assert client.train_status(check_if_running=True)  # still running: the stop lands mid-run
    assert list_runs(phantom_server.model_dir)[-1].stopped == "running"  # `crossmodal models` says so
    client.train_stop()
    deadline = time.time() + 60
    while client.train_status(check_if_running=True) and time.time() < deadline:
        time.sleep(1)
    assert not client.train_status(check_if_running=True)
    deadline = time.time() + 20  # the kill of the training process (a child of the one MONAI Label ran) lands
    while (run := list_runs(phantom_server.model_dir)[-1]).stopped == "running" and time.time() < deadline:
        time.sleep(0.5)
    assert run.stopped == "killed" and run.epoch < run.total_epochs == 50, run  # looked like 3 epochs of 3
    check_weights(CFG_BASELINE, str(published))  # whole and fitting the network
    assert reads > 20
    reloads = phantom_server.log.read_text().count("Reload model from cache")
    out, _ = client.infer("baseline_unet", "phantom003", {})
    assert phantom_server.log.read_text().count("Reload model from cache") == reloads + 1
    # what infer serves is the published file's segmentation (this process, same code; a stopped run's model and so
    # its Dice depend on the machine's speed)
    parts = AppParts.from_conf(str(tmp_path), {"preset": "phantom", "pretrained": str(published),
                                               "models": "baseline_unet"})
    _, mine = parts.infer()({"image": str(phantom_server.studies / "phantom003.nii.gz"), "skip_writer": True,
                             "device": "cpu"})
    served = load_volume(out)[0].numpy()
    assert served.shape == mine["pred"].shape and np.mean(served == mine["pred"].numpy()) > 0.999


def test_train_on_an_unreadable_case_says_which_and_keeps_the_published_model(client, phantom_server):
    """Sync train (run_sync, either loader): 422 naming the case and the file, not a bare 500; async (the viewers'
    Train): the task ends in ERROR with that line last; either way the model in service stays byte for byte and
    segments the case voxel for voxel as before."""
    models = {p: p.read_bytes() for p in phantom_server.model_dir.glob("*.pt")}
    before, _ = client.infer("baseline_unet", "phantom001", {})
    before = load_volume(before)[0].numpy()
    mr = phantom_server.studies / "modalities" / "phantom001" / "mr.nii.gz"  # a dense case: every network reads it
    saved = mr.read_bytes()
    mr.write_bytes(saved[: len(saved) // 2])
    try:
        r = requests.post(f"{phantom_server.url}/train/baseline_unet?run_sync=true", json={"max_epochs": 1},
                          timeout=300)
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert detail.startswith("training stopped: case 'phantom001': file ") and str(mr) in detail, detail
        assert "cannot be read as NIfTI/NRRD" in detail
        # MONAI's ThreadDataLoader ended the epoch at that case, silently: here the held-out one, so validation
        # aggregated nothing and the request was a 500 ("the data to aggregate must be PyTorch Tensor, got NoneType")
        r = requests.post(f"{phantom_server.url}/train/baseline_unet?run_sync=true", timeout=300,
                          json={"max_epochs": 1, "dataloader": "ThreadDataLoader"})
        assert r.status_code == 422 and r.json()["detail"] == detail, r.text
        client.train_start("baseline_unet", {"max_epochs": 1})
        wait_for_training(client, 300)
        task = client.train_status()
        assert task["status"] == "ERROR", task
        assert "training stopped: case 'phantom001'" in task["details"][-1], task["details"][-3:]
    finally:
        mr.write_bytes(saved)
    assert {p: p.read_bytes() for p in phantom_server.model_dir.glob("*.pt")} == models
    out, _ = client.infer("baseline_unet", "phantom001", {})
    # the model in service comes from a run stopped at a machine-dependent epoch: its Dice is not this test's point
    assert np.array_equal(load_volume(out)[0].numpy(), before) and set(np.unique(before)) > {0}


def test_the_same_train_request_trains_the_same_model(client, phantom_server):
    """A train request's ``seed`` (default the preset's ``train.seed``, listed in the trainer's config) seeds the run:
    the same request trains the same weights, bit for bit, synchronously in the server and in MONAI Label's
    background process (the viewers' Train); another seed trains others. Until 2026-12-04 every run drew its own
    initial weights. From scratch, one epoch: none beats the model in service, so none is published."""
    import shutil

    assert client.info()["trainers"]["baseline_unet"]["config"]["seed"] == 0
    models = {p: p.read_bytes() for p in phantom_server.model_dir.glob("*.pt")}
    request = {"max_epochs": 1, "pretrained": False}
    try:  # the run folders go whatever happens: later tests list the runs
        r = requests.post(f"{phantom_server.url}/train/baseline_unet?run_sync=true",
                          json={**request, "name": "seeded_a"}, timeout=300)
        assert r.status_code == 200, r.text
        client.train_start("baseline_unet", {**request, "name": "seeded_b"})
        wait_for_training(client, 300)
        assert client.train_status()["status"] == "DONE"
        r = requests.post(f"{phantom_server.url}/train/baseline_unet?run_sync=true",
                          json={**request, "name": "seeded_c", "seed": 7}, timeout=300)
        assert r.status_code == 200, r.text
        a, b, c = (torch.load(phantom_server.model_dir / name / "checkpoint_final.pt", map_location="cpu")
                   for name in ("seeded_a", "seeded_b", "seeded_c"))
        assert a.keys() == b.keys() == c.keys()
        assert all(torch.equal(v, b[k]) for k, v in a.items())
        assert sum(not torch.equal(v, c[k]) for k, v in a.items()) > len(a) // 2
        assert {p: p.read_bytes() for p in phantom_server.model_dir.glob("*.pt")} == models
    finally:
        for name in ("seeded_a", "seeded_b", "seeded_c"):
            shutil.rmtree(phantom_server.model_dir / name, ignore_errors=True)


def test_a_diverging_training_is_a_422_and_leaves_the_model_in_service_as_it_was(client, phantom_server):
    """A learning rate no network survives: the loss turns NaN; the run stops before that step's update, says what to
    lower, and the published model and its stats are those of before the run (NaN weights were published)."""
    kept = {p: p.read_bytes() for p in phantom_server.model_dir.glob("*") if p.suffix in (".pt", ".json")}
    before, _ = client.infer("crossmodal", "phantom001", {})
    before = load_volume(before)[0].numpy()
    r = requests.post(f"{phantom_server.url}/train/crossmodal?run_sync=true", timeout=300,
                      json={"max_epochs": 2, "learning_rate": 1e30})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail.startswith("training stopped: the loss is not finite (NaN / Inf) at epoch "), detail
    assert detail.endswith("; that step was not applied and the model in service is the one from before this run. "
                           "Lower the learning rate (this run's: 1e+30; the train request's `learning_rate`, or the "
                           "config's `train.learning_rate`) and train again"), detail
    assert {p: p.read_bytes() for p in phantom_server.model_dir.glob("*") if p.suffix in (".pt", ".json")} == kept
    out, _ = client.infer("crossmodal", "phantom001", {})
    assert np.array_equal(load_volume(out)[0].numpy(), before) and set(np.unique(before)) > {0}
    # such a run used to publish stats holding NaN, and every GET /info/ (the viewers' connect) was then a 500
    stats_file = phantom_server.model_dir / "phantom_crossmodal_train_stats.json"
    stats_file.write_text('{"epoch": 2, "train": {"metrics": {"loss_supervised": NaN, "train_mean_dice": 0.0}}}')
    try:
        assert client.info()["train_stats"]["crossmodal"] == {"epoch": 2, "train": {"metrics": {
            "loss_supervised": None, "train_mean_dice": 0.0}}}
    finally:
        if stats_file in kept:
            stats_file.write_bytes(kept[stats_file])
        else:
            stats_file.unlink()


def test_a_fine_tuning_that_wrecks_the_model_with_a_finite_loss_leaves_the_model_in_service(client, phantom_server):
    """No label held out (``val_split`` 0) and AdamW steps of 1.0: the loss stays finite, the last model would be
    published (it was, segmenting nothing). The run checks that its last model still fits the labels it trained
    on; it does not, so the model in service stays and the viewers' train stats say why."""
    kept = {p: p.read_bytes() for p in phantom_server.model_dir.glob("*.pt")}
    stats_file = phantom_server.model_dir / "phantom_crossmodal_train_stats.json"
    stats = stats_file.read_bytes() if stats_file.is_file() else None
    before, _ = client.infer("crossmodal", "phantom001", {})
    before = load_volume(before)[0].numpy()
    try:
        r = requests.post(f"{phantom_server.url}/train/crossmodal?run_sync=true", timeout=300,
                          json={"max_epochs": 1, "learning_rate": 1.0, "val_split": 0})
        assert r.status_code == 200, r.text
        fit = client.info()["train_stats"]["crossmodal"]["training_fit"]
        assert fit["key"] == "val_mean_dice" and not fit["published"], fit
        assert fit["start"] > 0.5 and fit["end"] < fit["start"] - 0.05, fit
        assert {p: p.read_bytes() for p in phantom_server.model_dir.glob("*.pt")} == kept
        out, _ = client.infer("crossmodal", "phantom001", {})
        assert np.array_equal(load_volume(out)[0].numpy(), before) and set(np.unique(before)) > {0}
    finally:  # the other tests' server as they know it
        if stats is None:
            stats_file.unlink(missing_ok=True)
        else:
            stats_file.write_bytes(stats)


def test_brain_demo_is_segmented_usefully_by_the_committed_model(tmp_path):
    """`make run`'s set-up: brain studies, preset brain, the committed weights; held-out Dice on real MR."""
    from conftest import PRETRAINED_BRAIN, SPM_DIR, start_server, stop_server
    from crossmodal.data.brain import load_templates, make_brain_case
    from crossmodal.data.studies import generate

    cfg = load_config("brain")
    templates = load_templates(SPM_DIR)
    generate(tmp_path / "studies", cfg, lambda rng: make_brain_case(cfg, templates, rng), 2, 1, "brain")
    server = start_server(tmp_path / "studies", tmp_path / "model", tmp_path / "server.log", {"preset": "brain"})
    try:
        c = MONAILabelClient(server.url, tmpdir=str(tmp_path))
        info = c.info()
        assert info["models"]["baseline_unet"]["labels"] == {"grey_matter": 1, "white_matter": 2, "csf": 3,
                                                             "marked_background": 255}
        assert list(info["models"]) == ["crossmodal", "baseline_unet", "grow_scribbles"]
        for model in ("crossmodal", "baseline_unet"):
            for case in ("brain000", "brain001"):
                out, params = c.infer(model, case, {})
                assert params["modalities_used"] == ["t1", "t2", "pd"]
                pred = load_volume(out)[0].numpy()
                gt = load_volume(tmp_path / "studies" / "truth" / f"{case}.nii.gz")[0].numpy()
                scores = [dice(pred, gt, v) for v in (1, 2, 3)]
                # held-out Dice of the committed models: apps/crossmodal/pretrained/brain_*.eval.json
                assert min(scores) > 0.55 and np.mean(scores) > 0.7, (model, scores)
    finally:
        stop_server(server)
    assert PRETRAINED_BRAIN.is_file()


def test_crossmodal_is_the_default_model_and_segments_from_all_modalities(client, phantom_server):
    info = client.info()
    assert list(info["models"])[:2] == ["crossmodal", "baseline_unet"] and "crossmodal" in info["trainers"]
    scores = []
    for case in sorted(UNLABELED):
        out, params = client.infer("crossmodal", case, {})
        assert params["modalities_used"] == ["ct", "pet", "mr"] and params["prediction"] == "fused"
        pred = load_volume(out)
        assert tuple(pred.shape[1:]) == (48, 48, 48)
        scores.append([dice(pred[0].numpy(), truth(phantom_server, case), v) for v in (1, 2, 3)])
    mean = np.mean(scores, axis=0)
    # held-out Dice of the committed model: apps/crossmodal/pretrained/phantom_crossmodal.eval.json (0.93)
    assert mean.min() > 0.75 and mean.mean() > 0.85, f"Dice organ/lesion/vessel {mean}"


def test_crossmodal_optional_outputs_and_missing_modality(client, phantom_server):
    gt = truth(phantom_server, "phantom005")
    out, params = client.infer("crossmodal", "phantom005", {"prediction": "pet"})
    assert params["prediction"] == "pet"
    pet_only = load_volume(out)[0].numpy()
    assert dice(pet_only, gt, 2) > 0.5  # the PET head sees the lesion
    out, params = client.infer("crossmodal", "phantom005", {"prediction": "uncertainty", "mc_samples": 4})
    unc = load_volume(out)[0].numpy()
    assert unc.shape == gt.shape and 0 <= unc.min() and unc.max() <= 100 and unc.max() > 10
    from scipy.ndimage import binary_dilation, binary_erosion

    organ = gt == 1
    boundary = binary_dilation(organ, iterations=1) & ~binary_erosion(organ, iterations=1)
    assert unc[boundary].mean() > unc[~binary_dilation(organ, iterations=4) & (gt == 0)].mean()
    # a prediction no model has: refused before the inference, naming the heads (it was after it, naming only the
    # fused output that inference had made); the baseline has no heads; a head whose modality was left out has none
    for model, params, detail in (
            ("crossmodal", {"prediction": "xray"},
             "prediction 'xray' must be one of ['fused', 'uncertainty', 'ct', 'pet', 'mr']"),
            ("baseline_unet", {"prediction": "pet"}, "prediction 'pet' must be one of ['fused', 'uncertainty']"),
            ("crossmodal", {"prediction": "pet", "drop_modalities": "pet"},
             "prediction 'pet' is not available; choose one of ['fused', 'ct', 'mr', 'uncertainty']")):
        with pytest.raises(MONAILabelClientException) as e:
            client.infer(model, "phantom005", params)
        assert status_of(e.value) == 422 and e.value.msg.endswith(f'{{"detail":"case \'phantom005\': {detail}"}}'), \
            e.value.msg
    # before anything runs (5000 samples held the server for minutes; "abc" and device "tpu" were a bare 500)
    for params, detail in (({"prediction": "uncertainty", "mc_samples": 5000},
                            "mc_samples=5000 must be an integer from 1 to 64"),
                           ({"mc_samples": "abc"}, "mc_samples='abc' must be an integer from 1 to 64"),
                           ({"device": "tpu"}, "device 'tpu' must be cpu, cuda"),  # (+ a GPU's name, if any)
                           ({"overlap": 1.5}, "overlap: 1.5 must be a number from 0 up to, not including, 1"),
                           ({"sw_batch_size": "x"}, "sw_batch_size: 'x' must be an integer from 1 to 64")):
        with pytest.raises(MONAILabelClientException) as e:
            client.infer("crossmodal", "phantom005", params)
        assert status_of(e.value) == 422 and f"case 'phantom005': {detail}" in e.value.msg, e.value.msg

    pet = phantom_server.studies / "modalities" / "phantom005" / "pet.nii.gz"
    saved = pet.read_bytes()
    pet.unlink()
    try:
        out, params = client.infer("crossmodal", "phantom005", {"missing_modality": "zero_fill"})
        assert params["modalities_used"] == ["ct", "mr"]
        ours = dice(load_volume(out)[0].numpy(), gt, 1)
        base, _ = client.infer("baseline_unet", "phantom005", {"missing_modality": "zero_fill"})
        assert ours > 0.7 and ours > dice(load_volume(base)[0].numpy(), gt, 1)  # organ from CT + MR alone
    finally:
        pet.write_bytes(saved)
    # the sliding window's settings, as text too (one window holds the phantom: the same label)
    plain, _ = client.infer("crossmodal", "phantom005", {})
    windowed, _ = client.infer("crossmodal", "phantom005", {"overlap": "0.5", "sw_batch_size": 2})
    assert np.array_equal(load_volume(windowed).numpy(), load_volume(plain).numpy())
    dropped, params = client.infer("crossmodal", "phantom005", {"drop_modalities": "pet"})  # present, left out
    assert params["modalities_used"] == ["ct", "mr"] and dice(load_volume(dropped)[0].numpy(), gt, 1) == ours
    with pytest.raises(MONAILabelClientException) as e:
        client.infer("crossmodal", "phantom005", {"drop_modalities": "xray"})
    assert status_of(e.value) == 422 and "cannot drop ['xray']" in e.value.msg


def test_a_multimodal_case_uploads_through_the_datastore_api(client, phantom_server, tmp_path):
    """``PUT /datastore/image`` (MONAILabelClient.upload_image) takes a case's primary image, then each secondary
    modality with ``{"modality": name}`` in its params (before, an upload could only add a primary, whose case then
    had no PET or MR); removing the case removes its modalities too."""
    case = make_phantom(CFG, np.random.default_rng(1234), size=48)
    files = write_case(tmp_path / "new", "upl001", case, CFG)
    sidecars = phantom_server.studies / "modalities" / "upl001"
    try:
        with pytest.raises(MONAILabelClientException) as e:  # a modality needs its case
            client.upload_image(str(files["pet"]), "upl001", {"modality": "pet"})
        assert status_of(e.value) == 404 and ("case 'upl001': no such image in the datastore; upload its primary "
                                              "image (ct) first") in e.value.msg
        assert client.upload_image(str(files["ct"]), "upl001")["image"] == "upl001"
        # an image under an existing case's id: refused (upstream replaced the image and dropped the case's labels)
        labelled = phantom_server.studies / "phantom000.nii.gz"
        kept = labelled.read_bytes()
        with pytest.raises(MONAILabelClientException) as e:
            client.upload_image(str(files["ct"]), "phantom000")
        assert status_of(e.value) == 409 and ("case 'phantom000' already exists (labels: ['final']); remove it first "
                                              "(DELETE /datastore/image?id=phantom000) or upload under another id"
                                              ) in e.value.msg, e.value.msg
        assert labelled.read_bytes() == kept and label_info(client, "phantom000")["label_kind"] == "dense"
        with pytest.raises(MONAILabelClientException) as e:
            client.infer("crossmodal", "upl001", {})
        assert status_of(e.value) == 422 and "case 'upl001': modality 'pet' is missing" in e.value.msg
        with pytest.raises(MONAILabelClientException) as e:
            client.upload_image(str(files["pet"]), "upl001", {"modality": "xray"})
        assert status_of(e.value) == 422 and ("case 'upl001': modality 'xray' is not one of the secondary modalities "
                                              "['pet', 'mr'] (the primary, 'ct', is the case's image itself)"
                                              ) in e.value.msg, e.value.msg
        (tmp_path / "bad.nii.gz").write_bytes(files["pet"].read_bytes()[:200])  # truncated: nothing stored
        with pytest.raises(MONAILabelClientException) as e:
            client.upload_image(str(tmp_path / "bad.nii.gz"), "upl001", {"modality": "pet"})
        assert status_of(e.value) == 422 and "case 'upl001': uploaded pet image: cannot be read" in e.value.msg
        pet = load_volume(files["pet"])
        save_volume(tmp_path / "dynamic.nii.gz", np.stack([pet[0].numpy()] * 3, -1), pet.affine.numpy())  # 3 frames
        with pytest.raises(MONAILabelClientException) as e:  # was "expected one channel, got 3"
            client.upload_image(str(tmp_path / "dynamic.nii.gz"), "upl001", {"modality": "pet"})
        assert status_of(e.value) == 422 and (
            f"case 'upl001': uploaded pet image: holds 3 volumes (a 4D file: frames of a dynamic or gated series, or "
            f"channels) on a {tuple(pet.shape[1:])} grid; a modality is one 3D volume: keep the frame to segment "
            "with, or their sum") in e.value.msg, e.value.msg
        save_volume(tmp_path / "blank.nii.gz", np.zeros(pet.shape[1:], np.float32), pet.affine.numpy())
        with pytest.raises(MONAILabelClientException) as e:  # was stored; then ITK's "Zero-valued spacing" (500)
            client.upload_image(str(tmp_path / "blank.nii.gz"), "upl001", {"modality": "pet"})
        assert status_of(e.value) == 422 and (
            "case 'upl001': uploaded pet image: holds one value (0) in every voxel: no image (a failed export or "
            "reconstruction?); re-export the series") in e.value.msg, e.value.msg
        ct = load_volume(files["ct"])
        save_volume(tmp_path / "slice.nii.gz", ct[0, :, :, 20:21].numpy(), ct.affine.numpy())  # a slice alone
        with pytest.raises(MONAILabelClientException) as e:  # was stored, then segmented from padding
            client.upload_image(str(tmp_path / "slice.nii.gz"), "upl002")
        assert status_of(e.value) == 422 and (
            "case 'upl002': uploaded image: is a single slice (grid (48, 48, 1)); the app segments 3D volumes: send "
            "the whole series") in e.value.msg, e.value.msg
        assert "upl002" not in client.datastore()["objects"]
        stack = np.stack([ct[0].numpy(), np.zeros(ct.shape[1:], np.float32), ct[0].numpy()], -1)
        save_volume(tmp_path / "stack.nii.gz", stack, ct.affine.numpy())  # a 4D primary whose PET channel is blank
        with pytest.raises(MONAILabelClientException) as e:  # said "holds one value", not which of the three
            client.upload_image(str(tmp_path / "stack.nii.gz"), "upl003")
        assert status_of(e.value) == 422 and (
            "case 'upl003': uploaded image: channel 1 of 3 ('pet') holds one value (0) in every voxel: no image (a "
            "failed export or reconstruction?); re-export the series") in e.value.msg, e.value.msg
        assert "upl003" not in client.datastore()["objects"]
        assert not sidecars.exists()
        for name in ("pet", "mr"):
            assert client.upload_image(str(files[name]), "upl001", {"modality": name})["image"] == "upl001"
        assert sorted(p.name for p in sidecars.iterdir()) == ["mr.nii.gz", "pet.nii.gz"]
        # the case's primary stays the CT (upstream would have written the PET over it under the same image id)
        assert (phantom_server.studies / "upl001.nii.gz").read_bytes() == files["ct"].read_bytes()
        assert sorted(set(client.datastore()["objects"]) - UNLABELED - {f"phantom00{i}" for i in range(3)}) == [
            "upl001"]
        out, params = client.infer("crossmodal", "upl001", {})
        assert params["modalities_used"] == ["ct", "pet", "mr"]
        gt = case.label.array
        scores = [dice(load_volume(out)[0].numpy(), gt, v) for v in (1, 2, 3)]
        assert min(scores) > 0.6 and np.mean(scores) > 0.8, scores  # segmented from all three modalities
        r = requests.post(f"{phantom_server.url}/scoring/crossmodal?run_sync=true", timeout=300)
        assert r.status_code == 200 and "upl001" in r.json()["scores"], r.text
        # its images, downsampled for scoring, in this datastore's own folder of the model dir's scoring cache
        from crossmodal.serving.app import scoring_cache_dir

        cache = Path(scoring_cache_dir(str(phantom_server.model_dir / "scoring_cache"), str(phantom_server.studies)))
        assert cache.parent.name == "scoring_cache" and cache.name.startswith(f"{phantom_server.studies.name}-")
        cached = cache / "upl001.pt"
        assert cached.is_file() and sorted(p.name for p in cache.parent.iterdir()) == [cache.name]
        r = requests.delete(f"{phantom_server.url}/datastore/image", params={"id": "upl001"}, timeout=30)
        assert r.status_code == 200, r.text
        assert "upl001" not in client.datastore()["objects"] and not sidecars.exists()
        assert not cached.exists()  # stayed for good
    finally:  # the shared studies as the other tests know them
        requests.delete(f"{phantom_server.url}/datastore/image", params={"id": "upl001"}, timeout=30)


def test_a_case_of_metaimage_files_uploads_segments_and_takes_a_label(client, phantom_server, tmp_path):
    """A case in ITK's MetaImage files (``.mha``, as grand-challenge.org ships PI-CAI's T2 / ADC / DWI): its primary
    and modalities upload (a 422 before: "extension '.mha' is not one of ..."), it segments from all of them, the
    label comes back as ``.mha`` on the case's grid, and a label saved as ``.mha`` is stored so."""
    case = make_phantom(CFG, np.random.default_rng(4321), size=48)
    files = write_case(tmp_path / "new", "mha001", case, CFG, ext=".mha")
    sidecars = phantom_server.studies / "modalities" / "mha001"
    try:
        assert client.upload_image(str(files["ct"]), "mha001")["image"] == "mha001"
        for name in ("pet", "mr"):
            assert client.upload_image(str(files[name]), "mha001", {"modality": name})["image"] == "mha001"
        assert sorted(p.name for p in sidecars.iterdir()) == ["mr.mha", "pet.mha"]
        assert (phantom_server.studies / "mha001.mha").read_bytes() == files["ct"].read_bytes()
        out, params = client.infer("crossmodal", "mha001", {"result_extension": ".mha"})
        assert out.endswith(".mha") and params["modalities_used"] == ["ct", "pet", "mr"]
        pred, image = load_volume(out), load_volume(files["ct"])
        assert pred.shape == image.shape and torch.allclose(pred.affine, image.affine, atol=1e-4)
        scores = [dice(pred[0].numpy(), case.label.array, v) for v in (1, 2, 3)]
        assert min(scores) > 0.6 and np.mean(scores) > 0.8, scores
        save_volume(tmp_path / "label.mha", case.label.array.astype(np.uint8), case.label.affine)
        client.save_label("mha001", str(tmp_path / "label.mha"))
        stored = phantom_server.studies / "labels" / "final" / "mha001.mha"
        assert np.array_equal(load_volume(stored)[0].numpy(), case.label.array)
        assert label_info(client, "mha001")["label_kind"] == "dense"
    finally:  # the shared studies as the other tests know them
        requests.delete(f"{phantom_server.url}/datastore/image", params={"id": "mha001"}, timeout=30)
    assert "mha001" not in client.datastore()["objects"] and not sidecars.exists()


def test_a_session_of_a_cases_files_is_segmented_from_all_of_them(client, phantom_server, tmp_path):
    """A case that is not in the datastore, sent as a MONAI Label session of its files named by modality (the
    session's folder was read as one image: "file does not exist"); one file alone says how to send the rest."""
    studies = phantom_server.studies
    files = {"ct": studies / "phantom004.nii.gz", "pet": studies / "modalities/phantom004/pet.nii.gz",
             "mr": studies / "modalities/phantom004/mr.nii.gz"}
    opened = [open(p, "rb") for p in files.values()]
    try:
        r = requests.put(f"{phantom_server.url}/session/", timeout=60,
                         files=[("files", (f"{m}.nii.gz", f)) for m, f in zip(files, opened, strict=True)])
    finally:
        for f in opened:
            f.close()
    assert r.status_code == 200, r.text
    out, result = client.infer("crossmodal", "", {}, session_id=r.json()["session_id"])
    assert result["modalities_used"] == ["ct", "pet", "mr"]
    pred, truth = load_volume(out)[0].numpy(), load_volume(studies / "truth" / "phantom004.nii.gz")[0].numpy()
    assert pred.shape == truth.shape and dice(pred, truth, 1) > 0.9, dice(pred, truth, 1)

    shutil.copy(files["ct"], tmp_path / "ct.nii.gz")
    alone = client.create_session(str(tmp_path / "ct.nii.gz"))["session_id"]
    with pytest.raises(MONAILabelClientException) as e:
        client.infer("crossmodal", "", {}, session_id=alone)
    assert status_of(e.value) == 422, e.value.msg
    assert ("case 'ct': modality 'pet' is missing: ct.nii.gz came alone (no modalities/ folder beside it); send the "
            "case's files together") in e.value.msg
    r = requests.post(f"{phantom_server.url}/infer/crossmodal", params={"session_id": "nope"}, timeout=60)
    assert r.status_code == 404 and r.json()["detail"] == (
        "no image to segment: name a case (image=<id>), send a file, or give a session_id that exists (sessions "
        "expire; PUT /session/ makes one)")


def test_batch_infer_runs_without_a_gpu_and_goes_on_past_a_case_it_cannot_segment(phantom_server):
    """``POST /batch/infer/<model>``: without CUDA MONAI Label's batch task stopped at once (``ZeroDivisionError:
    integer modulo by zero``, no label); one case at a time, a case it could not segment stopped the rest."""
    url, studies = phantom_server.url, phantom_server.studies
    pet = studies / "modalities" / "phantom004" / "pet.nii.gz"
    kept = pet.read_bytes()
    pet.unlink()
    try:
        # no body: MONAI Label's default params (device cuda, multi_gpu, max_batch_size, ...), where every case
        # failed with "max_batch_size is not an option of model 'crossmodal'; did you mean sw_batch_size?"
        r = requests.post(f"{url}/batch/infer/crossmodal", params={"images": "all", "run_sync": "true"}, timeout=300)
    finally:
        pet.write_bytes(kept)
    assert r.status_code == 200, r.text
    result = r.json()
    segmented = [f"phantom00{i}" for i in (0, 1, 2, 3, 5)]
    assert sorted(result) == sorted([*segmented, "phantom004"])
    assert result["phantom004"] == {"error": "case 'phantom004': modality 'pet' is missing: expected <studies>/"
                                             "modalities/phantom004/pet.nii.gz (or .nii/.nrrd/.mha); add it (a running "
                                             "server takes it as PUT /datastore/image?image=phantom004 with params "
                                             "{\"modality\": \"pet\"}), or use the case without it (missing_modality "
                                             "zero_fill)"}
    try:
        for cid in segmented:
            assert result[cid]["tag"] == "original" and result[cid]["params"]["modalities_used"] == ["ct", "pet", "mr"]
            pred = load_volume(studies / "labels" / "original" / f"{cid}.nii.gz")[0].numpy()
            truth = load_volume(studies / "truth" / f"{cid}.nii.gz")[0].numpy()
            assert dice(pred, truth, 1) > 0.9, (cid, dice(pred, truth, 1))
        assert not (studies / "labels" / "original" / "phantom004.nii.gz").exists()
    finally:
        for cid in segmented:
            requests.delete(f"{url}/datastore/label", params={"id": cid, "tag": "original"}, timeout=60)


def test_the_dataset_download_holds_every_modality_of_the_labelled_cases(phantom_server):
    """``GET /datastore/dataset`` (MONAI Label's archive of the labelled cases): it held the CT and the label only."""
    import io
    import zipfile

    r = requests.get(f"{phantom_server.url}/datastore/dataset", params={"limit_cases": 1}, timeout=60)
    assert r.status_code == 200
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        assert sorted(z.namelist()) == ["image/phantom000.nii.gz", "label/phantom000.nii.gz", "metadata.json",
                                        "modalities/phantom000/mr.nii.gz", "modalities/phantom000/pet.nii.gz"]
        assert z.read("modalities/phantom000/pet.nii.gz") == \
            (phantom_server.studies / "modalities" / "phantom000" / "pet.nii.gz").read_bytes()
    assert len(list(phantom_server.tmp.glob("*.zip"))) == 1


def test_a_model_upload_replaces_the_model_in_service_only_with_weights_that_load(tmp_path):
    """`PUT /model/<name>` (a model trained elsewhere put in service): upstream copied any file over the model in
    place (200 for a truncated or foreign file, then a 500 on every infer, the model it replaced gone)."""
    from conftest import make_phantom_studies, start_server, stop_server

    cfg = load_config("phantom")
    studies = make_phantom_studies(tmp_path / "studies", cfg, cases=3, dense=1, sparse=0, seed=5)
    good = PRETRAINED_PHANTOM.parent / "phantom_crossmodal.pt"
    shipped = tmp_path / "shipped" / good.name  # a copy: upstream's DELETE /model moved the committed file away
    shipped.parent.mkdir()
    shutil.copy(good, shipped)
    server = start_server(studies, tmp_path / "model", tmp_path / "server.log",
                          {"preset": "phantom", "pretrained_crossmodal": str(shipped)})
    try:
        def put(model: str, path: Path) -> requests.Response:
            with open(path, "rb") as f:
                return requests.put(f"{server.url}/model/{model}", files={"file": (path.name, f)}, timeout=60)

        def infer() -> np.ndarray:
            r = requests.post(f"{server.url}/infer/crossmodal", params={"image": "phantom002", "output": "image"},
                              timeout=120)
            assert r.status_code == 200, r.text
            (tmp_path / "pred.nii.gz").write_bytes(r.content)
            return load_volume(tmp_path / "pred.nii.gz")[0].numpy()

        assert (infer() == 1).sum() > 1000  # the committed weights find the organ
        published = tmp_path / "model" / "phantom_crossmodal.pt"
        r = requests.delete(f"{server.url}/model/crossmodal", timeout=60)  # nothing trained: the shipped weights stay
        assert r.status_code == 404 and r.json()["detail"] == (
            "model 'crossmodal': no trained weights to delete (the shipped weights phantom_crossmodal.pt serve; they "
            "are never deleted)")
        assert shipped.read_bytes() == good.read_bytes() and list(shipped.parent.iterdir()) == [shipped]
        (tmp_path / "trunc.pt").write_bytes(good.read_bytes()[:100_000])
        r = put("crossmodal", tmp_path / "trunc.pt")
        assert r.status_code == 422 and r.json()["detail"].startswith(
            "model 'crossmodal': the uploaded file cannot be read as a PyTorch checkpoint (truncated or corrupt?)")
        assert r.json()["detail"].endswith("; the model in service stays")
        r = put("crossmodal", PRETRAINED_PHANTOM)  # baseline_unet's weights
        assert r.status_code == 422 and "the uploaded file does not fit crossmodal on ['ct', 'pet', 'mr'] (preset " \
            "'phantom'): weights 83 missing" in r.json()["detail"]
        r = put("grow_scribbles", good)
        assert r.status_code == 404 and r.json()["detail"] == (
            "model with weights 'grow_scribbles' is not served here; served: ['baseline_unet', 'crossmodal']")
        assert not published.exists() and (infer() == 1).sum() > 1000

        # weights that load, and say background everywhere: in service at once
        state = torch.load(good, map_location="cpu", weights_only=True)
        state["head.weight"].zero_()
        state["head.bias"].copy_(torch.tensor([10.0, 0.0, 0.0, 0.0]))
        torch.save(state, tmp_path / "background.pt")
        r = put("crossmodal", tmp_path / "background.pt")
        assert r.status_code == 200 and published.read_bytes() == (tmp_path / "background.pt").read_bytes()
        assert (infer() == 0).all()
        r = put("crossmodal", tmp_path / "trunc.pt")  # refused: the model just put in service stays
        assert r.status_code == 422 and published.read_bytes() == (tmp_path / "background.pt").read_bytes()
        assert (infer() == 0).all()
        # deleting it puts the shipped weights back in service; the deleted ones are kept aside, as upstream does
        r = requests.delete(f"{server.url}/model/crossmodal", timeout=60)
        assert r.status_code == 200 and r.json()["in_service"] == "phantom_crossmodal.pt", r.text
        backup = tmp_path / "model" / r.json()["deleted"]
        assert not published.exists() and backup.read_bytes() == (tmp_path / "background.pt").read_bytes()
        assert (infer() == 1).sum() > 1000 and shipped.read_bytes() == good.read_bytes()
        r = requests.delete(f"{server.url}/model/crossmodal", timeout=60)
        assert r.status_code == 404 and shipped.read_bytes() == good.read_bytes()
        r = requests.delete(f"{server.url}/model/grow_scribbles", timeout=60)
        assert r.status_code == 404 and "'grow_scribbles' is not served here" in r.json()["detail"]
        time.sleep(1)  # the accepted upload's copy goes once its response is out
        assert [p.name for p in server.tmp.glob("*.pt")] == []
    finally:
        stop_server(server)
