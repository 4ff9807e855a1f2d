"""Atlas pseudo-labels and stroke transfer: labels carried onto another case by affine + demons registration."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import dice
from crossmodal import atlas as atlas_module
from crossmodal.atlas import WarpCache, atlas_pseudo_label, transfer_strokes, warp_label
from crossmodal.data.brain import make_brain_case
from crossmodal.data.sparse import sparsify
from crossmodal.labels import IGNORE_INDEX, SPARSE, to_training
from crossmodal.register import single_threaded


def _case(brain_cfg, templates, i: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """A 3 mm brain case (as bench-quality makes them): T1 (1, H, W, D), truth (1, H, W, D), affine."""
    case = make_brain_case(brain_cfg, templates, np.random.default_rng([0, i]), spacing=3.0)
    t1, label = case.images["t1"], case.label
    return torch.from_numpy(t1.array)[None], torch.from_numpy(label.array.astype(np.float32))[None], t1.affine


def test_atlas_label_follows_the_anatomy_onto_another_case(brain_cfg, templates):
    image, truth, affine = _case(brain_cfg, templates, 1)
    atlas = _case(brain_cfg, templates, 0)  # another crop, rotation, scaling and smooth deformation of the brain
    assert atlas[0].shape != image.shape
    warped = atlas_pseudo_label(image, affine, [atlas], num_classes=4)
    affine_only = atlas_pseudo_label(image, affine, [atlas], num_classes=4, iterations=0)
    assert warped.shape == truth.shape and set(torch.unique(warped).tolist()) <= {IGNORE_INDEX, 0, 1, 2, 3}
    gt = truth[0].numpy()
    deformed = [dice(warped[0].numpy(), gt, c) for c in (1, 2, 3)]
    aligned = [dice(affine_only[0].numpy(), gt, c) for c in (1, 2, 3)]
    # grey / white matter / CSF (the network from this one case: 0.72-0.78 mean on the benchmark's test cases)
    assert min(deformed[:2]) > 0.75 and np.mean(deformed) > 0.7, deformed
    assert np.mean(deformed) > np.mean(aligned) + 0.02, (deformed, aligned)  # the demons add to the affine


def test_atlases_vote_and_disagreement_stays_unlabelled(brain_cfg, templates):
    image, truth, affine = _case(brain_cfg, templates, 1)
    wrong = truth.clone()
    wrong[truth == 3] = 1  # an atlas that calls CSF grey matter
    atlases = [(image, truth, affine), (image, wrong, affine)]
    strict = atlas_pseudo_label(image, affine, atlases, num_classes=4, min_agreement=1.0)
    gt = truth[0].numpy()
    assert bool((strict[0][torch.from_numpy(gt == 3)] == IGNORE_INDEX).float().mean() > 0.95)  # they disagree
    agreed = strict[0] != IGNORE_INDEX
    assert float((strict[0][agreed] == truth[0][agreed]).float().mean()) > 0.97  # itself: (nearly) the identity
    with pytest.raises(ValueError, match="at least one atlas"):
        atlas_pseudo_label(image, affine, [], num_classes=4)


def test_strokes_of_other_cases_are_carried_onto_a_case(brain_cfg, templates):
    image, truth, affine = _case(brain_cfg, templates, 1)
    others = [_case(brain_cfg, templates, i) for i in (0, 2)]
    rng = np.random.default_rng(0)

    def strokes(label: torch.Tensor) -> torch.Tensor:  # scribbles as the benchmark draws them, as a training map
        drawn = sparsify(label[0].numpy().astype(np.int64), brain_cfg.labels, "scribbles", rng)
        return torch.from_numpy(to_training(drawn, SPARSE, brain_cfg.labels)[None].astype(np.float32))

    own = strokes(truth)
    out = transfer_strokes(image, affine, own, [(im, strokes(lab), af) for im, lab, af in others])
    drawn, labelled = own[0] != IGNORE_INDEX, out[0] != IGNORE_INDEX
    assert out.shape == own.shape and torch.equal(out[0][drawn], own[0][drawn])  # what was drawn stays
    added = labelled & ~drawn
    assert float(added.float().mean()) > float(drawn.float().mean())  # 2 cases' strokes: more than its own again
    right = float((out[0][added] == truth[0][added]).float().mean())
    assert right > 0.93, right  # strokes keep off the edges, so carried ones mostly land inside the same tissue
    alone = transfer_strokes(image, affine, own, [])
    assert torch.equal(alone, own)


def test_a_registration_runs_its_filters_on_one_thread_and_repeats_exactly(brain_cfg, templates, monkeypatch):
    image, _, affine = _case(brain_cfg, templates, 1)
    atlas_image, atlas_label, atlas_affine = _case(brain_cfg, templates, 0)
    threads = []  # the global default when the moments, the histogram matching and the resampling run
    for name in ("CenteredTransformInitializer", "HistogramMatching", "Resample"):
        original = getattr(sitk, name)

        def spy(*args, _original=original, **kwargs):
            threads.append(sitk.ProcessObject.GetGlobalDefaultNumberOfThreads())
            return _original(*args, **kwargs)

        monkeypatch.setattr(atlas_module.sitk, name, spy)
    default = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)  # as on 2 cores (a 1-core default would hide the check)
    try:
        args = (image[0].numpy(), affine, atlas_image[0].numpy(), atlas_affine,
                atlas_label[0].numpy().astype(np.int64))
        first, second = warp_label(*args), warp_label(*args)
        assert len(threads) == 8 and set(threads) == {1}  # threaded sums split anew each run changed the result
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 2  # and the default is given back
        assert np.array_equal(first, second)
        with pytest.raises(RuntimeError, match="inside"), single_threaded():
            raise RuntimeError("inside")
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 2  # even when what runs inside fails
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(default)


def test_registrations_run_side_by_side_and_give_what_one_at_a_time_gives(brain_cfg, templates, monkeypatch):
    image, truth, affine = _case(brain_cfg, templates, 1)
    others = [_case(brain_cfg, templates, i) for i in (0, 2)]
    rng = np.random.default_rng(1)
    strokes = [(im, torch.from_numpy(to_training(sparsify(lab[0].numpy().astype(np.int64), brain_cfg.labels,
                                                          "scribbles", rng), SPARSE, brain_cfg.labels)[None]
                                     .astype(np.float32)), af) for im, lab, af in others]
    own = torch.full_like(truth, float(IGNORE_INDEX))
    running, most, lock = [0], [0], threading.Lock()  # registrations running at once
    original = atlas_module._warp_label

    def counted(*args):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            return original(*args)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(atlas_module, "_warp_label", counted)
    alone = transfer_strokes(image, affine, own, strokes, workers=1)
    assert most[0] == 1
    together = transfer_strokes(image, affine, own, strokes, workers=2)
    assert most[0] == 2  # two registrations of a few seconds each, on two threads
    assert torch.equal(alone, together)  # each on one thread: the same label to the last voxel
    carried = int((together != IGNORE_INDEX).sum())  # the other cases' strokes, less what falls outside or disagrees
    assert 0.5 * sum(int((s != IGNORE_INDEX).sum()) for _, s, _ in strokes) < carried
    most[0] = 0
    voted = atlas_pseudo_label(image, affine, others, num_classes=4, workers=2)
    assert most[0] == 2
    assert np.mean([dice(voted[0].numpy(), truth[0].numpy(), c) for c in (1, 2, 3)]) > 0.7


def test_warped_labels_are_kept_read_back_and_the_least_used_removed(tmp_path, caplog):
    x = np.zeros((20, 20, 20), np.float32)
    x[5:15, 4:16, 6:14] = 1.0
    moved = np.roll(x, 2, axis=0)
    label = np.where(moved > 0, 1, IGNORE_INDEX)
    cache = WarpCache(tmp_path, max_files=2)
    first, hit = cache.warp(x, np.eye(4), moved, np.eye(4), label, 20)
    fresh = warp_label(x, np.eye(4), moved, np.eye(4), label, 20)
    assert not hit and np.array_equal(first, fresh) and first.dtype == np.int64
    again, hit = cache.warp(x, np.eye(4), moved, np.eye(4), label, 20)
    assert hit and np.array_equal(again, fresh) and cache.counts == {"read": 1, "registered": 1}
    (first_file,) = tmp_path.glob("*.npz")
    other = np.where(label == 1, 2, IGNORE_INDEX)  # another label of the same images: another registration
    assert not cache.warp(x, np.eye(4), moved, np.eye(4), other, 20)[1]
    (other_file,) = set(tmp_path.glob("*.npz")) - {first_file}
    past = time.time() - 100
    os.utime(first_file, (past, past))
    os.utime(other_file, (past + 1, past + 1))
    assert cache.warp(x, np.eye(4), moved, np.eye(4), label, 20)[1]  # used again: now the most recent
    assert not cache.warp(x, np.eye(4), moved, np.eye(4), label, 10)[1]  # other settings: another registration
    assert first_file.exists() and not other_file.exists()  # at most 2: the least recently used went
    assert len(list(tmp_path.glob("*.npz"))) == 2
    newest = max(tmp_path.glob("*.npz"), key=lambda f: f.stat().st_mtime_ns)
    newest.write_bytes(b"cut short by a kill")
    with caplog.at_level("WARNING", logger="crossmodal.atlas"):
        redone, hit = cache.warp(x, np.eye(4), moved, np.eye(4), label, 10)
    assert not hit and f"warped label {newest} is unreadable" in caplog.text
    assert np.array_equal(redone, warp_label(x, np.eye(4), moved, np.eye(4), label, 10))
    assert cache.warp(x, np.eye(4), moved, np.eye(4), label, 10)[1]  # written again, whole
