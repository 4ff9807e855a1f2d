"""Serving pieces without a server: datastore rules, tracking coercion, validation split, active learning."""

import dataclasses
import json
import tempfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from crossmodal.io import load_volume, save_volume
from crossmodal.serving.datastore import CrossModalDatastore
from crossmodal.serving.train import PartialOneHotd, coerce_tracking
from fastapi import HTTPException


def test_datastore_records_kinds_of_labels_found_on_disk(phantom_studies: Path, phantom_cfg):
    ds = CrossModalDatastore(str(phantom_studies), phantom_cfg.labels)
    assert ds.get_label_info("phantom000", "final")["label_kind"] == "dense"
    info = ds.get_label_info("phantom001", "final")
    assert info["label_kind"] == "sparse" and 0 < info["annotated_fraction"] < 0.2
    assert sorted(ds.get_unlabeled_images()) == ["phantom002", "phantom003"]


def test_datastore_rejects_before_writing(phantom_studies: Path, phantom_cfg, tmp_path: Path):
    ds = CrossModalDatastore(str(phantom_studies), phantom_cfg.labels)
    json_before = (phantom_studies / "datastore_v2.json").read_bytes()
    img = load_volume(phantom_studies / "phantom002.nii.gz")
    bad = np.zeros(img.shape[1:], np.uint8)
    bad[0, 0, 0] = 9
    save_volume(tmp_path / "bad.nii.gz", bad, img.affine.numpy())
    with pytest.raises(HTTPException) as e:
        ds.save_label("phantom002", str(tmp_path / "bad.nii.gz"), "final", {})
    assert e.value.status_code == 422 and "label values [9]" in e.value.detail and "phantom002" in e.value.detail
    assert not (phantom_studies / "labels" / "final" / "phantom002.nii.gz").exists()
    assert (phantom_studies / "datastore_v2.json").read_bytes() == json_before
    with pytest.raises(HTTPException) as e:
        ds.save_label("nope", str(tmp_path / "bad.nii.gz"), "final", {})
    assert e.value.status_code == 404
    scribbles = np.zeros(img.shape[1:], np.uint8)
    scribbles[10:12, 10:20, 20] = 1  # strokes without marked background: sparse only when the client says so
    save_volume(tmp_path / "strokes.nii.gz", scribbles, img.affine.numpy())
    with pytest.raises(HTTPException) as e:  # was: the typo stored as info, the strokes stored as a dense label
        ds.save_label("phantom002", str(tmp_path / "strokes.nii.gz"), "final", {"label_knd": "sparse"})
    assert e.value.status_code == 422 and e.value.detail == (
        "case 'phantom002': label_knd is not a label option; did you mean label_kind? (nothing stored)")
    assert (phantom_studies / "datastore_v2.json").read_bytes() == json_before
    ds.save_label("phantom002", str(tmp_path / "strokes.nii.gz"), "final", {"label_kind": "sparse", "annotator": "a"})
    assert ds.get_label_info("phantom002", "final")["label_kind"] == "sparse"
    assert ds.get_label_info("phantom002", "final")["annotator"] == "a"  # a key of the user's own is kept


def test_infos_hold_no_nan_that_would_make_the_listing_a_500(phantom_studies: Path, phantom_cfg):
    """A datastore file with a NaN in an info (as MONAI Label recorded a next-sample request's client_id NaN before
    2026-12-03) loads with null there, and an info updated with NaN / Inf is stored and written with null."""
    import json

    CrossModalDatastore(str(phantom_studies), phantom_cfg.labels)  # writes the file
    path = phantom_studies / "datastore_v2.json"
    stored = json.loads(path.read_text())
    stored["objects"]["phantom003"]["image"]["info"]["strategy"] = {"random": {"ts": 1, "client_id": float("nan")}}
    path.write_text(json.dumps(stored))
    ds = CrossModalDatastore(str(phantom_studies), phantom_cfg.labels)
    assert ds.get_image_info("phantom003")["strategy"] == {"random": {"ts": 1, "client_id": None}}
    json.dumps(ds.json(), allow_nan=False)  # what GET /datastore/ answers with: it raised ValueError
    ds.update_image_info("phantom001", {"score": float("inf"), "scores": [0.5, float("nan")]})
    info = ds.get_image_info("phantom001")
    assert info["score"] is None and info["scores"] == [0.5, None]
    written = path.read_text()
    assert "NaN" not in written and "Infinity" not in written
    assert json.loads(written)["objects"]["phantom003"]["image"]["info"]["strategy"]["random"]["client_id"] is None
    # another process's write with a NaN (a file of an older version): read back with null
    stored = json.loads(written)
    stored["objects"]["phantom002"]["image"]["info"]["x"] = float("-inf")
    path.write_text(json.dumps(stored))
    assert ds.get_image_info("phantom002")["x"] is None


def test_an_empty_final_label_is_refused_unless_the_case_has_none_of_the_classes(phantom_studies: Path, phantom_cfg,
                                                                                 tmp_path: Path):
    """A final label with nothing drawn (Slicer's "submit" before painting) was stored as a dense label, the case
    taken out of the pool and trained as background everywhere; now a 422 that says how to save a case that truly
    has none of the classes. A model's label (tag ``original``) may be empty."""
    ds = CrossModalDatastore(str(phantom_studies), phantom_cfg.labels)
    json_before = (phantom_studies / "datastore_v2.json").read_bytes()
    img = load_volume(phantom_studies / "phantom002.nii.gz")
    save_volume(tmp_path / "empty.nii.gz", np.zeros(img.shape[1:], np.uint8), img.affine.numpy())
    with pytest.raises(HTTPException) as e:
        ds.save_label("phantom002", str(tmp_path / "empty.nii.gz"), "final", {})
    assert e.value.status_code == 422 and e.value.detail == (
        "case 'phantom002': uploaded 'final' label: the label is empty (no voxel of ['organ', 'lesion', 'vessel'] or "
        "'marked_background'): saved before drawing? Training would learn background everywhere on this case. Draw "
        'it, or, if the case has none of these, save it with params {"allow_empty": true}')
    with pytest.raises(HTTPException) as e:
        ds.save_label("phantom002", str(tmp_path / "empty.nii.gz"), "final", {"allow_empty": "maybe"})
    assert e.value.status_code == 422 and e.value.detail == (
        "case 'phantom002': allow_empty='maybe' must be true or false")
    assert (phantom_studies / "datastore_v2.json").read_bytes() == json_before
    assert not (phantom_studies / "labels" / "final" / "phantom002.nii.gz").exists()
    ds.save_label("phantom002", str(tmp_path / "empty.nii.gz"), "original", {})
    ds.save_label("phantom002", str(tmp_path / "empty.nii.gz"), "final", {"allow_empty": "true"})
    assert ds.get_label_info("phantom002", "final")["label_kind"] == "dense" and "allow_empty" not in \
        ds.get_label_info("phantom002", "final")
    lesions = dataclasses.replace(phantom_cfg.labels, empty_final=True)  # a preset where a case may have none
    ds = CrossModalDatastore(str(phantom_studies), lesions)
    ds.save_label("phantom001", str(tmp_path / "empty.nii.gz"), "final", {})
    assert ds.label_kind("phantom001") == "dense"


def test_datastore_removes_what_is_there_and_404s_what_is_not(phantom_studies: Path, phantom_cfg):
    ds = CrossModalDatastore(str(phantom_studies), phantom_cfg.labels, phantom_cfg.modality_names)
    for call, detail in ((lambda: ds.remove_label("phantom000", "finale"),
                          "case 'phantom000': no 'finale' label (its labels: ['final'])"),
                         (lambda: ds.remove_label("nope", "final"), "case 'nope': no such image in the datastore"),
                         (lambda: ds.remove_image("nope"), "case 'nope': no such image in the datastore")):
        with pytest.raises(HTTPException) as e:
            call()
        assert (e.value.status_code, e.value.detail) == (404, detail)
    ds.remove_label("phantom001", "final")
    assert not (phantom_studies / "labels" / "final" / "phantom001.nii.gz").exists()
    other = CrossModalDatastore(str(phantom_studies), phantom_cfg.labels)
    assert other.get_label_info("phantom000", "final")["label_kind"] == "dense"  # the other labels keep their kind
    assert sorted(other.get_unlabeled_images()) == ["phantom001", "phantom002", "phantom003"]
    ds.remove_image("phantom002")
    assert not (phantom_studies / "phantom002.nii.gz").exists() and not (phantom_studies / "modalities" /
                                                                          "phantom002").exists()


def test_dataset_archive_holds_every_modality_of_the_labelled_cases_and_replaces_itself(
        phantom_studies: Path, phantom_cfg, tmp_path: Path, monkeypatch):
    """``GET /datastore/dataset``: upstream's archive held the primary image and the label only (a CT-only copy of a
    CT + PET + MR data set), and each request left its ZIP in the temp folder."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temp"))
    (tmp_path / "temp").mkdir()
    ds = CrossModalDatastore(str(phantom_studies), phantom_cfg.labels, phantom_cfg.modality_names)
    labelled = sorted(p.name.removesuffix(".nii.gz") for p in (phantom_studies / "labels" / "final").glob("*.nii.gz"))
    assert len(labelled) >= 2
    expected = {"metadata.json"}
    for cid in labelled:
        expected |= {f"image/{cid}.nii.gz", f"label/{cid}.nii.gz", f"modalities/{cid}/pet.nii.gz",
                     f"modalities/{cid}/mr.nii.gz"}
    with zipfile.ZipFile(ds.get_dataset_archive(None)) as z:
        assert set(z.namelist()) == expected
        assert z.read(f"modalities/{labelled[0]}/pet.nii.gz") == \
            (phantom_studies / "modalities" / labelled[0] / "pet.nii.gz").read_bytes()
        assert z.read(f"label/{labelled[0]}.nii.gz") == (phantom_studies / "labels/final" / f"{labelled[0]}.nii.gz"
                                                          ).read_bytes()
        kinds = {k: v["labels"]["final"]["info"]["label_kind"]
                 for k, v in json.loads(z.read("metadata.json"))["objects"].items() if v["labels"]}
        assert set(kinds) == set(labelled) and set(kinds.values()) <= {"dense", "sparse"}
    with zipfile.ZipFile(ds.get_dataset_archive(1)) as z:
        first = labelled[0]
        assert sorted(z.namelist()) == ["image/" + first + ".nii.gz", "label/" + first + ".nii.gz", "metadata.json",
                                        f"modalities/{first}/mr.nii.gz", f"modalities/{first}/pet.nii.gz"]
    assert [p.name for p in (tmp_path / "temp").iterdir()] == [Path(ds.get_dataset_archive(None)).name]
    for cid in labelled:
        ds.remove_label(cid, "final")
    with pytest.raises(HTTPException) as e:
        ds.get_dataset_archive(None)
    assert (e.value.status_code, e.value.detail) == (404, "no case has a final label: the dataset archive holds the "
                                                          "labelled cases; save a label first")


def test_label_info_keys_training_reads_are_checked(phantom_studies: Path, phantom_cfg):
    """``PUT /datastore/label/info`` wrote any ``label_kind`` (another than dense / sparse stopped the next training
    in its data loader) and any ``annotated_fraction``."""
    ds = CrossModalDatastore(str(phantom_studies), phantom_cfg.labels, phantom_cfg.modality_names)
    for info, detail in (({"label_kind": "weird"}, "case 'phantom000': 'final' label info: label_kind 'weird' must be "
                                                  "one of ['dense', 'sparse']"),
                         ({"annotated_fraction": 0.5}, "case 'phantom000': 'final' label info: annotated_fraction is "
                                                       "measured from the label, not set; set label_kind (dense or "
                                                       "sparse) instead")):
        with pytest.raises(HTTPException) as e:
            ds.update_label_info("phantom000", "final", info)
        assert (e.value.status_code, e.value.detail) == (422, detail)
    assert ds.get_label_info("phantom000", "final")["label_kind"] == "dense"
    ds.update_label_info("phantom000", "final", {"label_kind": "sparse", "note": "only the organ is drawn"})
    arr = load_volume(phantom_studies / "labels" / "final" / "phantom000.nii.gz")[0].numpy()
    info = CrossModalDatastore(str(phantom_studies), phantom_cfg.labels).get_label_info("phantom000", "final")
    assert info["label_kind"] == "sparse" and info["note"] == "only the organ is drawn"
    assert info["annotated_fraction"] == pytest.approx(float((arr != 0).mean()), abs=1e-6) and info[
        "annotated_fraction"] < 1


def test_two_uploads_of_one_new_id_store_one_case(phantom_studies: Path, phantom_cfg):
    """Two writers of one studies folder at once (two servers on it, a server and ``crossmodal`` on it; inside one
    server MONAI Label's async upload endpoint runs uploads one at a time): both passed the 409 check before either
    was stored, and the second replaced the first's image while both were told it was stored. The check, the copy
    and the entry are one step under the datastore's lock now: one is stored, whole, and the other is a 409. (Ten
    ids raced in turn on threads, each lock an OS file lock as between processes: before, some pairs ran one after
    the other and passed, most did not.)"""
    ds = CrossModalDatastore(str(phantom_studies), phantom_cfg.labels)
    uploads = [str(phantom_studies / f"phantom00{i}.nii.gz") for i in (2, 3)]  # two different images
    ids = [f"new{i:03d}" for i in range(10)]

    def upload(image_id: str, path: str, barrier: threading.Barrier, results: dict) -> None:
        barrier.wait()
        try:
            results[path] = ds.add_image(image_id, path, {})
        except HTTPException as e:
            results[path] = e

    for image_id in ids:
        barrier, results = threading.Barrier(2), {}
        threads = [threading.Thread(target=upload, args=(image_id, u, barrier, results)) for u in uploads]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stored = [u for u in uploads if results[u] == image_id]
        refused = [results[u] for u in uploads if isinstance(results[u], HTTPException)]
        assert len(stored) == 1 and len(refused) == 1, (image_id, results)
        assert refused[0].status_code == 409 and refused[0].detail == (
            f"case {image_id!r} already exists; remove it first (DELETE /datastore/image?id={image_id}) or upload "
            "under another id")
        assert (phantom_studies / f"{image_id}.nii.gz").read_bytes() == Path(stored[0]).read_bytes()
    other = CrossModalDatastore(str(phantom_studies), phantom_cfg.labels)  # what the file says, read afresh
    assert [other.get_image_info(i)["name"] for i in ids] == [f"{i}.nii.gz" for i in ids]
    assert sorted(other.get_unlabeled_images()) == sorted(ids + ["phantom002", "phantom003"])
    assert not list(phantom_studies.glob(".*.tmp"))


def test_uploads_and_removals_keep_what_another_process_wrote_meanwhile(phantom_studies: Path, phantom_cfg):
    """The server's datastore and a scoring or training child (its own datastore on the same folder) write the one
    JSON file. An upload read the file, then the upload, then wrote the file from what it had read, and a removal
    rewrote it from what it had read before: image infos the child stored meanwhile (scores, hand-outs) were lost.
    Now each changes the file as it is under the lock."""
    server = CrossModalDatastore(str(phantom_studies), phantom_cfg.labels, phantom_cfg.modality_names)
    child = CrossModalDatastore(str(phantom_studies), phantom_cfg.labels)
    upload = str(phantom_studies / "phantom002.nii.gz")
    done, written = threading.Event(), []

    def child_writes() -> None:
        n = 0
        while not done.is_set() or n < 5:
            child.update_image_info("phantom003", {f"score{n}": n})
            written.append(f"score{n}")
            n += 1

    thread = threading.Thread(target=child_writes)
    thread.start()
    try:
        for i in range(60):
            assert server.add_image(f"up{i:03d}", upload, {}) == f"up{i:03d}"
        assert all(f"up{i:03d}" in server.get_unlabeled_images() for i in range(60))
        for i in range(60):
            server.remove_image(f"up{i:03d}")
        server.remove_label("phantom001", "final")
    finally:
        done.set()
        thread.join()
    info = CrossModalDatastore(str(phantom_studies), phantom_cfg.labels).get_image_info("phantom003")
    lost = [k for k in written if k not in info]
    assert not lost, f"{len(lost)} of {len(written)} infos the other process wrote were lost: {lost[:5]}"
    assert sorted(server.get_unlabeled_images()) == ["phantom001", "phantom002", "phantom003"]
    assert not list(phantom_studies.glob("up*")) and not (phantom_studies / "labels" / "final" /
                                                          "phantom001.nii.gz").exists()


def test_tracking_goes_to_sqlite_or_off(tmp_path: Path):
    r = coerce_tracking({"tracking": "mlflow", "tracking_uri": ""}, str(tmp_path))
    assert r["tracking"] == "mlflow" and r["tracking_uri"] == f"sqlite:///{tmp_path}/mlflow.db"
    r = coerce_tracking({"tracking": ["mlflow", "None"], "tracking_uri": "file:///x/mlruns"}, str(tmp_path))
    assert r["tracking_uri"].startswith("sqlite:///")
    assert coerce_tracking({"tracking": "sqlite", "tracking_uri": "sqlite:////db"}, "m")["tracking"] is None
    assert coerce_tracking({"tracking": "mlflow", "tracking_uri": "sqlite:////db"}, "m")["tracking_uri"] == "sqlite:////db"


def test_partial_one_hot_masks_unannotated_voxels():
    pred = torch.tensor([[[[5.0, 5.0, -5.0]]], [[[-5.0, -5.0, 5.0]]]])  # argmax: 0, 0, 1
    label = torch.tensor([[[[0.0, -1.0, 1.0]]]])
    out = PartialOneHotd(2)({"pred": pred, "label": label})
    assert out["pred"][:, 0, 0].tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    assert out["label"][:, 0, 0].tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]




def test_foreign_or_broken_weights_stop_the_app_at_start_naming_the_file(tmp_path: Path):
    """The brain's weights under the phantom preset, a truncated file, a published model of another preset: each a
    ModelFileError from AppParts.from_conf (server start, `crossmodal train/evaluate`), not a 500 per request."""
    from conftest import APP, PRETRAINED_PHANTOM
    from crossmodal.nets import ModelFileError
    from crossmodal.serving.app import AppParts

    brain = APP / "pretrained" / "brain_crossmodal.pt"
    conf = {"preset": "phantom", "model_dir": str(tmp_path / "m"), "models": "crossmodal"}
    with pytest.raises(ModelFileError) as e:
        AppParts.from_conf(str(APP), {**conf, "pretrained_crossmodal": str(brain)})
    msg = str(e.value)
    assert msg.startswith(f"model {brain}: does not fit crossmodal on ['ct', 'pet', 'mr'] (preset 'phantom'): ")
    assert "54 missing (e.g. 'encoders.ct.levels.0.0.weight')" in msg and "57 unexpected" in msg
    cut = tmp_path / "cut.pt"
    cut.write_bytes(brain.read_bytes()[:100_000])
    with pytest.raises(ModelFileError, match=r"model .*cut\.pt: cannot be read as a PyTorch checkpoint"):
        AppParts.from_conf(str(APP), {**conf, "pretrained_crossmodal": str(cut)})
    (tmp_path / "m" / "phantom_baseline_unet.pt").write_bytes(PRETRAINED_PHANTOM.read_bytes())  # fits: fine
    parts = AppParts.from_conf(str(APP), {**conf, "models": "baseline_unet"})
    assert parts.published.endswith("phantom_baseline_unet.pt")
    # a diverged training's weights (published before 2026-12-03): they load and fit, and segment nothing
    import torch
    from fastapi import HTTPException

    state = torch.load(PRETRAINED_PHANTOM, map_location="cpu")
    state = state.get("model", state)
    first = next(iter(state))
    state[first] = torch.full_like(state[first], float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(HTTPException) as h:  # PUT /model/baseline_unet
        parts.replace_weights("baseline_unet", str(tmp_path / "nan.pt"))
    assert h.value.status_code == 422 and h.value.detail == (
        f"model 'baseline_unet': the uploaded file 1 of its {len(state)} weight tensors hold NaN / Inf (e.g. "
        f"{first!r}): a training that diverged? Train again with a lower learning rate; the model in service stays")
    assert (tmp_path / "m" / "phantom_baseline_unet.pt").read_bytes() == PRETRAINED_PHANTOM.read_bytes()
    (tmp_path / "m" / "phantom_baseline_unet.pt").write_bytes((tmp_path / "nan.pt").read_bytes())
    with pytest.raises(ModelFileError, match=r"phantom_baseline_unet\.pt: 1 of its \d+ weight tensors hold NaN / Inf"):
        AppParts.from_conf(str(APP), {**conf, "models": "baseline_unet"})
    (tmp_path / "m" / "phantom_crossmodal.pt").write_bytes(brain.read_bytes())  # published under another preset
    with pytest.raises(ModelFileError, match=r"phantom_crossmodal\.pt: does not fit crossmodal"):
        AppParts.from_conf(str(APP), conf)


def test_server_conf_numbers_are_checked_by_name(tmp_path: Path):
    from conftest import APP
    from crossmodal.config import ConfigError
    from crossmodal.serving.app import AppParts

    conf = {"preset": "phantom", "model_dir": str(tmp_path / "m")}
    with pytest.raises(ConfigError, match=r"^--conf max_epochs 'abc': must be a positive int$"):
        AppParts.from_conf(str(APP), {**conf, "max_epochs": "abc"})
    parts = AppParts.from_conf(str(APP), {**conf, "max_epochs": "3"})
    assert parts.cfg.train.max_epochs == 3 and parts.cfg.infer.mirror_axes == ()
    mirrored = AppParts.from_conf(str(APP), {**conf, "mirror_axes": "2,0"})
    assert mirrored.cfg.infer.mirror_axes == (0, 2)
    assert mirrored.infer().inferer({}).mirror_axes == (0, 2)  # every infer request mirrored...
    assert mirrored.infer().inferer({"mirror_axes": "none"}).mirror_axes == ()  # ...unless it says otherwise
    assert mirrored.infer(epistemic=True).inferer({}).mirror_axes == ()  # MONAI Label's Epistemic: one pass each
    overlapped = AppParts.from_conf(str(APP), {**conf, "overlap": "0.5"})
    assert overlapped.infer().inferer({}).window.overlap == 0.5  # every infer request's...
    assert overlapped.infer().inferer({"overlap": 0.75}).window.overlap == 0.75  # ...unless it says otherwise
    with pytest.raises(ConfigError, match=r"^--conf overlap: '1.5' must be a number from 0 up to, not including, 1"):
        AppParts.from_conf(str(APP), {**conf, "overlap": "1.5"})
    with pytest.raises(ConfigError, match=r"^--conf mirror_axes: '0,1,1' must name spatial axes 0, 1 or 2, each once$"):
        AppParts.from_conf(str(APP), {**conf, "mirror_axes": "0,1,1"})
    cleaned = AppParts.from_conf(str(APP), {**conf, "largest_component": "organ, foreground"})
    assert cleaned.cfg.infer.largest_component == ("organ", "foreground")
    assert len(cleaned.infer().post_transforms()[0].largest) == 2  # the organ's clean-up, then the foreground's
    assert AppParts.from_conf(str(APP), {**conf, "largest_component": "none"}).cfg.infer.largest_component == ()
    with pytest.raises(ConfigError, match=r"infer.largest_component: \['liver'\] must be among \['foreground', "
                                          r"'organ', 'lesion', 'vessel'\]"):
        AppParts.from_conf(str(APP), {**conf, "largest_component": "liver"})
    with pytest.raises(ConfigError, match=r"^--conf pacs_timeout 'x': must be a positive float$"):
        parts.datastore("http://127.0.0.1:9/dicom-web", {"pacs_timeout": "x"})
    with pytest.raises(ConfigError, match=r"^--conf pacs_list_ttl '-1': must be a non-negative float$"):
        parts.datastore("http://127.0.0.1:9/dicom-web", {"pacs_list_ttl": "-1"})


def test_a_mistyped_server_conf_key_stops_the_app_naming_the_closest_key(tmp_path: Path):
    from conftest import APP
    from crossmodal.config import ConfigError
    from crossmodal.serving.app import AppParts

    conf = {"preset": "phantom", "model_dir": str(tmp_path / "m")}
    with pytest.raises(ConfigError, match=r"^--conf pretrained_crossmodel: no model 'crossmodel' is served here; did "
                                          r"you mean 'pretrained_crossmodal'\? Served: crossmodal, baseline_unet "
                                          r"\(--conf models picks them\)$"):
        AppParts.from_conf(str(APP), {**conf, "pretrained_crossmodel": "w.pt"})
    with pytest.raises(ConfigError, match=r"^--conf presett: not a key of this app; did you mean 'preset'\?"):
        AppParts.from_conf(str(APP), {**conf, "presett": "brain"})
    with pytest.raises(ConfigError, match=r"^--conf colour: not a key of this app\. Its keys: benchmark_pipelines, "):
        AppParts.from_conf(str(APP), {**conf, "colour": "red"})
    with pytest.raises(ConfigError, match=r"^--conf pretrained_baseline_unet: no model 'baseline_unet' is served "
                                          r"here\. Served: crossmodal \(--conf models picks them\)$"):
        AppParts.from_conf(str(APP), {**conf, "models": "crossmodal", "pretrained_baseline_unet": "w.pt"})
    served = AppParts.from_conf(str(APP), {**conf, "preload": "false", "server_mode": "false"})  # MONAI Label's own
    assert [m.name for m in served.models] == ["crossmodal", "baseline_unet"]


def test_a_request_device_is_read_as_monai_label_reads_it_on_a_gpu_machine(monkeypatch):
    """On a GPU machine (its answers stood in for here: CI has none) /info lists the GPU by its name, which a
    viewer's device option sends back: that name is the GPU; ``cpu`` stays the CPU, also for data-parallel
    training (on 2026-12-04 a `processes=2` request for the CPU was refused there for want of a second GPU)."""
    from crossmodal.config import ConfigError
    from crossmodal.serving.datastore import request_device
    from crossmodal.serving.train import on_cuda

    if not torch.cuda.is_available():  # as MONAI Label's name_to_device
        assert request_device("cuda") == "cpu" and not on_cuda({})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H200")
    assert [request_device(v) for v in ("NVIDIA H200", ["NVIDIA H200"], "cuda:0", "cpu", None)] == \
        ["cuda", "cuda", "cuda:0", "cpu", None]
    assert on_cuda({}) and on_cuda({"device": "NVIDIA H200"}) and not on_cuda({"device": "cpu"})
    with pytest.raises(ConfigError, match=r"device 'tpu' must be cpu, cuda, cuda:<index> or one of \['NVIDIA H200'\]"):
        request_device("tpu")


def test_a_datastore_file_cut_short_stops_the_server_naming_it_and_is_left_as_it_was(phantom_studies: Path,
                                                                                      phantom_cfg):
    """A datastore file that does not read (cut short, edited by hand) was a pydantic traceback at start; now an
    error naming the file and what to do, the file untouched; moved aside, the cases and label kinds come back from
    the files."""
    from crossmodal.config import ConfigError

    ds = CrossModalDatastore(str(phantom_studies), phantom_cfg.labels)  # writes the file
    ds.update_label_info("phantom001", "final", {"annotator": "dr a"})
    path = phantom_studies / "datastore_v2.json"
    cut = path.read_bytes()[:300]
    path.write_bytes(cut)
    with pytest.raises(ConfigError) as e:
        CrossModalDatastore(str(phantom_studies), phantom_cfg.labels)
    assert str(e.value).startswith(f"{path}: the datastore file does not read (Invalid JSON: EOF while parsing")
    assert f"move it aside (mv {path} {path}.broken) and start again" in str(e.value)
    assert path.read_bytes() == cut  # nothing written over it
    path.rename(path.with_name("datastore_v2.json.broken"))
    ds = CrossModalDatastore(str(phantom_studies), phantom_cfg.labels)
    assert ds.get_label_info("phantom000", "final")["label_kind"] == "dense"
    assert ds.get_label_info("phantom001", "final")["label_kind"] == "sparse"
    assert "annotator" not in ds.get_label_info("phantom001", "final")  # what only the file held
    assert sorted(ds.get_unlabeled_images()) == ["phantom002", "phantom003"]


CHILD = """
import subprocess, sys, time
from crossmodal.serving.app import TASK_PROCESS, stop_when_orphaned
assert stop_when_orphaned(0.1, main_module="monailabel.main") is None  # the server itself: never
assert stop_when_orphaned(0.1, main_module=TASK_PROCESS) is not None
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # a data-parallel rank, say
open(sys.argv[1], "w").write(f"{worker.pid}")
time.sleep(600)
"""
PARENT = """
import subprocess, sys, time
from pathlib import Path
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
print(child.pid, flush=True)
time.sleep(600)
"""


def test_a_task_process_and_its_workers_end_with_the_server_that_started_them(tmp_path):
    """A server stopped by SIGTERM (docker stop, systemd) left its training process running, and its data-parallel
    ranks, with no server to stop them, publishing into the model folder beside the next server's training. Here a
    stand-in server starts a task process that starts a worker; the server is killed: both end within seconds."""
    import subprocess
    import sys
    import time

    import psutil

    def gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    pid_file = tmp_path / "worker.pid"
    server = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(pid_file)], stdout=subprocess.PIPE, text=True)
    try:
        task = int(server.stdout.readline())
        deadline = time.monotonic() + 60
        while not pid_file.is_file() or not pid_file.read_text():
            assert time.monotonic() < deadline and server.poll() is None
            time.sleep(0.1)
        worker = int(pid_file.read_text())
        time.sleep(0.5)
        assert not gone(task) and not gone(worker)  # alive while the server is
        server.kill()
        server.wait()
        deadline = time.monotonic() + 20
        while not (gone(task) and gone(worker)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gone(task) and gone(worker)
    finally:
        server.kill()
        for pid in (locals().get("task"), locals().get("worker")):
            if pid and not gone(pid):
                psutil.Process(pid).kill()
