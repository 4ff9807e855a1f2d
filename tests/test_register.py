"""Co-registration of secondary modalities (``crossmodal.register``) and its place in ``load_case``."""

import logging
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from crossmodal import register
from crossmodal.config import ConfigError, load_config
from crossmodal.io import find_case, load_volume, save_volume
from crossmodal.register import register_rigid, single_threaded
from crossmodal.transforms import load_case

SHIFT = np.array([4.0, -3.0, 2.0])  # mm, |SHIFT| = 5.39


def _displace(studies: Path, case_id: str, names: tuple[str, ...], shift: np.ndarray) -> None:
    """Move the content of the named sidecar modalities by ``shift`` mm (their affine's origin moves)."""
    for name in names:
        path = studies / "modalities" / case_id / f"{name}.nii.gz"
        vol = load_volume(path)
        affine = vol.affine.numpy().copy()
        affine[:3, 3] += shift
        save_volume(path, vol[0].numpy(), affine)


def _load(studies: Path, cfg, case_id: str = "phantom000"):
    return load_case(find_case(studies / f"{case_id}.nii.gz", cfg.modality_names), cfg)[0]


def test_registration_undoes_a_known_displacement(phantom_studies: Path):
    off = load_config("phantom", overrides={"data": {"register": "none"}})
    truth = _load(phantom_studies, off)
    _displace(phantom_studies, "phantom000", ("pet", "mr"), SHIFT)
    moved = _load(phantom_studies, off)
    assert moved.meta["registered_mm"] == {"pet": 0.0, "mr": 0.0}
    for mode in ("translation", "rigid"):
        cfg = load_config("phantom", overrides={"data": {"register": mode}})
        aligned = _load(phantom_studies, cfg)
        assert torch.equal(aligned[0], truth[0])  # the primary is never moved
        for i, name in ((1, "pet"), (2, "mr")):
            before = float((moved[i] - truth[i]).abs().mean())
            after = float((aligned[i] - truth[i]).abs().mean())
            # rigid may take a spurious degree or two of rotation on the blurred, anisotropic PET
            assert after < (0.35 if mode == "translation" else 0.5) * before, (mode, name, before, after)
            if mode == "translation":  # the found motion is the displacement, within a millimetre
                assert aligned.meta["registered_mm"][name] == pytest.approx(np.linalg.norm(SHIFT), abs=1.0)


def test_translation_matrix_points_from_fixed_to_moving():
    g = torch.zeros(40, 40, 40)
    g[12:28, 10:26, 14:30] = 1.0
    g[16:20, 14:18, 18:22] = 2.0
    r = register_rigid(g, torch.roll(g, shifts=(2, -1), dims=(0, 2)), np.diag([2.0, 3.0, 1.5, 1.0]), "translation")
    assert r.accepted and r.metric_after < r.metric_before
    np.testing.assert_allclose(r.matrix[:3, 3], [4.0, 0.0, -1.5], atol=0.3)  # voxels x spacing
    np.testing.assert_allclose(r.matrix[:3, :3], np.eye(3))


def test_a_registration_runs_on_one_thread_and_repeats_to_the_last_digit(monkeypatch):
    g = torch.zeros(40, 40, 40)
    g[12:28, 10:26, 14:30] = 1.0
    g[16:20, 14:18, 18:22] = 2.0
    made = []  # the global default thread count when each registration method is made
    original = sitk.ImageRegistrationMethod

    def spy():
        made.append(sitk.ProcessObject.GetGlobalDefaultNumberOfThreads())
        return original()

    monkeypatch.setattr(register.sitk, "ImageRegistrationMethod", spy)
    default = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)  # as on 2 cores (a 1-core default would hide the check)
    try:
        found = [register_rigid(g, torch.roll(g, 2, 0), np.diag([2.0, 2.0, 2.0, 1.0]), mode).matrix
                 for mode in ("rigid", "rigid", "translation")]
        assert len(made) > 3 and set(made) == {1}  # threaded, the translation differed by ~1e-15 mm between calls
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 2  # the default is given back
        inside, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
        seen = {}

        def first():  # inside when the second comes; leaves first
            with single_threaded(), single_threaded():  # re-entrant
                inside.set()
                seen["both_inside"] = second_in.wait(timeout=5.0)  # callers share it: none waits for another
                seen["default_both_inside"] = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
            first_out.set()

        def second():
            inside.wait(timeout=5.0)
            with single_threaded():
                second_in.set()
                first_out.wait(timeout=5.0)
                seen["default_after_first_left"] = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()

        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert seen == {"both_inside": True, "default_both_inside": 1, "default_after_first_left": 1}
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 2  # the last one out gave it back
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(default)
    assert np.array_equal(found[0], found[1])


def test_aligned_modalities_are_left_alone(phantom_studies: Path):
    """No misregistration: the rigid search finds (nearly) nothing, the images stay as resampled."""
    off = _load(phantom_studies, load_config("phantom", overrides={"data": {"register": "none"}}))
    on = _load(phantom_studies, load_config("phantom"))
    for i, name in ((1, "pet"), (2, "mr")):
        assert on.meta["registered_mm"][name] < 2.5  # translation + rotation over a 100 mm ball
        assert float((on[i] - off[i]).abs().mean()) < 0.1 * float(off[i].abs().mean())


def test_implausible_motion_is_rejected(phantom_studies: Path, caplog):
    """A motion beyond ``register_max_mm`` counts as a failure: the modality stays as it was, and the log says what
    was found and which setting to raise (it said nothing: a series 30 mm off cost the phantom 14 Dice points)."""
    _displace(phantom_studies, "phantom000", ("pet",), SHIFT)
    cfg = load_config("phantom", overrides={"data": {"register": "translation", "register_max_mm": 2.0}})
    off = _load(phantom_studies, load_config("phantom", overrides={"data": {"register": "none"}}))
    with caplog.at_level(logging.WARNING):
        on = _load(phantom_studies, cfg)
    assert on.meta["registered_mm"]["pet"] == 0.0 and torch.equal(on[1], off[1])
    pet = phantom_studies / "modalities" / "phantom000" / "pet.nii.gz"
    found = re.search(rf"case 'phantom000': pet \({re.escape(str(pet))}\): the best alignment to the primary found "
                      r"moves it ([\d.]+) mm, more than data.register_max_mm \(2\): left as it lies\. .*raise "
                      "data.register_max_mm", caplog.text)
    assert found and abs(float(found.group(1)) - np.linalg.norm(SHIFT)) < 1.0, caplog.text
    noise = torch.from_numpy(np.random.default_rng(0).normal(size=(24, 24, 24)).astype(np.float32))
    r = register_rigid(noise, noise.roll(3, 0), np.eye(4), "rigid", max_shift_mm=1.0)
    assert not r.accepted and np.array_equal(r.matrix, np.eye(4))
    # a flat image, nothing to align by: was ITK's "Zero-valued spacing is not supported" and a traceback
    flat = register_rigid(noise, torch.zeros_like(noise), np.eye(4), "translation")
    assert not flat.accepted and np.array_equal(flat.matrix, np.eye(4))


def test_bad_registration_settings_are_named():
    with pytest.raises(ConfigError, match="data.register: 'affine' is not one of none, translation, rigid"):
        load_config("phantom", overrides={"data": {"register": "affine"}})
    with pytest.raises(ValueError, match="registration mode 'none'"):
        register_rigid(torch.zeros(8, 8, 8), torch.zeros(8, 8, 8), np.eye(4), "none")


def test_a_found_motion_is_reused_until_a_file_changes(phantom_studies: Path, monkeypatch):
    """Training epochs and repeated requests do not search again; a rewritten file is registered afresh."""
    import crossmodal.transforms as transforms

    calls = []
    monkeypatch.setattr(transforms, "register_rigid", lambda *a, **k: calls.append(1) or register_rigid(*a, **k))
    cfg = load_config("phantom", overrides={"data": {"register": "translation"}})
    first = _load(phantom_studies, cfg)
    again = _load(phantom_studies, cfg)
    assert len(calls) == 2 and torch.equal(first, again)  # pet and mr once each
    assert again.meta["registered_mm"] == first.meta["registered_mm"]
    _displace(phantom_studies, "phantom000", ("pet",), SHIFT)
    moved = _load(phantom_studies, cfg)
    assert len(calls) == 3 and moved.meta["registered_mm"]["pet"] == pytest.approx(np.linalg.norm(SHIFT), abs=1.0)


def test_a_slab_of_a_few_slices_is_registered_on_its_own_grid_and_one_too_thin_is_left_as_it_is():
    """A working grid of a few slices crashed the case with ITK's "The number of pixels along direction 2 is less than
    4" (its coarse twin had 3 slices; a 2-slice grid had 2): a slab registers on its own grid, a thinner one not."""
    from crossmodal.transforms import align_to_primary
    from monai.data import MetaTensor

    cfg = load_config("phantom", overrides={"data": {"register": "translation"}})
    rng = np.random.default_rng(0)
    for slices, moved in ((4, True), (3, False)):
        g = torch.zeros(300, 300, slices)
        for _ in range(40):  # blocks of their own intensity, through every slice
            x, y = rng.integers(10, 260, size=2)
            g[x : x + rng.integers(10, 40), y : y + rng.integers(10, 40)] = float(rng.uniform(0.5, 3.0))
        ref = MetaTensor(g[None], affine=torch.eye(4, dtype=torch.float64))
        source = MetaTensor(torch.roll(g, 3, 0)[None], affine=torch.eye(4, dtype=torch.float64))  # 3 mm along x
        aligned, shift, _ = align_to_primary(source, ref, cfg)
        assert aligned.shape == (1, 300, 300, slices)
        if moved:
            assert shift == pytest.approx(3.0, abs=0.5)
            assert float((aligned[0] - g).abs().mean()) < 0.3 * float((source[0] - g).abs().mean())
        else:  # too thin to register: as it came
            assert shift == 0.0 and torch.equal(aligned[0], source[0])
