"""Hybrid supervision: consistency losses (hand-computed values), one-forward steps, multi-source loading, the
train task on dense + sparse + unlabelled cases, data-parallel training in two CPU processes."""

import json
import logging
import math
import multiprocessing
import re
import shutil
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import APP, crop_slab, make_phantom_studies
from crossmodal import transforms
from crossmodal.atlas import usable_cores
from crossmodal.config import ConfigError, ConsistencyConfig, load_config, save_config
from crossmodal.hybrid import (
    Augmentation,
    EMATeacher,
    HybridLoss,
    MultiSourceLoader,
    copy_paste,
    hybrid_batch,
    sample_available,
    sample_present,
)
from crossmodal.labels import DENSE, IGNORE_INDEX
from crossmodal.losses import (
    AugmentationConsistencyLoss,
    ChannelConsistencyLoss,
    InterModalConsistencyLoss,
    SupervisedLoss,
    sigmoid_rampup,
    soft_dice_distance,
)
from crossmodal.nets import (
    CrossModalNet,
    CrossModalOutput,
    InputSelect,
    build_network,
    record_preset,
    record_voxel_mm,
    weights_voxel_mm,
    weights_windows,
)
from crossmodal.serving.app import AppParts
from crossmodal.serving.offline import method_config, train_offline
from crossmodal.serving.runs import list_runs
from crossmodal.serving.train import (
    CrossModalTrain,
    LatestModel,
    PseudoLabelRounds,
    atlas_labels,
    check_spacings,
    finite_on_every_rank,
    recompute,
    registration_workers,
    stroke_transfer,
    training_voxel_mm,
)
from crossmodal.transforms import PseudoLabeld, preprocessing
from ignite.metrics import Metric
from monai.handlers.utils import from_engine
from monai.utils.enums import CommonKeys as Keys


def logits_of(probs: list[list[float]]) -> torch.Tensor:
    """(voxels, classes) probabilities -> (1, C, voxels) logits whose softmax gives them back."""
    return torch.tensor(probs).log().T[None]


def test_inter_modal_dice_consistency_hand_value():
    head, fused = logits_of([[0.8, 0.2]]), logits_of([[0.5, 0.5]])
    # class 0: 2 * 0.4 / 1.3; class 1: 2 * 0.1 / 0.7
    expected = 1 - (0.8 / 1.3 + 0.2 / 0.7) / 2
    got = InterModalConsistencyLoss("dice")(fused, {"ct": head})
    assert got.item() == pytest.approx(expected, abs=1e-4)
    assert InterModalConsistencyLoss("dice")(fused, {}).item() == 0.0


def test_inter_modal_pseudo_label_uses_confident_voxels_only():
    both = logits_of([[0.9, 0.1], [0.6, 0.4]])  # voxel 2 is below the 0.8 confidence threshold
    got = InterModalConsistencyLoss("pseudo", threshold=0.8)(both, {"ct": both.clone(), "pet": both.clone()})
    assert got.item() == pytest.approx(-math.log(0.9), abs=1e-5)
    unsure = logits_of([[0.6, 0.4]])
    assert InterModalConsistencyLoss("pseudo", threshold=0.8)(unsure, {"ct": unsure}).item() == 0.0


def test_augmentation_consistency_hand_value_and_inverse():
    a, b = logits_of([[0.8, 0.2]]), logits_of([[0.5, 0.5]])
    assert AugmentationConsistencyLoss()(a, b).item() == pytest.approx(1 - (0.8 / 1.3 + 0.2 / 0.7) / 2, abs=1e-4)
    x = torch.randn(2, 3, 4, 5, 6)
    aug = Augmentation.sample(2, x.device, torch.Generator().manual_seed(0))
    assert aug.axes and torch.allclose(aug.invert(aug.apply(x)), x * aug.scale + aug.shift)


def test_channel_consistency_hand_values_and_single_modality():
    loss = ChannelConsistencyLoss()
    same = {"ct": [torch.tensor([[1.0, 2.0, 3.0]])], "mr": [torch.tensor([[3.0, 5.0, 7.0]])]}
    assert loss(same).item() == pytest.approx(0.0, abs=1e-6)  # same channel pattern, other scale and offset
    # centred [-1, 0, 1] vs [1, -2, 1]: cosine 0 -> 1; two levels average
    two = {"ct": [torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.0, 1.0]])],
           "mr": [torch.tensor([[2.0, -1.0, 2.0]]), torch.tensor([[0.0, 1.0]])]}
    assert loss(two).item() == pytest.approx(0.5, abs=1e-5)
    one = {"ct": [torch.ones(2, 4, requires_grad=True)]}
    out = loss(one)
    assert out.item() == 0.0 and out.requires_grad


def test_sigmoid_rampup():
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(100, 100) == sigmoid_rampup(500, 100) == sigmoid_rampup(3, 0) == 1.0


def _net() -> CrossModalNet:
    return CrossModalNet(["ct", "pet", "mr"], num_classes=3, channels=(8, 16), strides=(2,), dropout=0.0)


def test_an_unlabelled_batch_alone_changes_every_encoder():
    """The public CMC release computes its unlabelled terms under no_grad; here they must train the network."""
    torch.manual_seed(0)
    net = _net().train()
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    cfg = ConsistencyConfig(rampup_iterations=0)
    loss_fn = HybridLoss(SupervisedLoss(), cfg)
    x, y, n_lab, n_plain, aug = hybrid_batch([], [torch.randn(2, 3, 16, 16, 16)], torch.Generator().manual_seed(1))
    assert y is None and n_lab == 0 and n_plain == 2 and x.shape[0] == 4
    out = net(x)
    loss, parts = loss_fn(out, y, n_lab, n_plain, aug, step=0)
    assert parts["supervised"] == 0.0 and parts["inter"] > 0 and parts["intra"] > 0 and parts["channel"] > 0
    loss.backward()
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    for m in ("ct", "pet", "mr"):
        changed = [not torch.equal(before[k], v) for k, v in net.named_parameters() if k.startswith(f"encoders.{m}.")]
        assert all(changed), m


def test_hybrid_loss_adds_ramped_terms_to_the_supervised_part():
    torch.manual_seed(0)
    net = _net().eval()
    target = torch.full((1, 1, 16, 16, 16), IGNORE_INDEX)
    target[0, 0, :4] = 1
    x, y, n_lab, n_plain, aug = hybrid_batch([(torch.randn(1, 3, 16, 16, 16), target)], [torch.randn(1, 3, 16, 16, 16)])
    assert (n_lab, n_plain, x.shape[0]) == (1, 2, 3)
    plain_x, plain_y, *rest = hybrid_batch([(x[:1], target)], [x[1:2]], augment=False)
    assert plain_x.shape[0] == 2 and torch.equal(plain_y, target) and rest == [1, 2, None]
    with torch.no_grad():
        out = net(x)
        cfg = ConsistencyConfig(inter_weight=0.5, intra_weight=0.25, channel_weight=0.1, rampup_iterations=10)
        total, parts = HybridLoss(SupervisedLoss(), cfg)(out, y, n_lab, n_plain, aug, step=5)
        sup_only, _ = HybridLoss(SupervisedLoss(), ConsistencyConfig(0, "dice", 0.8, 0, 0))(
            out, y, n_lab, n_plain, aug, step=5)
    ramp = math.exp(-5 * 0.5**2)
    expected = parts["supervised"] + ramp * (0.5 * parts["inter"] + 0.25 * parts["intra"] + 0.1 * parts["channel"])
    assert parts["ramp"] == pytest.approx(ramp) and total.item() == pytest.approx(expected, rel=1e-5)
    assert sup_only.item() == pytest.approx(parts["supervised"], rel=1e-6)
    assert parts["supervised"] == pytest.approx(SupervisedLoss()(net(x[:1]), target).item(), rel=1e-4)


def test_copies_lose_modalities_and_learn_from_the_full_prediction():
    """Modality dropout on the consistency copies only: plain samples keep every modality; a copy keeps 1..M-1;
    the intra-modal term's target (the plain prediction) gets no gradient."""
    gen = torch.Generator().manual_seed(3)
    aug = Augmentation.sample(200, torch.device("cpu"), gen, modalities=3, modality_dropout=0.5)
    kept = aug.present.sum(1)
    assert kept.min() >= 1 and kept.max() == 3 and 0.35 < float((kept < 3).float().mean()) < 0.65
    assert {int(k) for k in kept} == {1, 2, 3}
    assert Augmentation.sample(5, torch.device("cpu"), gen, modalities=3).present.all()
    x, y, n_lab, n_plain, aug = hybrid_batch([], [torch.randn(2, 3, 16, 16, 16)], gen, modality_dropout=1.0)
    mask = sample_present(n_plain, aug)
    assert mask.shape == (4, 3) and mask[:2].all() and not mask[2:].all(1).any()
    assert sample_present(n_plain, Augmentation((2,), aug.scale, aug.shift, torch.ones(2, 3, dtype=torch.bool))) is None
    net = _net().train()
    out = net(x, sample_present=mask)
    out.fused.retain_grad()
    cfg = ConsistencyConfig(inter_weight=0.0, intra_weight=1.0, channel_weight=0.0, rampup_iterations=0)
    loss, parts = HybridLoss(SupervisedLoss(), cfg)(out, y, n_lab, n_plain, aug, step=0)
    assert parts["intra"] > 0
    loss.backward()
    assert float(out.fused.grad[:2].abs().max()) == 0.0 and float(out.fused.grad[2:].abs().max()) > 0


def test_an_absent_modality_takes_no_part_in_its_samples_terms():
    """A sample whose case has no PET file: its PET head and descriptors are left out of the supervised, the
    inter-modal (both modes) and the channel terms; what its (zero-filled) PET head says changes nothing."""
    torch.manual_seed(1)
    fused = torch.randn(2, 3, 4, 4, 4)
    heads = {"ct": torch.randn(2, 3, 4, 4, 4), "pet": torch.randn(2, 3, 4, 4, 4)}
    other = {"ct": heads["ct"], "pet": heads["pet"].clone()}
    other["pet"][1] = -50 * torch.randn(3, 4, 4, 4)  # sample 1 has no PET: its head may say anything
    present = {"ct": torch.tensor([True, True]), "pet": torch.tensor([True, False])}
    target = torch.randint(0, 3, (2, 1, 4, 4, 4))
    for mode in ("dice", "pseudo"):
        loss = InterModalConsistencyLoss(mode, threshold=0.0)
        a, b = loss(fused, heads, present), loss(fused, other, present)
        assert torch.allclose(a, b) and not torch.allclose(loss(fused, heads), loss(fused, other))
    # by hand, dice mode: the PET head's term on sample 0 alone, the CT head's on both
    soft = InterModalConsistencyLoss("dice")(fused, heads, present)
    pf = torch.softmax(fused, 1)
    want = (soft_dice_distance(torch.softmax(heads["ct"], 1), pf)
            + soft_dice_distance(torch.softmax(heads["pet"][:1], 1), pf[:1])) / 2
    assert torch.allclose(soft, want)
    out = CrossModalOutput(fused=fused, per_modality=heads, independent={})
    sup = SupervisedLoss(aux_weight=1.0)
    assert torch.allclose(sup(out, target, present), sup(CrossModalOutput(fused, other, {}), target, present))
    base = sup.base
    assert torch.allclose(sup(out, target, present), base(fused, target) + (
        base(heads["ct"], target) + base(heads["pet"][:1], target[:1])) / 2)
    desc = {"ct": [torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])],
            "pet": [torch.tensor([[2.0, 4.0, 6.0], [3.0, 2.0, 1.0]])]}  # sample 1's PET reversed: ignored
    assert ChannelConsistencyLoss()(desc, present).item() == pytest.approx(0.0, abs=1e-6)
    assert ChannelConsistencyLoss()(desc).item() == pytest.approx(1.0, abs=1e-6)


def test_copies_keep_only_what_their_case_has_and_fall_back_to_it():
    """Consistency copies of a case without PET never get PET back; the network's per-batch modality dropout
    never leaves a sample with only an absent modality: the fused output ignores what the absent channel holds."""
    gen = torch.Generator().manual_seed(2)
    has = torch.tensor([[True, True, True], [True, False, True]])
    x, y, n_lab, n_plain, aug = hybrid_batch([], [torch.randn(2, 3, 16, 16, 16)], gen, modality_dropout=1.0,
                                             present=has)
    for _ in range(20):
        _, _, _, _, aug = hybrid_batch([], [x[:2]], gen, modality_dropout=1.0, present=has)
        assert aug.present.any(1).all() and not aug.present[1, 1] and not aug.present[0].all()
    mask, avail = sample_present(n_plain, aug, has), sample_available(n_plain, aug, has)
    assert mask[:2].tolist() == has.tolist() and avail.tolist() == torch.cat([has, has]).tolist()
    assert sample_present(2, None, torch.ones(2, 3, dtype=torch.bool)) is None
    net = CrossModalNet(["ct", "pet", "mr"], num_classes=3, channels=(8, 16), strides=(2,), dropout=0.0,
                        modality_dropout=0.9).train()
    row = torch.tensor([[True, False, False]])  # a copy of the PET-less case that kept CT alone
    noisy = x[1:2].clone()
    noisy[:, 1] = 40 * torch.randn(16, 16, 16)
    for seed in range(12):  # the batch drops CT (and so all the copy had) now and then: never PET instead
        torch.manual_seed(seed)
        a = net(x[1:2], sample_present=row, available=has[1:]).fused
        torch.manual_seed(seed)
        b = net(noisy, sample_present=row, available=has[1:]).fused
        assert torch.equal(a, b), seed


def test_copy_paste_swaps_one_cuboid_both_ways_with_its_targets():
    """BCP: a cuboid of 2/3 of each side (here 4 of 6) moves between the dense and the unlabelled case, image and
    target together; the pseudo-label's unconfident voxels stay ignored in the mixed targets."""
    x_l, x_u = torch.full((1, 2, 6, 6, 6), 1.0), torch.full((1, 2, 6, 6, 6), 2.0)
    y_l = torch.full((1, 1, 6, 6, 6), 3)
    pseudo = torch.full((1, 1, 6, 6, 6), 1)
    pseudo[..., 0] = IGNORE_INDEX  # the teacher is unsure on one face
    x, y = copy_paste(x_l, y_l, x_u, pseudo, torch.Generator().manual_seed(0))
    assert x.shape == (2, 2, 6, 6, 6) and y.shape == (2, 1, 6, 6, 6)
    box = x[0, 0] == 2.0
    assert int(box.sum()) == 4**3 and torch.equal(box, x[1, 0] == 1.0) and torch.equal(box, x[0, 1] == 2.0)
    idx = box.nonzero()
    assert (idx.max(0).values - idx.min(0).values).tolist() == [3, 3, 3]  # one 4 x 4 x 4 cuboid
    assert torch.equal(y[0, 0][~box], y_l[0, 0][~box]) and torch.equal(y[0, 0][box], pseudo[0, 0][box])
    assert torch.equal(y[1, 0][box], y_l[0, 0][box]) and torch.equal(y[1, 0][~box], pseudo[0, 0][~box])
    assert int((y == IGNORE_INDEX).sum()) == 36  # the unsure face (36 voxels) is ignored wherever it lands


def test_ema_teacher_follows_the_student_slowly_and_masks_unsure_voxels():
    student = _net()
    teacher = EMATeacher(student, decay=0.9)
    before = [p.clone() for p in teacher.model.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher.update(student)
    for b, t in zip(before, teacher.model.parameters(), strict=True):  # 0.9 old + 0.1 (old + 1)
        assert torch.allclose(t, b + 0.1, atol=1e-6) and not t.requires_grad
    x = torch.randn(1, 3, 16, 16, 16)
    with torch.no_grad():
        probs = torch.softmax(teacher.model(x).fused, 1)
    label = teacher.pseudo_label(x, threshold=0.5)
    conf, top = probs.max(1, keepdim=True)
    assert label.shape == (1, 1, 16, 16, 16)
    assert torch.equal(label, top.masked_fill(conf < 0.5, IGNORE_INDEX))
    assert bool((teacher.pseudo_label(x, threshold=1.01) == IGNORE_INDEX).all())


@pytest.mark.parametrize("kind,workers", [("DataLoader", 1), ("ThreadDataLoader", 0), ("ThreadDataLoader", 1)])
def test_a_loading_error_ends_the_epoch_loudly_and_a_case_error_comes_back_whole(kind: str, workers: int):
    """The train task's loaders (MONAI's ``DataLoader``; ``ThreadDataLoader`` as
    :class:`RaisingThreadDataLoader`): a ``CaseError`` raised loading an item is raised in this process and names its
    case and file - as itself from a worker process, by :class:`MultiSourceLoader` as by a plain iteration; a bug
    (any other exception) fails the iteration too; MONAI's ``ThreadDataLoader`` ended the epoch there, silently."""
    import monai.data
    from crossmodal.errors import CaseError, user_error_in
    from crossmodal.hybrid import CarryUserErrors, RaisingThreadDataLoader, collate_carrying, raise_carried

    def load(d: dict) -> dict:
        if d["x"] == 3:
            raise CaseError("case003", "/d/case003.nii.gz", "is empty")
        if d["x"] == 5:
            raise KeyError("a bug")
        return {"x": torch.full((2,), float(d["x"]))}

    def loader(values: list[int]) -> torch.utils.data.DataLoader:
        data = monai.data.Dataset([{"x": v} for v in values], load)
        cls = RaisingThreadDataLoader if kind == "ThreadDataLoader" else monai.data.DataLoader
        if workers == 0:
            return cls(data, batch_size=2)
        return cls(CarryUserErrors(data), batch_size=2, num_workers=workers, collate_fn=collate_carrying)

    assert [raise_carried(b)["x"].tolist() for b in loader([0, 1, 2])] == [[[0.0, 0.0], [1.0, 1.0]], [[2.0, 2.0]]]
    seen = []
    with pytest.raises(Exception) as e:
        for b in loader([0, 1, 2, 3, 4]):
            seen.append(raise_carried(b)["x"][:, 0].tolist())
    assert seen == [[0.0, 1.0]]  # the batches before the failing one, then the error
    assert type(e.value) is (CaseError if workers else RuntimeError)  # in this process: MONAI's "applying transform"
    assert str(user_error_in(e.value)) == "case 'case003': file /d/case003.nii.gz: is empty"
    before = set(multiprocessing.active_children())
    with pytest.raises(Exception) as e:
        list(MultiSourceLoader({"dense": loader([0, 1]), "unlabeled": loader([2, 3])}))
    assert str(user_error_in(e.value)) == "case 'case003': file /d/case003.nii.gz: is empty"
    # its loaders' worker processes stopped there and then (left to the garbage collector, 5 s each)
    assert set(multiprocessing.active_children()) <= before
    with pytest.raises(RuntimeError) as e:
        [raise_carried(b) for b in loader([4, 5])]
    assert user_error_in(e.value) is None and "KeyError: 'a bug'" in "".join(traceback.format_exception(e.value))
    del e  # the traceback holds this frame, which held it: a cycle, whose loader's worker the collector stops in 5 s


def test_multi_source_loader_sees_every_case_of_every_source():
    dense = torch.utils.data.DataLoader(list(range(3)), batch_size=1, shuffle=True)
    unlabeled = torch.utils.data.DataLoader(list(range(100, 107)), batch_size=1, shuffle=True)
    empty = torch.utils.data.DataLoader([], batch_size=1)
    loader = MultiSourceLoader({"dense": dense, "sparse": empty, "unlabeled": unlabeled})
    steps = list(loader)
    assert len(loader) == len(steps) == 7 and all(set(s) == {"dense", "unlabeled"} for s in steps)
    assert sorted(int(s["unlabeled"]) for s in steps) == list(range(100, 107))
    assert {int(s["dense"]) for s in steps} == {0, 1, 2}  # restarted, not truncated
    with pytest.raises(ValueError, match="every source is empty"):
        MultiSourceLoader({"dense": empty})


def test_a_capped_unlabelled_pool_is_walked_in_turn_over_the_epochs():
    """800 unlabelled cases must not make an epoch 800 steps long: 32 a epoch, going on where the last one stopped."""
    dense = torch.utils.data.DataLoader([0, 1, 2], batch_size=2, shuffle=True)
    unlabeled = torch.utils.data.DataLoader(list(range(100, 200)), batch_size=1, shuffle=True)
    loader = MultiSourceLoader({"dense": dense, "unlabeled": unlabeled}, caps={"unlabeled": 32})
    epochs = [[int(s["unlabeled"]) for s in loader] for _ in range(4)]
    assert len(loader) == 32 and [len(e) for e in epochs] == [32, 32, 32, 32]
    first_pass = [c for e in epochs for c in e][:100]
    assert sorted(first_pass) == list(range(100, 200))  # every case once in the first 100 steps: nothing skipped
    assert len(MultiSourceLoader({"dense": dense, "unlabeled": unlabeled}, caps={"unlabeled": 500})) == 100
    assert len(MultiSourceLoader({"dense": dense, "unlabeled": unlabeled}, caps={"dense": 1})) == 100


def test_single_modality_network_sees_one_channel():
    cfg = method_config("phantom", "single_pet")
    net = build_network(cfg).eval()
    assert isinstance(net, InputSelect) and net.index.tolist() == [1]
    x = torch.randn(1, 3, 16, 16, 16)
    with torch.no_grad():
        a = net(x)
        x[:, [0, 2]] = 0  # the other channels do not matter
        assert torch.equal(a, net(x))
    with pytest.raises(ValueError, match="single_ct, single_pet, single_mr"):
        method_config("phantom", "single_xray")


def _bench_config(tmp_path: Path, method: str) -> str:
    cfg = method_config("phantom", method, {"train": {"patch_size": [32, 32, 32], "patches_per_case": 1,
                                                      "batch_size": 2, "val_fraction": 0.0,
                                                      "consistency": {"copy_paste_start": 2, "pseudo_threshold": 0.3}}})
    path = tmp_path / f"{method}.yaml"
    save_config(cfg, path)
    return str(path)


def test_train_task_learns_from_dense_sparse_and_unlabelled_cases(tmp_path: Path, phantom_cfg):
    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=6, dense=1, sparse=1, seed=31)
    preset = _bench_config(tmp_path, "ours")
    stats = train_offline(str(studies), preset, str(tmp_path / "m"), epochs=2, device="cpu", network="crossmodal")
    # 4 unlabelled cases, batch 1 -> 4 steps per epoch; dense and sparse (1 case each) restart every step
    assert stats["total_iterations"] == 4 and stats["current_iteration"] == 8 and stats["epoch"] == 2
    metrics = stats["train"]["metrics"]
    assert metrics["loss_inter"] > 0 and metrics["loss_intra"] > 0 and metrics["loss_channel"] > 0
    assert 0 < metrics["pseudo_confident"] <= 1  # copy-paste ran (start 2 < 8 steps; an 8-step model: threshold 0.3)
    assert metrics["copy_paste_samples"] == 2  # 1 dense x 1 unlabelled case -> 2 mixes in the supervised part
    assert metrics["loss_supervised"] > 0 and 0 < metrics["loss_ramp"] <= 1
    first = torch.load(stats["published"], map_location="cpu")
    # no labels held out (val_fraction 0): the published model is the last epoch's, not the best training Dice's
    run = next((tmp_path / "m").glob("train_*"))
    final = torch.load(run / "checkpoint_final.pt", map_location="cpu")
    assert first.keys() == final.keys() and all(torch.equal(v, final[k]) for k, v in first.items())
    assert (run / "train_model.pt").is_file()  # MONAI Label's best-training-Dice checkpoint stays beside it
    trainer = AppParts.from_conf(str(tmp_path / "app"), {"preset": preset, "model_dir": str(tmp_path / "m"),
                                                         "models": "crossmodal"}).trainer()
    assert trainer.load_path(str(tmp_path / "m" / "train_02")) == stats["published"]  # fine-tunes the published one
    again = train_offline(str(studies), preset, str(tmp_path / "m"), epochs=1, device="cpu", network="crossmodal",
                          use_unlabeled=False)
    assert again["total_iterations"] == 1  # no unlabelled source: one step per epoch (dense, sparse: 1 each)
    assert again["train"]["metrics"]["copy_paste_samples"] == 0  # nothing to mix without unlabelled cases
    assert not all(torch.equal(v, torch.load(again["published"], map_location="cpu")[k]) for k, v in first.items())
    capped = load_config(preset, overrides={"train": {"consistency": {"max_unlabeled_per_epoch": 3}}})
    save_config(capped, tmp_path / "capped.yaml")
    walked = train_offline(str(studies), str(tmp_path / "capped.yaml"), str(tmp_path / "m"), epochs=2, device="cpu",
                           network="crossmodal")
    assert walked["total_iterations"] == 3 and walked["current_iteration"] == 6  # 3 of the 4 unlabelled an epoch
    held = train_offline(str(studies), preset, str(tmp_path / "m"), epochs=1, device="cpu", network="crossmodal",
                         held_out="phantom003")  # one case id (not its letters): a test case, not trained on
    assert held["total_iterations"] == 3  # the other 3 unlabelled cases


def test_a_training_run_repeats_from_its_seed(tmp_path: Path, phantom_cfg):
    """The same data, settings and seed train the same weights, bit for bit, whatever the generator held before
    the run; another seed trains other weights. Until 2026-12-04 the initial weights, dropout and MONAI's random
    transforms came from an unseeded generator: `crossmodal train` twice on the same data gave two models (epoch 2
    channel loss 0.398 vs 0.598 on a 6-case phantom)."""
    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=4, dense=1, sparse=1, seed=31)
    preset = _bench_config(tmp_path, "ours")

    def weights(name: str, **kw: Any) -> dict[str, torch.Tensor]:
        torch.manual_seed(len(name))  # another state each time: the run seeds the generator itself
        stats = train_offline(str(studies), preset, str(tmp_path / name), epochs=1, device="cpu", network="crossmodal",
                              **kw)
        return torch.load(stats["published"], map_location="cpu")

    first, again, other = weights("a"), weights("bb"), weights("ccc", seed=1)
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(v, again[k]) for k, v in first.items())
    assert sum(not torch.equal(v, other[k]) for k, v in first.items()) > len(first) // 2


def test_loader_workers_train_and_a_case_error_in_one_names_its_case(tmp_path: Path):
    """``train.num_workers`` > 0: the cases load in worker processes (training and validation) and the run trains;
    a case that cannot be read there stops the run with its own ``CaseError`` (case, file, problem), raised in the
    training process, as it is without workers - not a worker's ``RuntimeError`` holding a traceback's text. The
    preset's ``train.val_interval`` sets the epochs that validate (both were read nowhere)."""

    from crossmodal.errors import CaseError

    studies = make_phantom_studies(tmp_path / "s", load_config("phantom"), cases=6, dense=2, sparse=1, seed=31)
    cfg = method_config("phantom", "ours", {"train": {
        "patch_size": [32, 32, 32], "patches_per_case": 1, "batch_size": 2, "val_fraction": 0.5, "num_workers": 2,
        "val_interval": 2, "consistency": {"copy_paste_start": 2, "pseudo_threshold": 0.3}}})
    save_config(cfg, tmp_path / "workers.yaml")
    save_config(load_config(str(tmp_path / "workers.yaml"), overrides={"train": {"val_interval": 1}}),
                tmp_path / "every.yaml")  # the broken cases' runs: validating the first epoch

    def train(folder: Path, name: str, epochs: int = 2, preset: str = "workers") -> dict:
        return train_offline(str(folder), str(tmp_path / f"{preset}.yaml"), str(tmp_path / name), epochs=epochs,
                             device="cpu", network="crossmodal", dataset="Dataset")

    stats = train(studies, "good")
    assert stats["best_metric"] > 0 and Path(stats["published"]).is_file()
    assert stats["train"]["metrics"]["copy_paste_samples"] == 2 and stats["train"]["metrics"]["loss_channel"] > 0
    curve = json.loads(next((tmp_path / "good").glob("train_*/learning_curve.json")).read_text())
    assert [r["epoch"] for r in curve] == [1, 2] and "val_mean_dice" not in curve[0]
    assert curve[1]["val_mean_dice"] == pytest.approx(stats["best_metric"], abs=1e-5)
    with pytest.raises(ConfigError, match=r"^train request: val_interval=2 is more than max_epochs=1: no epoch would "):
        train(studies, "never", epochs=1)
    # phantom002 (sparse) loads in a training loader's worker, phantom001 (the held-out dense case) in validation's
    for case in ("phantom002", "phantom001"):
        broken = tmp_path / case
        shutil.copytree(studies, broken)
        pet = broken / "modalities" / case / "pet.nii.gz"
        pet.write_bytes(b"not a volume")
        with pytest.raises(CaseError) as e:
            train(broken, f"m{case}", epochs=1, preset="every")
        assert type(e.value) is CaseError and str(e.value) == (
            f"case '{case}': file {pet}: cannot be read as NIfTI/NRRD (truncated or corrupt?): File {pet} is not a "
            "gzip file")
    with pytest.raises(ConfigError, match=r"train.num_workers: -1 must be >= 0"):
        load_config("phantom", overrides={"train": {"num_workers": -1}})
    with pytest.raises(ConfigError, match=r"val_interval must be >= 1"):
        load_config("phantom", overrides={"train": {"val_interval": 0}})


def test_training_cases_of_several_voxel_sizes_without_a_working_spacing_are_warned_about(tmp_path: Path, caplog):
    """With ``data.spacing`` null each case reaches the network at its own scale: the committed phantom model segmented
    its cases resampled to 1 mm at 0.39 mean Dice (0.93 at its 2 mm). A training run on cases of several voxel sizes
    now says so before any case loads, naming the extremes and the median to set; NIfTI, NRRD and MetaImage headers."""
    from crossmodal.io import header_spacing, load_volume, save_volume

    cfg = load_config("phantom", overrides={"data": {"spacing": None}})  # the phantom preset sets 2 mm
    items = []
    for name, size in (("a.nii.gz", (2.0, 2.0, 2.0)), ("b.nrrd", (1.0, 1.0, 1.0)), ("c.mha", (2.0, 2.0, 3.0))):
        save_volume(tmp_path / name, np.zeros((4, 4, 4), np.float32), np.diag([*size, 1.0]))
        assert header_spacing(tmp_path / name) == pytest.approx(size)
        items.append({"image": str(tmp_path / name), "label_kind": DENSE})
    with caplog.at_level(logging.WARNING):
        said = check_spacings(cfg, items)
    assert said == ("the 3 training cases come in voxel sizes from 1 x 1 x 1 mm (b) to 2 x 2 x 3 mm (c), and "
                    "data.spacing is not set: the network sees each case at its own scale, and a case at another will "
                    "segment poorly. Set data.spacing in the preset (their median: [2.0, 2.0, 2.0]) to resample every "
                    "case to one voxel size, for training and inference") and said in caplog.text
    assert check_spacings(load_config("phantom"), items) is None
    assert check_spacings(cfg, [items[0], {**items[0], "image": str(tmp_path / "a.nii.gz")}]) is None  # one size
    assert check_spacings(cfg, items[:1] + [{"image": str(tmp_path / "gone.nii.gz")}]) is None  # unreadable: left out
    # what a run's weights record having been trained at: the per-axis median, or the preset's spacing
    assert training_voxel_mm(cfg, items) == (2.0, 2.0, 2.0) and training_voxel_mm(cfg, items[1:]) == (1.5, 1.5, 2.0)
    assert training_voxel_mm(load_config("phantom", overrides={"data": {"spacing": [1, 2, 3]}}), items) == (1, 2, 3)
    assert training_voxel_mm(cfg, [{"image": str(tmp_path / "gone.nii.gz")}]) is None
    # the same 2 x 2 x 3 mm voxels stored sagittally (array axes I, A, R: 3, 2, 2 mm) are one size along R, A, S
    save_volume(tmp_path / "sag.nii.gz", np.zeros((4, 4, 4), np.float32),
                np.array([[0.0, 0, 2, 0], [0, 2, 0, 0], [-3, 0, 0, 0], [0, 0, 0, 1]]))
    pair = [items[2], {"image": str(tmp_path / "sag.nii.gz"), "label_kind": DENSE}]
    assert check_spacings(cfg, pair) is None and training_voxel_mm(cfg, pair) == (2.0, 2.0, 3.0)
    save_volume(tmp_path / "flat.nii.gz", np.zeros((4, 4, 4), np.float32), np.diag([3.0, 2.0, 2.0, 1.0]))
    assert "from 2 x 2 x 3 mm (c) to 3 x 2 x 2 mm (flat)" in check_spacings(  # one voxel volume: both named
        cfg, [items[2], {"image": str(tmp_path / "flat.nii.gz")}])
    # a training run says it (a case whose primary and label claim 3 mm voxels)
    studies = make_phantom_studies(tmp_path / "s", cfg, cases=3, dense=2, sparse=0, seed=5)
    for path in (studies / "phantom001.nii.gz", studies / "labels" / "final" / "phantom001.nii.gz"):
        vol = load_volume(path)
        save_volume(path, vol[0].numpy(), np.diag([3.0, 3.0, 3.0, 1.0]) @ np.diag([0.5, 0.5, 0.5, 1.0]) @
                    vol.affine.numpy())
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        save_config(cfg, tmp_path / "mixed.yaml")
        stats = train_offline(str(studies), str(tmp_path / "mixed.yaml"), str(tmp_path / "m"), epochs=1,
                              device="cpu", from_scratch=True)
    assert "the 3 training cases come in voxel sizes from 2 x 2 x 2 mm (phantom000) to 3 x 3 x 3 mm (phantom001)" \
        in caplog.text
    # its weights carry the median of its cases' voxel sizes (2, 3 and 2 mm), for inference to resample to
    assert weights_voxel_mm(stats["published"]) == (2.0, 2.0, 2.0)
    assert weights_voxel_mm(tmp_path / "m" / "train_01" / "model.pt") == (2.0, 2.0, 2.0)
    assert weights_windows(stats["published"]) == {"ct": (-150.0, 250.0)}  # and the preset's CT window
    # fine-tuning weights that record 3 mm: its 2 mm cases are resampled to it, as inference would, and it records 3
    # (and weights that record another CT window: the run trains at the preset's, says so and records it)
    net = build_network(cfg)
    net.load_state_dict(torch.load(stats["published"], weights_only=True))
    record_voxel_mm(net, (3.0, 3.0, 3.0))
    record_preset(net, load_config("phantom", overrides={"modalities": [
        {"name": "ct", "kind": "ct", "window": [-1000, 1000]}, {"name": "pet", "kind": "pet"},
        {"name": "mr", "kind": "mr"}]}))
    torch.save(net.state_dict(), tmp_path / "at3.pt")
    transforms._RESAMPLED.clear()  # said once per case and size in a process
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train_offline(str(studies), str(tmp_path / "mixed.yaml"), str(tmp_path / "m2"), epochs=1, device="cpu",
                      pretrained=str(tmp_path / "at3.pt"))
    assert "come in voxel sizes" not in caplog.text and "at3.pt was trained at 3 x 3 x 3 mm" in caplog.text
    assert "case 'phantom000': voxels of 2 x 2 x 2 mm, and the model was trained at 3 x 3 x 3 mm" in caplog.text
    assert "case 'phantom001': voxels" not in caplog.text  # 3 mm already
    assert weights_voxel_mm(tmp_path / "m2" / "train_01" / "model.pt") == (3.0, 3.0, 3.0)
    assert (f"fine-tuning {tmp_path / 'at3.pt'}, trained at CT window ct -1000..1000, at the preset's ct -150..250: "
            f"its model will record those, and it is held to {tmp_path / 'at3.pt'} segmenting at its own") \
        in caplog.text
    assert weights_windows(tmp_path / "m2" / "train_01" / "model.pt") == {"ct": (-150.0, 250.0)}


def test_cases_whose_modality_covers_part_of_the_grid_train_as_without_it(tmp_path: Path, phantom_cfg, caplog):
    """A modality on part of a training case's grid (an MR slab) is left out of that case, as an absent one: the
    run trains the same weights, bit for bit, as with those cases' MR files gone (``zero_fill``), and says so."""
    import shutil

    partial = make_phantom_studies(tmp_path / "part", phantom_cfg, cases=5, dense=2, sparse=1, seed=33)
    absent = tmp_path / "absent"
    shutil.copytree(partial, absent)
    for case in ("phantom000", "phantom004"):  # a dense case and an unlabelled one
        crop_slab(partial / "modalities" / case / "mr.nii.gz", 0.4)
        (absent / "modalities" / case / "mr.nii.gz").unlink()
    cfg = method_config("phantom", "ours", {"train": {"patch_size": [32, 32, 32], "patches_per_case": 1,
                                                      "batch_size": 2, "val_fraction": 0.0}})
    save_config(cfg, tmp_path / "ours.yaml")
    runs = {}
    transforms._SAID.clear()  # said once per case in a process (another test may have read these cases' names)
    for name, studies, missing in (("part", partial, None), ("absent", absent, "zero_fill")):
        with caplog.at_level(logging.INFO):
            runs[name] = train_offline(str(studies), str(tmp_path / "ours.yaml"), str(tmp_path / name), epochs=2,
                                       device="cpu", network="crossmodal", missing_modality=missing)
    assert runs["part"]["train"]["metrics"] == runs["absent"]["train"]["metrics"]
    a, b = (torch.load(r["published"], map_location="cpu") for r in runs.values())
    assert a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())
    for case in ("phantom000", "phantom004"):
        assert re.search(rf"case '{case}': mr covers 4\d% of the grid \(data.fov_coverage 0.9\): trained on without it",
                         caplog.text)


def test_cases_without_a_modality_train_with_it_left_out(tmp_path: Path, phantom_cfg, monkeypatch, caplog):
    """Under missing_modality zero_fill, training cases (dense, held out, unlabelled) without their PET file train
    and validate with PET left out of their fusion, heads and consistency terms: the run is the same, weights and
    validation, whatever their absent channel holds (zeros, or noise). By default such a case stops the run."""
    import crossmodal.transforms as transforms
    from crossmodal.errors import user_error_in
    from monai.utils import set_determinism

    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=6, dense=2, sparse=1, seed=31)
    for case in ("phantom000", "phantom001", "phantom003"):  # both dense cases (one is held out), one unlabelled
        for f in (studies / "modalities" / case).glob("pet.*"):
            f.unlink()
    cfg = method_config("phantom", "ours", {"train": {
        "patch_size": [32, 32, 32], "patches_per_case": 1, "batch_size": 2, "val_fraction": 0.5,
        "consistency": {"copy_paste_start": 2, "pseudo_threshold": 0.3}}})
    save_config(cfg, tmp_path / "ours.yaml")

    def run(name: str) -> dict:
        set_determinism(0)
        return train_offline(str(studies), str(tmp_path / "ours.yaml"), str(tmp_path / name), epochs=3,
                             device="cpu", network="crossmodal", missing_modality="zero_fill")

    with caplog.at_level(logging.INFO):
        zeros = run("zeros")
    assert ("3 of 6 training cases lack a modality (phantom000: pet; phantom001: pet; phantom003: pet)"
            in caplog.text)
    load_case, noise = transforms.load_case, torch.Generator().manual_seed(9)

    def noisy(case, cfg, missing=None, drop=()):
        image, used = load_case(case, cfg, missing, drop)
        for i, name in enumerate(cfg.modality_names):
            if name not in used:
                image.as_tensor()[i] = 3 * torch.randn(image.shape[1:], generator=noise)
        return image, used

    monkeypatch.setattr(transforms, "load_case", noisy)
    noised = run("noise")
    assert zeros["best_metric"] == noised["best_metric"] and zeros["best_metric"] > 0  # validated without PET
    assert zeros["train"]["metrics"] == noised["train"]["metrics"] and zeros["train"]["metrics"]["loss_channel"] > 0
    a, b = (torch.load(r["published"], map_location="cpu") for r in (zeros, noised))
    assert a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())
    monkeypatch.setattr(transforms, "load_case", load_case)
    with pytest.raises(Exception) as e:
        train_offline(str(studies), str(tmp_path / "ours.yaml"), str(tmp_path / "error"), epochs=1, device="cpu",
                      network="crossmodal")
    # every case lacking a modality named at once, before any case loads
    assert str(user_error_in(e.value)) == (
        "case 'phantom000': modality 'pet' is missing: expected <studies>/modalities/phantom000/pet.nii.gz (or "
        ".nii/.nrrd/.mha); add it (a running server takes it as PUT /datastore/image?image=phantom000 with params "
        '{"modality": "pet"}), or use the case without it (missing_modality zero_fill); 2 more training cases of 6 '
        "lack a modality (phantom001: pet; phantom003: pet)")


class _FallingScore(Metric):
    """A training metric that is best in the first epoch (1, 1/2, 1/3, ...), whatever the network does."""

    def __init__(self) -> None:
        self.epochs = 0
        super().__init__()

    def reset(self) -> None:
        pass

    def update(self, output) -> None:
        pass

    def compute(self) -> float:
        self.epochs += 1
        return 1.0 / self.epochs


def test_without_held_out_labels_the_last_model_is_published_not_the_best_training_dice(tmp_path, phantom_cfg,
                                                                                          monkeypatch):
    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=2, dense=2, sparse=0, seed=35)
    monkeypatch.setattr(CrossModalTrain, "train_key_metric",
                        lambda self, context: {self.TRAIN_METRIC_MEAN_DICE: _FallingScore()})
    stats = train_offline(str(studies), _bench_config(tmp_path, "ours"), str(tmp_path / "m"), epochs=3,
                          device="cpu", network="crossmodal")
    run = next((tmp_path / "m").glob("train_*"))
    load = lambda p: torch.load(p, map_location="cpu")  # noqa: E731
    published, final = load(stats["published"]), load(run / "checkpoint_final.pt")
    assert all(torch.equal(v, final[k]) for k, v in published.items())  # the third epoch's weights
    best_train = load(run / "train_model.pt")  # MONAI Label's choice, kept beside it: the first epoch's
    assert not all(torch.equal(v, best_train[k]) for k, v in published.items())


def test_a_diverging_run_stops_before_publishing_and_the_model_in_service_stays(tmp_path, phantom_cfg):
    from crossmodal.errors import TrainingDiverged

    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=2, dense=2, sparse=0, seed=35)
    train_offline(str(studies), _bench_config(tmp_path, "ours"), str(tmp_path / "m"), epochs=1, device="cpu",
                  network="crossmodal")
    files = ("phantom_crossmodal.pt", "phantom_crossmodal_train_stats.json")  # the model in service, its stats
    in_service = [(tmp_path / "m" / n).read_bytes() for n in files]
    # a learning rate no network survives: the first step's update makes every activation overflow, so the next
    # step's loss is NaN (it was published: a model that segments nothing replaced the one in service). One step an
    # epoch here, so the run had published its first epoch's ruined, finite model before the NaN
    save_config(load_config(_bench_config(tmp_path, "ours"), overrides={"train": {
        "learning_rate_by_model": {"crossmodal": 1e30}, "finetune_lr_scale": 1.0}}), tmp_path / "hot.yaml")
    with pytest.raises(TrainingDiverged) as e:
        train_offline(str(studies), str(tmp_path / "hot.yaml"), str(tmp_path / "m"), epochs=2, device="cpu",
                      network="crossmodal")
    assert str(e.value) == (
        "training stopped: the loss is not finite (NaN / Inf) at epoch 2, step 2 (supervised nan, inter nan, channel "
        "nan, intra nan); that step was not applied and the model in service is the one from before this run. "
        "Lower the learning rate (this run's: 1e+30; the train request's `learning_rate`, or the config's "
        "`train.learning_rate`) and train again")
    assert isinstance(e.value, ConfigError)  # the CLI's message and the server's 422, not a traceback / 500
    assert [(tmp_path / "m" / n).read_bytes() for n in files] == in_service
    # the first training of a model dir: what it published goes, the committed / pretrained weights serve on
    with pytest.raises(TrainingDiverged):
        train_offline(str(studies), str(tmp_path / "hot.yaml"), str(tmp_path / "first"), epochs=2, device="cpu",
                      network="crossmodal")
    assert not (tmp_path / "first" / "phantom_crossmodal.pt").exists()
    assert not (tmp_path / "first" / "phantom_crossmodal_train_stats.json").exists()


@pytest.mark.parametrize("val_fraction", [0.2, 0.0])
def test_a_runs_evaluations_leave_it_training_the_model_it_would_without_them(tmp_path: Path, phantom_cfg,
                                                                               val_fraction: float):
    """A fine-tuning's evaluation of the model it starts from (``publish: if_better``, the default), before the
    first step: on the held-out labels (0.2; :class:`StartingScore`) or, with none held out, on the run's own (0.0;
    :class:`TrainingFit`, which scores the last model too); and the validations between epochs. Each drew from
    torch's generator (its loader's base seed), so the training loaders' shuffles after it differed: the same request
    trained another model by its ``publish`` mode (the phantom preset, 8 cases, two epochs from the committed model:
    held-out Dice 0.9276 / 0.9200 after each epoch against 0.9239 / 0.9336) and by its ``val_interval``."""
    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=6, dense=5, sparse=0, seed=8)

    def run(mode: str, epochs: int = 1, val_interval: int = 1) -> tuple[dict, dict, dict]:
        """The run's answer, its best model's weights and its last model's."""
        name = f"{mode}_{epochs}_{val_interval}"
        save_config(load_config("phantom", overrides={"train": {"patch_size": [32] * 3, "patches_per_case": 1,
                                                                "val_fraction": val_fraction,
                                                                "val_interval": val_interval}}),
                    tmp_path / f"{name}.yaml")
        stats = train_offline(str(studies), str(tmp_path / f"{name}.yaml"), str(tmp_path / name), epochs=epochs,
                              device="cpu", pretrained=str(APP / "pretrained" / "phantom_crossmodal.pt"),
                              publish_mode=mode)
        folder = next((tmp_path / name).glob("train_*"))
        return stats, *(torch.load(folder / f, map_location="cpu") for f in ("model.pt", "checkpoint_final.pt"))

    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    (checked, best_a, _), (plain, best_b, _) = run("if_better"), run("best_of_run")
    what = "start_metric" if val_fraction else "training_fit"  # what the default adds
    assert what in checked and what not in plain, (checked, plain)
    assert checked["best_metric"] == plain["best_metric"] and same(best_a, best_b), (checked, plain)
    if val_fraction:  # validated after each of 2 epochs or after the second only: the same last model
        (every, _, last_a), (second, _, last_b) = run("best_of_run", 2, 1), run("best_of_run", 2, 2)
        assert (every["epoch"], second["epoch"]) == (2, 2) and same(last_a, last_b)


def test_a_fine_tuning_with_no_held_out_label_publishes_only_a_model_that_still_fits_its_labels(tmp_path, phantom_cfg,
                                                                                              caplog):
    """One labelled case (nothing to hold out): the last model is published. AdamW steps of 1.0 wreck the committed
    model with a finite loss (it segmented the other cases at Dice 0.008, was published and served); now a run
    publishes its last model only if that fits the labels it trained on no more than ``train.fit_tolerance`` worse
    than the starting model, else the model in service stays. A sound fine-tuning publishes (and trains exactly as it
    would without the check: ``test_a_runs_evaluations_leave_it_training_the_model_it_would_without_them[0.0]``)."""
    committed = APP / "pretrained" / "phantom_crossmodal.pt"
    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=4, dense=1, sparse=0, seed=5)
    save_config(method_config("phantom", "ours", {"train": {"learning_rate_by_model": {"crossmodal": 1.0}}}),
                tmp_path / "hot.yaml")
    with caplog.at_level(logging.INFO, logger="crossmodal.serving.train"):
        hot = train_offline(str(studies), str(tmp_path / "hot.yaml"), str(tmp_path / "m"), epochs=1, device="cpu",
                            pretrained=str(committed))
    fit = hot["training_fit"]
    assert fit["key"] == "val_mean_dice" and fit["start"] > 0.9 and fit["end"] < 0.3 and not fit["published"], fit
    assert hot["published"] == hot["start_model"] == str(committed)
    assert not (tmp_path / "m" / "phantom_crossmodal.pt").exists()  # nothing published: the committed one serves
    told = json.loads((tmp_path / "m" / "phantom_crossmodal_train_stats.json").read_text())  # the viewers' stats
    assert told["training_fit"] == fit
    assert (f"not published: after 1 epoch(s) the model fits the 1 labelled case(s) it was trained on at "
            f"val_mean_dice {fit['end']:.4f}, the model it started from at {fit['start']:.4f} (train.fit_tolerance "
            "0.05); the model in service stays. A learning rate too high for fine-tuning (this run's: 1) or too few "
            "epochs to get over a fresh optimiser's first steps: train again with a lower `learning_rate` or more "
            "`max_epochs`") in caplog.text
    # the default learning rate, 2 epochs: published, with both fits in its stats
    stats = train_offline(str(studies), "phantom", str(tmp_path / "m"), epochs=2, device="cpu",
                          pretrained=str(committed))
    published = tmp_path / "m" / "phantom_crossmodal.pt"
    assert stats["published"] == str(published) and published.is_file()
    fit = stats["training_fit"]
    assert fit["start"] == pytest.approx(hot["training_fit"]["start"], abs=1e-6) and fit["published"], fit
    assert fit["seconds"] > 0, fit  # both evaluations' time
    assert fit["end"] >= fit["start"] - 0.05, fit
    served = json.loads((tmp_path / "m" / "phantom_crossmodal_train_stats.json").read_text())
    assert served["training_fit"] == fit
    # from scratch beside it: held to the fit of the model in service; 3 steps from random weights learn too little,
    # so that model stays
    kept = published.read_bytes()
    with caplog.at_level(logging.INFO, logger="crossmodal.serving.train"):
        scratch = train_offline(str(studies), "phantom", str(tmp_path / "m"), epochs=1, device="cpu",
                                pretrained=str(committed), from_scratch=True)
    fit = scratch["training_fit"]
    assert fit["from_scratch"] and not fit["published"] and scratch["start_model"] == str(published), scratch
    assert fit["start"] == pytest.approx(stats["training_fit"]["end"], abs=1e-4) and fit["end"] < fit["start"] - 0.05
    assert published.read_bytes() == kept and scratch["published"] == str(published)
    assert (f"the model fits the 1 labelled case(s) it was trained on at val_mean_dice {fit['end']:.4f}, the model "
            f"in service at {fit['start']:.4f} (train.fit_tolerance 0.05); the model in service stays. A learning "
            "rate too high (this run's: 0.01) or too few epochs to learn them: train again") in caplog.text


def test_a_run_is_held_to_the_model_in_service_at_the_voxel_size_it_records(tmp_path: Path, caplog):
    """Under a null ``data.spacing`` a run from scratch works on its cases' own grids, and the model in service beside
    it was scored there too: trained at 2 mm, on 1 mm phantom cases it scored 0.26, a bar that 40 epochs from scratch
    beat at 0.865 and replaced it (0.895 at its 2 mm). The bar is that model's score on the cases read at the voxel
    size it records, as inference reads them: with labels held out and without (the fit check), from scratch or
    fine-tuning it under a preset whose ``data.spacing`` is another."""
    from crossmodal.data.phantom import make_phantom
    from crossmodal.data.studies import generate

    cfg = load_config("phantom", overrides={"data": {"spacing": None}})
    studies = tmp_path / "s"
    generate(studies, cfg, lambda rng: make_phantom(cfg, rng, size=96, spacing=1.0), cases=3, seed=21, prefix="p",
             dense=3)
    net = build_network(cfg)
    net.load_state_dict(torch.load(APP / "pretrained" / "phantom_crossmodal.pt", weights_only=True))
    record_voxel_mm(net, (2.0, 2.0, 2.0))  # as its training would have recorded it
    model = tmp_path / "m" / "phantom_crossmodal.pt"
    model.parent.mkdir()
    torch.save(net.state_dict(), model)
    kept = model.read_bytes()
    save_config(cfg, tmp_path / "null.yaml")
    held = train_offline(str(studies), str(tmp_path / "null.yaml"), str(tmp_path / "m"), epochs=1, device="cpu",
                         from_scratch=True)
    assert held["start_model"] == str(model) and held["start_metric"] > 0.85, held  # 0.52 on the 1 mm grids
    assert held["published"] == str(model) and model.read_bytes() == kept
    save_config(load_config(str(tmp_path / "null.yaml"), overrides={"train": {"val_fraction": 0.0}}),
                tmp_path / "all.yaml")
    fit = train_offline(str(studies), str(tmp_path / "all.yaml"), str(tmp_path / "m"), epochs=1, device="cpu",
                        from_scratch=True)["training_fit"]
    assert fit["from_scratch"] and fit["start"] > 0.85 and not fit["published"], fit  # 0.42 at 1 mm
    assert model.read_bytes() == kept
    # fine-tuning it under a preset edited to 1 mm since: the run trains (and records) 1 mm, held to that model
    # segmenting at its own 2 mm (it scored 0.52 at 1 mm, the bar before)
    save_config(load_config("phantom", overrides={"data": {"spacing": [1.0, 1.0, 1.0]}}), tmp_path / "one.yaml")
    with caplog.at_level(logging.INFO):
        tuned = train_offline(str(studies), str(tmp_path / "one.yaml"), str(tmp_path / "m"), epochs=1, device="cpu")
    assert tuned["start_model"] == str(model) and tuned["start_metric"] == pytest.approx(held["start_metric"],
                                                                                         abs=1e-4), tuned
    assert f"fine-tuning {model}, trained at 2 x 2 x 2 mm, at the preset's data.spacing 1 x 1 x 1 mm" in caplog.text
    assert weights_voxel_mm(tmp_path / "m" / "train_03" / "model.pt") == (1.0, 1.0, 1.0)


def test_a_non_finite_loss_names_its_parts_or_says_they_were_finite():
    """The divergence error names the loss parts that are not finite; a single process whose parts are all finite
    (their weighted sum overflowed) says so, where it said "on another process"."""
    from crossmodal.serving.train import diverged
    from ignite.engine import Engine

    engine = Engine(lambda e, b: None)
    engine.optimizer = torch.optim.AdamW(torch.nn.Linear(1, 1).parameters(), lr=3.0)  # type: ignore[attr-defined]
    engine.state.epoch, engine.state.iteration = 4, 17
    assert str(diverged(engine, {"supervised": 1.0, "inter": float("inf")})).startswith(
        "training stopped: the loss is not finite (NaN / Inf) at epoch 4, step 17 (inter inf); that step was not "
        "applied")
    assert "at epoch 4, step 17 (its parts finite, their weighted sum overflowed); " in str(
        diverged(engine, {"supervised": 3e38, "inter": 3e38}))


def test_the_latest_model_is_not_written_when_its_weights_are_not_finite(tmp_path: Path):
    from crossmodal.errors import TrainingDiverged
    from ignite.engine import Engine

    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1), torch.nn.InstanceNorm3d(2))
    engine = Engine(lambda e, b: None)
    engine.optimizer = torch.optim.AdamW(net.parameters(), lr=0.5)  # type: ignore[attr-defined]
    engine.state.epoch = 3
    LatestModel(net, str(tmp_path / "model.pt"))(engine)
    kept = (tmp_path / "model.pt").read_bytes()
    with torch.no_grad():
        net[0].weight[0, 0, 0, 0, 0] = float("inf")
    with pytest.raises(TrainingDiverged) as e:
        LatestModel(net, str(tmp_path / "model.pt"))(engine)
    assert str(e.value).startswith("training stopped: after epoch 3 1 weight tensor(s) are not finite (NaN / Inf), "
                                   "first '0.weight'; they were not published and the model in service is "
                                   "the one from before this run. Lower the learning rate (this run's: 0.5;")
    assert (tmp_path / "model.pt").read_bytes() == kept and [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def _finite_here(rank: int, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        loss = torch.tensor(float("nan") if rank == 0 else 1.5)
        Path(f"{out}.{rank}").write_text(str(finite_on_every_rank(loss)))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.timeout(120)
def test_a_loss_that_is_not_finite_on_one_process_stops_every_process(tmp_path: Path):
    assert finite_on_every_rank(torch.tensor(0.25)) and not finite_on_every_rank(torch.tensor(float("inf")))
    torch.multiprocessing.spawn(_finite_here, args=(str(tmp_path / "init"), str(tmp_path / "ok")), nprocs=2)
    # rank 1's own loss is finite: it stops too, instead of waiting for rank 0's gradients
    assert [(tmp_path / f"ok.{r}").read_text() for r in (0, 1)] == ["False", "False"]


class _Recorder(Metric):
    """Records the (pred, label) items the train key metric is given."""

    def __init__(self, seen: list) -> None:
        self.seen = seen
        super().__init__(output_transform=from_engine([Keys.PRED, Keys.LABEL]))

    def reset(self) -> None:
        pass

    def update(self, output) -> None:
        self.seen += list(zip(*output, strict=True))

    def compute(self) -> float:
        return 0.5


def test_train_dice_sees_every_labelled_sample_post_processed(tmp_path, phantom_cfg, monkeypatch):
    """Each step's dense and sparse samples reach the train Dice one-hot and masked, none as raw logits (MONAI
    post-processes zip(decollated batch, output); a {source: batch} dict decollated to fewer items)."""
    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=4, dense=1, sparse=1, seed=36)
    seen: list = []
    monkeypatch.setattr(CrossModalTrain, "train_key_metric",
                        lambda self, context: {self.TRAIN_METRIC_MEAN_DICE: _Recorder(seen)})
    cfg = method_config("phantom", "ours", {"train": {"patch_size": [32, 32, 32], "patches_per_case": 1,
                                                      "batch_size": 2, "val_fraction": 0.0,
                                                      "propagate": {"method": "none"}}})  # scribbles as drawn
    save_config(cfg, tmp_path / "ours.yaml")
    stats = train_offline(str(studies), str(tmp_path / "ours.yaml"), str(tmp_path / "m"), epochs=1, device="cpu",
                          network="crossmodal")
    steps = stats["total_iterations"]
    assert steps == 2 and len(seen) == steps * 2  # 2 unlabelled cases, 1 a step; a dense and a sparse patch each
    for pred, label in seen:
        assert pred.shape == label.shape == (4, 32, 32, 32)
        assert set(torch.unique(pred).tolist()) <= {0.0, 1.0} and set(torch.unique(label).tolist()) <= {0.0, 1.0}
        assert bool((pred.sum(0) <= label.sum(0)).all())  # no prediction counted off the annotated voxels
    assert any(float(label.sum()) < 0.5 * label[0].numel() for _, label in seen)  # the scribbled patch, masked


def test_self_training_rounds_refine_and_supervise_every_unlabelled_case(tmp_path: Path, phantom_cfg, caplog):
    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=4, dense=1, sparse=0, seed=34)
    cfg = method_config("phantom", "ours", {"train": {
        "patch_size": [32, 32, 32], "patches_per_case": 1, "batch_size": 2, "val_fraction": 0.0,
        "consistency": {"copy_paste_start": 1, "refine_pseudo": True, "refine_start": 2, "refine_interval": 2,
                        "refine_max_cases": 2}}})
    save_config(cfg, tmp_path / "ours.yaml")
    with caplog.at_level("INFO", logger="crossmodal.serving.train"):
        stats = train_offline(str(studies), str(tmp_path / "ours.yaml"), str(tmp_path / "m"), epochs=2,
                              device="cpu", network="crossmodal")
    metrics = stats["train"]["metrics"]
    assert stats["current_iteration"] == 6  # 3 unlabelled cases, 1 per step, 2 epochs: rounds after steps 2, 4, 6
    rounds = [r.getMessage() for r in caplog.records if "pseudo-labels of 2 of 3 unlabelled cases" in r.getMessage()]
    assert [m.split(":")[0] for m in rounds] == ["step 2", "step 4", "step 6"]  # 2 cases a round, in turn
    assert metrics["pseudo_refined_cases"] == 2 and 0 < metrics["pseudo_labelled"] <= 1.0
    # the last step's supervised part: the dense case, 2 copy-paste mixes and the pseudo-labelled unlabelled case
    assert metrics["copy_paste_samples"] == 2 and metrics["pseudo_labelled_samples"] == 1
    rounds = PseudoLabelRounds(cfg, [{"image": f"case{i}"} for i in range(3)], {})
    assert [[c["image"] for c in rounds.take()] for _ in range(3)] == [["case0", "case1"], ["case2", "case0"],
                                                                         ["case1", "case2"]]
    with pytest.raises(ConfigError, match="refine_interval"):
        load_config("phantom", overrides={"train": {"consistency": {"refine_interval": 0}}})


def test_atlas_pseudo_labels_supervise_the_unlabelled_cases(tmp_path: Path, phantom_cfg, caplog, monkeypatch):
    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=5, dense=1, sparse=0, seed=34)
    cfg = method_config("phantom", "ours", {"train": {
        "patch_size": [32, 32, 32], "patches_per_case": 1, "batch_size": 2, "val_fraction": 0.0,
        "recompute_above_megavoxels": 0,  # every step recomputes its activations in the backward pass
        "consistency": {"copy_paste": False, "refine_pseudo": False, "atlas_pseudo": True,
                        "pseudo_batch_size": 2}}})
    save_config(cfg, tmp_path / "ours.yaml")
    batches: list[int] = []  # the training forwards' batch sizes
    forward = CrossModalNet.forward

    def recording(self, x, *args, **kwargs):
        if torch.is_grad_enabled():
            batches.append(len(x))
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(CrossModalNet, "forward", recording)
    with caplog.at_level("INFO", logger="crossmodal.serving.train"):
        stats = train_offline(str(studies), str(tmp_path / "ours.yaml"), str(tmp_path / "m"), epochs=1,
                              device="cpu", network="crossmodal")
    # a step: the dense patch, the 2 pseudo-labelled cases' patches and their augmented copies, each case once
    # (until 2026-12-04 the pseudo-labelled cases came a second time as unlabelled: 7)
    assert batches == [5, 5]
    assert "steps of 5 patches (0.2 M voxels) recompute their activations in the backward pass " \
           "(train.recompute_above_megavoxels 0)" in [r.getMessage() for r in caplog.records]
    logs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("atlas pseudo-labels")]
    assert len(logs) == 1
    assert logs[0].startswith("atlas pseudo-labels of 4 of 4 unlabelled cases from 1 atlas (dense cases)")
    assert 50 < float(logs[0].split("(")[-1].split("%")[0]) <= 100  # all but where the atlas image does not reach
    assert stats["total_iterations"] == 2  # pseudo_batch_size: two unlabelled cases a step, each with its label
    assert stats["train"]["metrics"]["pseudo_labelled_samples"] == 2
    caplog.clear()
    with caplog.at_level("INFO", logger="crossmodal.serving.train"):  # the next run fine-tunes the published model
        again = train_offline(str(studies), str(tmp_path / "ours.yaml"), str(tmp_path / "m"), epochs=1,
                              device="cpu", network="crossmodal")
    logs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("atlas pseudo-labels")]
    assert len(logs) == 1 and logs[0].startswith(f"atlas pseudo-labels off: fine-tuning {stats['published']}")
    assert again["train"]["metrics"]["pseudo_labelled_samples"] == 0
    assert again["total_iterations"] == 4  # without pseudo-labels, unlabeled_batch_size: one a step
    assert batches[2:] == [3] * 4  # the dense patch, the unlabelled one and its copy

    dense = [{"image": str(p), "label": str(studies / "labels" / "final" / p.name)}
             for p in sorted(studies.glob("*.nii.gz")) if (studies / "labels" / "final" / p.name).exists()]
    unlabelled = [{"image": str(p)} for p in sorted(studies.glob("*.nii.gz"))
                  if not (studies / "labels" / "final" / p.name).exists()]
    store: dict[str, torch.Tensor] = {}
    capped = load_config("phantom", overrides={"train": {"consistency": {"atlas_max_cases": 1}}})
    atlas_labels(capped, unlabelled, dense, store)
    first = Path(unlabelled[0]["image"]).name[: -len(".nii.gz")]
    assert list(store) == [first] and store[first].shape == (1, 48, 48, 48)  # the first case only
    assert set(torch.unique(store[first]).tolist()) <= {IGNORE_INDEX, 0, 1, 2, 3}
    stores = []  # cases side by side (atlas_workers 2) or one at a time: the same labels, in the same order
    for workers in (1, 2):
        stores.append({})
        caplog.clear()
        with caplog.at_level("INFO", logger="crossmodal.serving.train"):
            atlas_labels(load_config("phantom", overrides={"train": {"consistency": {
                "atlas_max_cases": 2, "atlas_workers": workers}}}), unlabelled, dense, stores[-1])
        assert f"s, {workers} case{'s' * (workers > 1)} x 1 at once (" in caplog.records[-1].getMessage()
    assert list(stores[0]) == list(stores[1]) == [first, Path(unlabelled[1]["image"]).name[: -len(".nii.gz")]]
    assert all(torch.equal(stores[0][c], stores[1][c]) for c in stores[0])
    # data-parallel ranks on one machine share its cores: 4 cores, 2 ranks -> 2 registrations at once each
    monkeypatch.setattr("crossmodal.serving.train.usable_cores", lambda: 4)
    caplog.clear()
    with caplog.at_level("INFO", logger="crossmodal.serving.train"):
        atlas_labels(load_config("phantom", overrides={"train": {"consistency": {"atlas_max_cases": 3}}}),
                     unlabelled, dense, {}, processes=2)
    assert "s, 2 cases x 1 at once (" in caplog.records[-1].getMessage()
    assert [registration_workers(phantom_cfg, n) for n in (1, 2, 3, 8)] == [4, 2, 1, 1]
    assert registration_workers(load_config("phantom", overrides={"train": {"consistency": {"atlas_workers": 3}}}),
                                2) == 3  # set explicitly: per process
    with pytest.raises(ConfigError, match="atlas_min_agreement"):
        load_config("phantom", overrides={"train": {"consistency": {"atlas_min_agreement": 0}}})
    with pytest.raises(ConfigError, match="atlas_workers"):
        load_config("phantom", overrides={"train": {"consistency": {"atlas_workers": -1}}})


def test_stroke_transfer_adds_other_cases_strokes_to_each_sparse_case(tmp_path: Path, phantom_cfg, caplog,
                                                                       monkeypatch):
    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=3, dense=0, sparse=3, seed=37)
    stores: list[dict[str, torch.Tensor] | None] = []  # what the sparse loader's transforms are given
    original = CrossModalTrain.train_pre_transforms

    def spy(self, context, labels=None):
        stores.append(labels)
        return original(self, context, labels=labels)

    monkeypatch.setattr(CrossModalTrain, "train_pre_transforms", spy)
    cfg = method_config("phantom", "ours", {"train": {
        "patch_size": [32, 32, 32], "patches_per_case": 1, "batch_size": 2, "val_fraction": 0.0,
        "propagate": {"method": "none"}, "consistency": {"copy_paste": False, "atlas_sparse": 2}}})
    save_config(cfg, tmp_path / "ours.yaml")
    with caplog.at_level("INFO", logger="crossmodal.serving.train"):
        stats = train_offline(str(studies), str(tmp_path / "ours.yaml"), str(tmp_path / "m"), epochs=1,
                              device="cpu", network="crossmodal")
    logs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stroke transfer")]
    assert len(logs) == 1 and logs[0].startswith("stroke transfer: 3 of 3 sparse cases given the strokes of 2 others")
    assert "at once, 0 of 6 read back (" in logs[0]  # kept for the next run from scratch
    assert len(list((tmp_path / "m" / "registrations").glob("*.npz"))) == 6
    before, after = (float(v.split("%")[0]) for v in logs[0].split("(")[-1].split(" -> "))
    assert 0 < before < after <= 100  # more voxels labelled than were drawn
    given = [st for st in stores if st]
    assert len(given) == 1 and len(given[0]) == 3  # the sparse loader trains on the 3 cases' transferred labels
    caplog.clear()
    with caplog.at_level("INFO", logger="crossmodal.serving.train"):  # the next run fine-tunes: off, as the atlas
        train_offline(str(studies), str(tmp_path / "ours.yaml"), str(tmp_path / "m"), epochs=1, device="cpu",
                      network="crossmodal")
    logs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stroke transfer")]
    assert logs == [f"stroke transfer off: fine-tuning {stats['published']} (train.consistency.atlas_on_finetune)"]
    caplog.clear()
    stores.clear()
    base = method_config("phantom", "baseline_unet", {"train": {  # any network the config gives it to (bench's
        "patch_size": [32, 32, 32], "patches_per_case": 1, "batch_size": 2, "val_fraction": 0.0,  # +transfer)
        "consistency": {"atlas_sparse": 1}}})
    save_config(base, tmp_path / "base.yaml")
    with caplog.at_level("INFO", logger="crossmodal.serving.train"):
        train_offline(str(studies), str(tmp_path / "base.yaml"), str(tmp_path / "b"), epochs=1, device="cpu",
                      network="baseline_unet")
    logs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stroke transfer")]
    assert len(logs) == 1 and logs[0].startswith("stroke transfer: 3 of 3 sparse cases given the strokes of 1 other ")
    assert [len(st) for st in stores if st] == [3]
    sparse = [{"image": str(p), "label": str(studies / "labels" / "final" / p.name), "label_kind": "sparse"}
              for p in sorted(studies.glob("*.nii.gz"))]
    # one registration at a time; then the 3 cases side by side and each case's 2 others too, every registration
    # read back from the first training's cache, as the next run from scratch reads them (side by side registering
    # gives what one at a time gives: tests/test_atlas.py)
    shutil.copytree(tmp_path / "m" / "registrations", tmp_path / "c")
    by_workers = {}
    runs = ((1, None, "1 case x 1 at once ("), (6, "c", "3 cases x 2 at once, 6 of 6 read back ("))
    for i, (workers, cache, at_once) in enumerate(runs):
        by_workers[i] = {}
        caplog.clear()
        with caplog.at_level("INFO", logger="crossmodal.serving.train"):
            stroke_transfer(load_config("phantom", overrides={"train": {"consistency": {
                "atlas_sparse": 2, "atlas_workers": workers}}}), sparse, by_workers[i],
                cache_dir=cache and tmp_path / cache)
        assert f"s, {at_once}" in caplog.records[-1].getMessage()
    cases = [p.name[: -len(".nii.gz")] for p in sorted(studies.glob("*.nii.gz"))]
    assert all(list(by_workers[i]) == cases for i in range(2)) and len(list((tmp_path / "c").glob("*.npz"))) == 6
    assert all(torch.equal(by_workers[0][c], by_workers[1][c]) for c in cases)
    together = by_workers[1]
    drawn = [float((t["label"] != IGNORE_INDEX).float().mean()) for t in map(preprocessing(cfg, "val"), sparse)]
    assert all(float((together[c] != IGNORE_INDEX).float().mean()) > d for c, d in zip(together, drawn, strict=True))
    with pytest.raises(ConfigError, match="atlas_sparse"):
        load_config("phantom", overrides={"train": {"consistency": {"atlas_sparse": -1}}})


def test_stored_labels_replace_only_the_cases_they_hold():
    store = {"a": torch.ones(1, 4, 4, 4)}
    image, own = torch.zeros(2, 4, 4, 4), torch.zeros(1, 4, 4, 4)
    train = PseudoLabeld(store, keep_missing=True)  # the train stage's: stroke transfer
    assert torch.equal(train({"image": image, "label": own, "case_id": "a"})["label"], store["a"])
    assert train({"image": image, "label": own, "case_id": "b"})["label"] is own
    unlabelled = PseudoLabeld(store)({"image": image, "case_id": "b"})["label"]  # nothing yet: all ignored
    assert unlabelled.shape == (1, 4, 4, 4) and bool((unlabelled == IGNORE_INDEX).all())


def test_baseline_trains_on_labels_only(tmp_path: Path, phantom_cfg):
    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=5, dense=1, sparse=1, seed=32)
    stats = train_offline(str(studies), _bench_config(tmp_path, "baseline_unet"), str(tmp_path / "m"), epochs=1,
                          device="cpu", network="baseline_unet")
    assert stats["total_iterations"] == 1  # unlabelled cases are not used by a plain network
    assert "loss_inter" not in stats["train"]["metrics"] and stats["train"]["metrics"]["loss_supervised"] > 0


def test_a_poly_schedule_lowers_the_learning_rate_every_step_to_zero_at_the_runs_end(tmp_path: Path, phantom_cfg):
    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=4, dense=4, sparse=0, seed=33)
    cfg = method_config("phantom", "baseline_unet", {"train": {"patch_size": [32] * 3, "patches_per_case": 1,
                                                               "batch_size": 2, "val_fraction": 0.0,
                                                               "learning_rate": 0.02, "lr_schedule": "poly"}})
    save_config(cfg, tmp_path / "poly.yaml")
    stats = train_offline(str(studies), str(tmp_path / "poly.yaml"), str(tmp_path / "m"), epochs=3, device="cpu",
                          network="baseline_unet")
    assert stats["total_iterations"] == 2 and stats["current_iteration"] == 6  # 4 cases, batch 2: 2 steps an epoch
    curve = json.loads(next((tmp_path / "m").glob("train_*/learning_curve.json")).read_text())
    # the rate an epoch ends with: 0.02 x (1 - steps taken / 6)^0.9, 0 after the last
    assert [r["learning_rate"] for r in curve] == pytest.approx([0.02 * (1 - i / 6) ** 0.9 for i in (2, 4, 6)])
    with pytest.raises(ConfigError, match=r"train.lr_schedule: 'cosine' must be one of constant, poly"):
        load_config("phantom", overrides={"train": {"lr_schedule": "cosine"}})


@pytest.mark.timeout(600)
def test_data_parallel_training_in_two_cpu_processes(tmp_path: Path, phantom_cfg, capfd, whole_machine):
    """Four runs of two processes (each spawned process spends ~7 s importing MONAI): a fine-tuning with no label
    held out, one with a label held out, one from scratch beside the model in service, one with a case that does
    not read."""
    committed = str(APP / "pretrained" / "phantom_crossmodal.pt")
    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=5, dense=2, sparse=0, seed=33)
    preset = load_config(_bench_config(tmp_path, "ours"), overrides={"train": {
        "recompute_above_megavoxels": 0,  # activation checkpointing under DistributedDataParallel
        "consistency": {"atlas_pseudo": True, "atlas_count": 1, "atlas_on_finetune": True}}})
    save_config(preset, tmp_path / "ours.yaml")
    # fine-tuning the committed model with no label held out: both processes score the run's 2 labelled cases
    # before its first step and after its last (the metric reduced across them), and the model is published only if
    # it still fits them
    stats = train_offline(str(studies), str(tmp_path / "ours.yaml"), str(tmp_path / "m"), epochs=1, device="cpu",
                          network="crossmodal", processes=2, pretrained=committed)
    # each process gets half of every source: 3 unlabelled -> partitioned 2 + 2 (even), dense 1 + 1
    assert stats["epoch"] == 1 and stats["total_iterations"] == 2 and stats["rank"] == 0
    fit = stats["training_fit"]
    assert 0 < fit["start"] < 1 and 0 < fit["end"] < 1 and fit["published"] == (fit["end"] >= fit["start"] - 0.05)
    assert stats["published"] == (str(tmp_path / "m" / "phantom_crossmodal.pt") if fit["published"] else committed)
    # and half of this machine's cores for its atlas registrations (its 2 cases side by side only with 4 or more)
    at_once = min(2, max(1, usable_cores() // 2))
    err = capfd.readouterr().err.splitlines()
    logs = [line for line in err if "atlas pseudo-labels of 2 of 2" in line]
    assert len(logs) == 2 and all(f"{at_once} case{'s' * (at_once > 1)} x 1 at once" in line for line in logs), logs
    assert sum("recompute their activations in the backward pass" in line for line in err) == 2  # each process
    # each process computes on its share of the cores (each took all of them: 4 threads on this machine's 2 cores)
    share = f"{max(1, usable_cores() // 2)} compute thread(s): {usable_cores()} usable core(s), 2 processes"
    assert sorted(line.split(") - ")[-1] for line in err if "compute thread(s)" in line) == [f"0 - {share}",
                                                                                           f"1 - {share}"], err
    weights = torch.load(tmp_path / "m" / "train_01" / "model.pt", map_location="cpu")  # the run's, published or not
    net = build_network(load_config(str(tmp_path / "ours.yaml")))
    net.load_state_dict(weights)  # strict: saved unwrapped from DistributedDataParallel
    # fine-tuning it with a dense case held out: both processes validate the starting model (the metric is reduced
    # across them) before the first step
    save_config(load_config(str(tmp_path / "ours.yaml"), overrides={"train": {"val_fraction": 0.5}}),
                tmp_path / "held_out.yaml")
    again = train_offline(str(studies), str(tmp_path / "held_out.yaml"), str(tmp_path / "m2"), epochs=1,
                          device="cpu", network="crossmodal", processes=2, pretrained=committed)
    assert 0 <= again["start_metric"] <= 1 and again["epoch"] == 1
    assert again["published"] == (str(tmp_path / "m2" / "phantom_crossmodal.pt")
                                  if again["best_metric"] > again["start_metric"] else committed)
    # from scratch beside it: both processes validate that model, loaded beside their random weights
    scratch = train_offline(str(studies), str(tmp_path / "held_out.yaml"), str(tmp_path / "m3"), epochs=1,
                            device="cpu", network="crossmodal", processes=2, pretrained=committed,
                            from_scratch=True)
    assert scratch["start_metric"] == pytest.approx(again["start_metric"], abs=1e-6) and scratch["epoch"] == 1
    # a case that does not read in one of the processes: its CaseError in this one, as without processes (it was
    # spawn's ProcessRaisedException, whose text the CLI and the server took for a bug), and no temp file left
    import tempfile

    from crossmodal.errors import CaseError

    shutil.copytree(studies, tmp_path / "broken")
    pet = tmp_path / "broken" / "modalities" / "phantom000" / "pet.nii.gz"
    pet.write_bytes(b"not a volume")
    # (nor the traceback file torch's spawn writes of each process that failed: it never removes them)
    temp = Path(tempfile.gettempdir())
    temps = set(temp.glob("crossmodal-dist-*")) | set(temp.glob("pytorch-errorfile-*"))
    with pytest.raises(CaseError) as e:
        train_offline(str(tmp_path / "broken"), str(tmp_path / "ours.yaml"), str(tmp_path / "m4"), epochs=1,
                      device="cpu", network="crossmodal", processes=2)
    assert str(e.value) == (f"case 'phantom000': file {pet}: cannot be read as NIfTI/NRRD (truncated or corrupt?): "
                            f"File {pet} is not a gzip file")
    assert set(temp.glob("crossmodal-dist-*")) | set(temp.glob("pytorch-errorfile-*")) == temps


def test_early_stop_patience_stops_a_run_whose_held_out_score_stops_improving(tmp_path: Path, phantom_cfg, caplog):
    """The train request's ``early_stop_patience`` (the viewers show it) was read by MONAI Label's ``finalize``, which
    this task replaces: every run trained its max_epochs. At a learning rate of 1e-20 the held-out score never
    improves after the first validation, so patience 2 stops the run after its third epoch of 6."""
    from crossmodal.serving.train import check_train_request

    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=3, dense=2, sparse=0, seed=5)  # 1 validates
    save_config(method_config("phantom", "baseline_unet", {"train": {"learning_rate": 1e-20, "patch_size": [32] * 3,
                                                                     "patches_per_case": 1}}), tmp_path / "still.yaml")

    def run(name: str, patience: int) -> dict:
        return train_offline(str(studies), str(tmp_path / "still.yaml"), str(tmp_path / name), epochs=6, device="cpu",
                             network="baseline_unet", from_scratch=True, early_stop_patience=patience)

    stopped, full = run("stopped", 2), run("full", -1)
    assert (stopped["epoch"], full["epoch"]) == (3, 6)
    assert [r.stopped for r in list_runs(tmp_path / "stopped") + list_runs(tmp_path / "full")] == ["early stop", None]
    curve = json.loads(next((tmp_path / "stopped").glob("train_*/learning_curve.json")).read_text())
    assert [r["epoch"] for r in curve] == [1, 2, 3]
    assert stopped["eval"]["best_metric_epoch"] == 1  # the later ones scored the same, not better
    # without held-out labels there is nothing to stop on: said, and every epoch trains
    save_config(load_config(str(tmp_path / "still.yaml"), overrides={"train": {"val_fraction": 0.0}}),
                tmp_path / "none_held.yaml")
    with caplog.at_level(logging.INFO, logger="crossmodal.serving.train"):
        alone = train_offline(str(studies), str(tmp_path / "none_held.yaml"), str(tmp_path / "alone"), epochs=2,
                              device="cpu", network="baseline_unet", early_stop_patience=1)
    assert alone["epoch"] == 2 and ("early_stop_patience 1: no label is held out, so no validation to stop on: the "
                                    "run trains its max_epochs") in caplog.text
    for bad in ("x", 1.5, -2):
        with pytest.raises(ConfigError) as e:
            check_train_request({"early_stop_patience": bad})
        assert str(e.value) == (f"train request: early_stop_patience={bad!r} must be an integer: validations without "
                                "a better held-out score before the run stops (-1 or 0: never)")
    assert check_train_request({"early_stop_patience": "3"})["early_stop_patience"] == 3
    with pytest.raises(ConfigError, match=r"^train request: tracking='mlfow' must be mlflow or None$"):
        check_train_request({"tracking": "mlfow"})
    assert check_train_request({"tracking": ["None"]})["tracking"] == ["None"]
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"multi_gpu=true trains on GPUs and this server has none; processes=N"):
            check_train_request({"multi_gpu": "true"})
    assert check_train_request({"multi_gpu": "false"})["multi_gpu"] is False


def test_a_fine_tuning_publishes_only_an_epoch_that_beats_the_model_it_started_from(tmp_path: Path, phantom_cfg,
                                                                                   caplog, capsys):
    """Held-out labels and a model to fine-tune: the starting model is validated first (an epoch-0 score); a run
    none of whose epochs beats it publishes nothing and the starting model stays the one to use; a run that beats it
    publishes its best; ``publish=best_of_run`` (train request, ``crossmodal train --publish-mode``) publishes the
    run's best whatever it scores."""
    from conftest import PRETRAINED_PHANTOM
    from crossmodal.serving.train import check_train_request, train_choices

    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=3, dense=2, sparse=0, seed=5)  # 1 validates

    def run(name: str, lr: float, start: str | None, epochs: int, scale: float = 1.0) -> tuple[dict, Path]:
        cfg = method_config("phantom", "baseline_unet", {"train": {"learning_rate": lr, "patch_size": [32, 32, 32],
                                                                   "patches_per_case": 1, "finetune_lr_scale": scale}})
        save_config(cfg, tmp_path / f"{name}.yaml")
        model_dir = tmp_path / name
        stats = train_offline(str(studies), str(tmp_path / f"{name}.yaml"), str(model_dir), epochs=epochs,
                              device="cpu", pretrained=start, network="baseline_unet")
        return stats, model_dir

    # AdamW steps of 1.0 wreck the committed model: nothing is published, the committed model stays
    with caplog.at_level(logging.INFO, logger="crossmodal.serving.train"):
        wrecked, model_dir = run("wrecked", 1.0, str(PRETRAINED_PHANTOM), 1)
    assert (f"no epoch beat the starting model (held-out val_mean_dice {wrecked['start_metric']:.4f}, this run's "
            f"best {wrecked['best_metric']:.4f} at epoch 1): the model in service stays") in caplog.text
    assert wrecked["start_metric"] > 0.8 and wrecked["best_metric"] < wrecked["start_metric"] - 0.3, wrecked
    assert not (model_dir / "phantom_baseline_unet.pt").exists() and wrecked["published"] == str(PRETRAINED_PHANTOM)
    curve = json.loads(next(model_dir.glob("train_*/learning_curve.json")).read_text())
    assert [r["epoch"] for r in curve] == [0, 1] and curve[1]["learning_rate"] == 1.0
    assert curve[0]["val_mean_dice"] == pytest.approx(wrecked["start_metric"], abs=1e-5)
    published_stats = json.loads((model_dir / "phantom_baseline_unet_train_stats.json").read_text())
    assert published_stats["start_metric"] == wrecked["start_metric"]
    # the next run fine-tunes the model in service again, not the wrecked run's best left in its run folder
    again, _ = run("wrecked", 1.0, str(PRETRAINED_PHANTOM), 1)
    assert again["start_metric"] == wrecked["start_metric"] and not (model_dir / "phantom_baseline_unet.pt").exists()
    # a run from scratch (request pretrained false; `crossmodal train --from-scratch`) starts from random weights
    # (at a learning rate of 1e-9 it stays where it started), not from that run folder's best, and has to beat the
    # model in service to replace it
    save_config(method_config("phantom", "baseline_unet", {"train": {"learning_rate": 1e-9, "patch_size": [32] * 3,
                                                                     "patches_per_case": 1}}), tmp_path / "still.yaml")
    with caplog.at_level(logging.INFO, logger="crossmodal.serving.train"):
        scratch = train_offline(str(studies), str(tmp_path / "still.yaml"), str(model_dir), epochs=1, device="cpu",
                                pretrained=str(PRETRAINED_PHANTOM), network="baseline_unet", from_scratch=True)
    assert scratch["start_metric"] == wrecked["start_metric"] and scratch["best_metric"] < 0.5, scratch
    assert f"training from scratch beside {PRETRAINED_PHANTOM}: held-out val_mean_dice of the model in " in caplog.text
    assert "no epoch beat the model in service (held-out val_mean_dice" in caplog.text
    assert scratch["published"] == str(PRETRAINED_PHANTOM) and not (model_dir / "phantom_baseline_unet.pt").exists()
    # a tie keeps the model in service (at a learning rate of 1e-9 the fine-tuned model segments the held-out case
    # as the one it started from): held-out scribbles saturate, and there publishing ties served a worse model
    tie, tie_dir = run("tie", 1e-9, str(PRETRAINED_PHANTOM), 1)
    assert tie["best_metric"] == tie["start_metric"] > 0.8, tie
    assert tie["published"] == str(PRETRAINED_PHANTOM) and not (tie_dir / "phantom_baseline_unet.pt").exists()
    from crossmodal.cli import main

    capsys.readouterr()
    assert main(["train", "--studies", str(studies), "--config", str(tmp_path / "still.yaml"), "--model-dir",
                 str(model_dir), "--epochs", "1", "--device", "cpu", "--pretrained", str(PRETRAINED_PHANTOM),
                 "--network", "baseline_unet", "--from-scratch"]) == 0
    assert re.search(rf"trained from scratch beside {re.escape(str(PRETRAINED_PHANTOM))}: held-out Dice "
                     rf"{wrecked['start_metric']:.4f} before, this run's best 0\.[0-4]\d+: no epoch beat it, so that "
                     "model stays", capsys.readouterr().out)
    # the same runs from the command line: it says so; asked to publish the run's best whatever it scores
    # (`--publish-mode best_of_run`), it does
    capsys.readouterr()
    assert main(["train", "--studies", str(studies), "--config", str(tmp_path / "wrecked.yaml"), "--model-dir",
                 str(tmp_path / "cli"), "--epochs", "1", "--device", "cpu", "--pretrained", str(PRETRAINED_PHANTOM),
                 "--network", "baseline_unet"]) == 0
    assert (f"fine-tuned {PRETRAINED_PHANTOM}: held-out Dice {wrecked['start_metric']:.4f} before, this run's best "
            f"{wrecked['best_metric']:.4f}: no epoch beat it, so that model stays (published: {PRETRAINED_PHANTOM})"
            ) in capsys.readouterr().out
    always = tmp_path / "always"
    assert main(["train", "--studies", str(studies), "--config", str(tmp_path / "wrecked.yaml"), "--model-dir",
                 str(always), "--epochs", "1", "--device", "cpu", "--pretrained", str(PRETRAINED_PHANTOM),
                 "--network", "baseline_unet", "--publish-mode", "best_of_run"]) == 0
    best = torch.load(next(always.glob("train_*/model.pt")), map_location="cpu")
    assert all(torch.equal(v, torch.load(always / "phantom_baseline_unet.pt", map_location="cpu")[k])
               for k, v in best.items())

    # from a network that has learnt nothing (random weights) the first epochs beat it: published
    blank = tmp_path / "blank.pt"
    torch.manual_seed(0)
    torch.save(build_network(load_config("phantom", overrides={"model": {"name": "baseline_unet"}})).state_dict(),
               blank)
    # (at half the learning rate: train.finetune_lr_scale, which the learning curve shows)
    with caplog.at_level(logging.INFO, logger="crossmodal.serving.train"):
        learnt, model_dir = run("learnt", 2e-2, str(blank), 3, scale=0.5)
    assert f"fine-tuning {blank}: learning rate 0.02 x train.finetune_lr_scale 0.5 = 0.01" in caplog.text
    assert learnt["best_metric"] > learnt["start_metric"] + 0.03, learnt
    curve = json.loads(next(model_dir.glob("train_*/learning_curve.json")).read_text())
    assert [r.get("learning_rate") for r in curve] == [None, 0.01, 0.01, 0.01]
    _, scratch = run("scratch", 2e-2, None, 1, scale=0.5)  # a run from scratch: the full rate
    assert [r["learning_rate"] for r in json.loads(next(scratch.glob("train_*/learning_curve.json")).read_text())
            ] == [0.02]
    published = model_dir / "phantom_baseline_unet.pt"
    assert learnt["published"] == str(published) and published.is_file()
    best = torch.load(next(model_dir.glob("train_*/model.pt")), map_location="cpu")
    assert all(torch.equal(v, torch.load(published, map_location="cpu")[k]) for k, v in best.items())

    assert check_train_request({"publish": ["best_of_run", "if_better"]})["publish"] == "best_of_run"
    with pytest.raises(ConfigError, match=r"train request: publish='always' must be one of \['if_better', "
                                          r"'best_of_run'\]"):
        check_train_request({"publish": "always"})
    # missing_modality: per run, the server's policy the default and first of the viewers' list
    pacs = load_config("phantom", overrides={"infer": {"missing_modality": "zero_fill"}})
    assert train_choices(pacs)["missing_modality"] == ("zero_fill", "error")
    assert [check_train_request(r, train_choices(c))["missing_modality"] for c, r in
            ((phantom_cfg, {}), (pacs, {}), (phantom_cfg, {"missing_modality": ["zero_fill", "error"]}))
            ] == ["error", "zero_fill", "zero_fill"]


def test_recompute_turns_on_for_steps_above_its_threshold():
    net, loss_fn = _net(), HybridLoss(SupervisedLoss(), ConsistencyConfig())
    x = torch.zeros(2, 3, 8, 8, 8)  # 2 patches of 512 voxels: 0.001024 M
    assert recompute(net, loss_fn, x, 0.001)
    assert net.checkpointing and loss_fn.checkpointing and loss_fn.supervised.checkpointing
    assert not recompute(net, loss_fn, x, 0.0011)
    assert not (net.checkpointing or loss_fn.checkpointing or loss_fn.supervised.checkpointing)
    assert recompute(net, loss_fn, x, 0) and not recompute(net, loss_fn, x, -1) and not net.checkpointing
    assert load_config("brain").train.recompute_above_megavoxels == 5.0  # 24 patches of 64^3 (6.3 M) recompute
    with pytest.raises(ConfigError, match=r"train.recompute_above_megavoxels: -2 must be >= 0 \(0: every step "
                                          r"recomputes\) or -1 \(none does\)"):
        load_config("brain", overrides={"train": {"recompute_above_megavoxels": -2}})
