from pathlib import Path

import pytest
from conftest import APP
from crossmodal.config import ConfigError, CrossModalConfig, load_config, save_config
from crossmodal.nets import ModelFileError
from crossmodal.serving.app import AppParts


def test_presets_resolve_with_inheritance():
    brain = load_config("brain")
    assert brain.modality_names == ["t1", "t2", "pd"]
    assert brain.labels.classes == {"background": 0, "grey_matter": 1, "white_matter": 2, "csf": 3}
    assert brain.model.name == "crossmodal" and brain.model.channels == (16, 32, 64, 128)  # from base.yaml
    assert brain.train.lr_for("crossmodal") == 0.01 and brain.train.lr_for("baseline_unet") == 0.001
    phantom = load_config("phantom")
    assert phantom.primary.kind == "ct" and phantom.primary.window == (-150.0, 250.0)
    assert phantom.train.patch_size == (48, 48, 48) and phantom.train.max_epochs == 50  # override + inherited


def test_overrides_and_roundtrip(tmp_path: Path):
    cfg = load_config("phantom", overrides={"train": {"max_epochs": 3}})
    assert cfg.train.max_epochs == 3
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(str(tmp_path / "resolved.yaml"))
    assert again.to_dict() == cfg.to_dict()


def test_viewer_labels_include_marked_background():
    cfg = load_config("brain")
    assert cfg.labels.viewer_labels == {"grey_matter": 1, "white_matter": 2, "csf": 3, "marked_background": 255}


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"modalities": [{"name": "ct", "kind": "xray"}]}, "modalities.ct.kind: 'xray' is not one of"),
        ({"labels": {"classes": {"background": 0, "a": 2}}}, "must be 0..N-1"),
        ({"labels": {"classes": {"background": 0, "a": 1}, "marked_background": 1}}, "must be a free label value"),
        ({"labels": {"marked_background_name": "background_scribbles"}}, "dropped by 3D Slicer"),
        ({"modalities": [{"name": "a"}, {"name": "a"}]}, "must be unique"),
        ({"model": {"strides": [2, 2]}}, "needs len(channels) - 1 = 3"),
        ({"trainer": {}}, "unknown config keys ['trainer']"),
        ({"infer": {"roi": 3}}, "infer: unknown keys ['roi']; valid keys are"),  # nothing near enough to suggest
        ({"train": {"max_epoch": 3}}, "train: unknown keys ['max_epoch'] (did you mean 'max_epochs' for 'max_epoch'?); "
                                      "valid keys are"),
        ({"models": {}}, "unknown config keys ['models'] (did you mean 'model' for 'models'?); valid keys are"),
        ({"model": {"joint_stem": "maybe"}}, "model.joint_stem: 'maybe' must be true or false"),  # was taken as on
        ({"labels": {"empty_final": "false"}}, "labels.empty_final: 'false' must be true or false"),
        ({"train": {"consistency": {"copy_paste": 1}}}, "train.consistency.copy_paste: 1 must be true or false"),
        ({"train": {"max_epochs": "x"}}, "train.max_epochs: 'x' must be a whole number"),  # was "'<' not supported"
        ({"train": {"learning_rate": "fast"}}, "train.learning_rate: 'fast' must be a finite number"),
        ({"data": {"register": 3}}, "data.register: 3 must be text"),
        ({"train": {"consistency": {"teacher_decay": 1.0}}}, "teacher_decay: 1.0 must be in [0, 1)"),
        ({"train": {"consistency": {"copy_paste_start": -1}}}, "copy_paste_start: -1 must be >= 0"),
        ({"train": {"consistency": {"max_unlabeled_per_epoch": 0}}},
         "train.consistency.max_unlabeled_per_epoch: 0 must be >= 1"),
        ({"train": {"consistency": {"pseudo_batch_size": 0}}}, "train.consistency.pseudo_batch_size: 0 must be >= 1"),
        ({"train": {"finetune_lr_scale": 0}}, "train.finetune_lr_scale: 0 must be in (0, 1]"),
        ({"train": {"finetune_lr_scale": 2}}, "train.finetune_lr_scale: 2 must be in (0, 1]"),
        ({"train": {"patch_size": [32, 32, 30]}},  # was a tensor-size RuntimeError in the decoder
         "train.patch_size: [32, 32, 30] must be three multiples of 8 (the product of model.strides [2, 2, 2]), each "
         "at least 16"),
        ({"infer": {"roi_size": [8, 8, 8]}}, "infer.roi_size: [8, 8, 8] must be three multiples of 8"),
        # MONAI refused these only once a case larger than a window was segmented
        ({"infer": {"overlap": 1.0}}, "infer.overlap: 1.0 must be a number from 0 up to, not including, 1"),
        ({"infer": {"sw_batch_size": 0}}, "infer.sw_batch_size: 0 must be an integer from 1 to 64"),
        ({"model": {"channels": [8, 16, 32], "strides": [2, 3]}, "train": {"patch_size": [18, 18, 10]}},
         "train.patch_size: [18, 18, 10] must be three multiples of 6 (the product of model.strides [2, 3]), each "
         "at least 12"),
    ],
)
def test_bad_values_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=None) as e:
        CrossModalConfig.from_dict(raw)
    assert message in str(e.value)


def test_a_users_own_yaml_extends_a_shipped_preset(tmp_path):
    """A config outside ``configs/`` saying ``extends: phantom`` was refused ("unknown config preset 'phantom'; valid
    presets in <its folder>"); ``1e-3`` (a string to PyYAML, which wants ``1.0e-3``) is taken as the number."""
    (tmp_path / "mine.yaml").write_text("extends: phantom\ntrain:\n  learning_rate: 1e-3\n")
    cfg = load_config(str(tmp_path / "mine.yaml"))
    assert cfg.train.learning_rate == 0.001 and cfg.labels.classes == load_config("phantom").labels.classes
    # label classes are replaced whole (merged, the phantom's vessel class stayed); the shipped weights then do not
    # fit, and the error says why they were picked and what to do
    (tmp_path / "two.yaml").write_text("extends: phantom\nlabels:\n  classes: {background: 0, organ: 1, lesion: 2}\n")
    assert load_config(str(tmp_path / "two.yaml")).labels.classes == {"background": 0, "organ": 1, "lesion": 2}
    with pytest.raises(ModelFileError) as e:
        AppParts.from_conf(str(APP), {"preset": str(tmp_path / "two.yaml"), "model_dir": str(tmp_path / "m")})
    assert "weights 8 of another shape (e.g. 'head.weight')" in str(e.value) and str(e.value).endswith(
        f"Your config {tmp_path / 'two.yaml'} is named 'phantom' (from the preset it extends), so the weights shipped "
        "for 'phantom' were picked; give it its own `name:` to start untrained, or name weights that fit with --conf "
        "pretrained_<model>")
    (tmp_path / "own.yaml").write_text("name: own\n" + (tmp_path / "two.yaml").read_text())
    parts = AppParts.from_conf(str(APP), {"preset": str(tmp_path / "own.yaml"), "model_dir": str(tmp_path / "m")})
    assert [(Path(m.published).name, m.pretrained) for m in parts.models] == [
        ("own_crossmodal.pt", None), ("own_baseline_unet.pt", None)]
    (tmp_path / "typo.yaml").write_text("extends: phantomm\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(tmp_path / "typo.yaml"))
    assert str(e.value).startswith(f"{tmp_path / 'typo.yaml'}: extends 'phantomm': no phantomm.yaml beside it, nor a "
                                   "shipped preset of that name (['base', 'brain', 'phantom', 'phantom_large'] in ")


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ConfigError) as e:
        load_config("nope")
    assert "unknown config preset 'nope'" in str(e.value) and "'brain'" in str(e.value)


def test_mirror_axes_are_checked_where_they_are_set(tmp_path):
    assert load_config("brain").infer.mirror_axes == ()
    assert load_config("brain", overrides={"infer": {"mirror_axes": [2, 0]}}).infer.mirror_axes == (0, 2)
    for bad, why in (([3], "must name spatial axes 0, 1 or 2, each once"), ([1, 1], "each once"),
                     ("x", "is not a list of spatial axes")):
        with pytest.raises(ConfigError, match=f"infer.mirror_axes: .*{why}"):
            load_config("brain", overrides={"infer": {"mirror_axes": bad}})


def test_the_server_says_at_start_what_it_segments_with(tmp_path: Path):
    """The start-up log line: the preset, its modalities and classes, and each model's weights (shipped, trained
    here, or none yet)."""
    (tmp_path / "petct.yaml").write_text("extends: phantom\nname: petct\nmodalities:\n  - {name: ct, kind: ct}\n"
                                         "  - {name: pet, kind: pet}\nlabels:\n  classes: {background: 0, lesion: 1}\n")
    parts = AppParts.from_conf(str(APP), {"preset": str(tmp_path / "petct.yaml"), "model_dir": str(tmp_path / "m")})
    assert parts.describe() == (
        f"serving preset '{tmp_path / 'petct.yaml'}': modalities ct, pet (the first the primary), classes lesion; "
        "crossmodal: no weights yet: it segments nothing useful until a training run publishes some; baseline_unet: "
        "no weights yet: it segments nothing useful until a training run publishes some")
    (tmp_path / "m" / "petct_crossmodal.pt").write_bytes(b"")  # a training run's (describe reads no weights)
    assert parts.describe().split("; ")[1] == f"crossmodal: {tmp_path / 'm' / 'petct_crossmodal.pt'} (trained here)"
    shipped = AppParts.from_conf(str(APP), {"preset": "brain", "model_dir": str(tmp_path / "b")}).describe()
    assert shipped.endswith(f"crossmodal: {APP / 'pretrained' / 'brain_crossmodal.pt'} (pretrained); baseline_unet: "
                            f"{APP / 'pretrained' / 'brain_baseline_unet.pt'} (pretrained)")


def test_a_preset_the_folder_does_not_fit_is_said_at_start(tmp_path: Path, caplog):
    """`--conf preset brain` on CT + PET + MR cases: every infer a 422 naming a missing T2, nothing at start to say
    why; now a warning naming the files, what the preset takes and the preset they fit. None where they fit."""
    import logging

    from conftest import make_phantom_studies

    studies = make_phantom_studies(tmp_path / "s", load_config("phantom"), cases=2, dense=1, sparse=0, seed=3)
    with caplog.at_level(logging.WARNING, logger="crossmodal.serving.app"):
        AppParts.from_conf(str(APP), {"preset": "brain", "model_dir": str(tmp_path / "m")}, studies=str(studies))
    assert [r.getMessage() for r in caplog.records if r.name == "crossmodal.serving.app"] == [
        f"--conf preset brain: the cases under {studies} have modality files of mr, pet, which it does not take (t1 + "
        "t2, pd), and no file of t2, pd: each such case is a 422 at infer ('modality ... is missing') and stops a "
        "training (unless missing_modality zero_fill); they fit preset 'phantom' (--conf preset phantom)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="crossmodal.serving.app"):
        AppParts.from_conf(str(APP), {"preset": "phantom", "model_dir": str(tmp_path / "m")}, studies=str(studies))
    assert [r for r in caplog.records if r.name == "crossmodal.serving.app"] == []
