import math

import numpy as np
import pytest
import torch
from crossmodal.config import LabelConfig
from crossmodal.labels import (
    DENSE,
    IGNORE_INDEX,
    SPARSE,
    annotated_fraction,
    classify,
    from_training,
    invalid_values,
    seg_nrrd_values,
    slicer_values,
    to_training,
)
from crossmodal.losses import PartialCrossEntropyLoss, PartialDiceCELoss, PartialDiceLoss

CFG = LabelConfig(classes={"background": 0, "organ": 1, "lesion": 2})


def test_small_dense_structure_on_few_slices_stays_dense():
    lab = np.zeros((64, 64, 64), np.int64)
    lab[30:32, 30:32, 40:42] = 2  # 8 voxels on 2 slices
    assert classify(lab, CFG) == DENSE
    assert annotated_fraction(lab, DENSE) == 1.0


def test_marked_background_makes_a_label_sparse_and_override_wins():
    lab = np.zeros((8, 8, 8), np.int64)
    lab[1, 1, 1], lab[5, 5, 5] = 1, 255
    assert classify(lab, CFG) == SPARSE
    assert classify(lab, CFG, override=DENSE) == DENSE
    assert annotated_fraction(lab, SPARSE) == pytest.approx(2 / 512)
    with pytest.raises(ValueError, match="label_kind 'full'"):
        classify(lab, CFG, override="full")


def test_training_maps_and_roundtrip():
    lab = np.array([0, 1, 2, 255])
    assert to_training(lab, SPARSE, CFG).tolist() == [IGNORE_INDEX, 1, 2, 0]
    assert to_training(lab, DENSE, CFG).tolist() == [0, 1, 2, 0]
    assert from_training(to_training(lab, SPARSE, CFG), CFG).tolist() == [0, 1, 2, 255]
    assert invalid_values(np.array([0, 1, 3, 255, 7]), CFG) == [3, 7]


def test_partial_ce_matches_hand_value_and_ignores_unannotated():
    # two voxels: logits favour class 1 by 2 nats on both; only the first is annotated (as class 0)
    logits = torch.tensor([[[0.0, 0.0], [2.0, 2.0]]]).reshape(1, 2, 1, 1, 2)
    target = torch.tensor([[[[0, IGNORE_INDEX]]]]).reshape(1, 1, 1, 1, 2)
    expected = -math.log(math.exp(0) / (math.exp(0) + math.exp(2)))
    assert PartialCrossEntropyLoss()(logits, target).item() == pytest.approx(expected, abs=1e-5)
    none = torch.full_like(target, IGNORE_INDEX)
    assert PartialCrossEntropyLoss()(logits, none).item() == 0.0


def test_partial_dice_hand_value():
    # probabilities 0.5/0.5 at two annotated voxels of class 0 and 1, third voxel ignored
    logits = torch.zeros(1, 2, 1, 1, 3)
    target = torch.tensor([0, 1, IGNORE_INDEX]).reshape(1, 1, 1, 1, 3)
    # per class: inter = 0.5, sum p = 1.0, sum t = 1 -> dice = 2*0.5/2 = 0.5 ; loss = 0.5
    assert PartialDiceLoss()(logits, target).item() == pytest.approx(0.5, abs=1e-4)
    # the ignored voxel does not matter, whatever its logits
    logits2 = logits.clone()
    logits2[..., 2] = torch.tensor([50.0, -50.0]).reshape(1, 2, 1, 1)
    assert PartialDiceLoss()(logits2, target).item() == pytest.approx(0.5, abs=1e-4)


def test_dice_ce_weights_and_gradient_only_on_annotated_voxels():
    logits = torch.randn(1, 3, 2, 2, 2, requires_grad=True)
    target = torch.full((1, 1, 2, 2, 2), IGNORE_INDEX)
    target[0, 0, 0, 0, 0], target[0, 0, 1, 1, 1] = 1, 2
    loss = PartialDiceCELoss(dice_weight=2.0, ce_weight=0.5)(logits, target)
    expected = 2.0 * PartialDiceLoss()(logits, target) + 0.5 * PartialCrossEntropyLoss()(logits, target)
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    grad = logits.grad.abs().sum(1)[0]
    assert grad[0, 0, 0] > 0 and grad[1, 1, 1] > 0
    assert grad[0, 1, 0] == 0 and grad[1, 0, 1] == 0


def test_slicer_segment_numbers_map_to_the_classes_by_name():
    """Slicer numbers exported segments 1, 2, ... in their order; label_info gives their names in that order (its
    idx counts left-out segments: not used), a .seg.nrrd header names each value. Names match whatever their case
    and punctuation; a made-up name (Slicer's Segment_1 for a label map it loaded) keeps a configured value; a
    segment that is no class, and overlapping layers, are errors that name them."""
    info = [{"name": "Lesion", "idx": 2}, {"name": "marked background", "idx": 3}]
    assert slicer_values(info, CFG) == {0: 0, 1: 2, 2: 255}
    assert slicer_values({"label_info": info}, CFG) is None and slicer_values([], CFG) is None  # not Slicer's list
    scribbles = [{"name": "organ", "id": 1}, {"name": "foreground_scribbles", "id": 2},
                 {"name": "background_scribbles", "id": 3}]
    assert slicer_values(scribbles, CFG, scribbled="lesion") == {0: 0, 1: 1, 2: 2, 3: 255}
    with pytest.raises(ValueError, match=r"^segment 'tumour' \(value 2 in the file\) is not a class of this app: "
                                         r"\['organ', 'lesion', 'marked_background'\]; rename"):
        slicer_values([{"name": "organ"}, {"name": "tumour"}], CFG)
    header = {"Segment0_Name": "background", "Segment0_LabelValue": "1", "Segment0_Layer": "0",
              "Segment1_Name": "ORGAN", "Segment1_LabelValue": "2", "Segment1_Layer": "0"}
    assert seg_nrrd_values(header, CFG) == {0: 0, 1: 0, 2: 1}
    made_up = {"Segment0_Name": "Segment_2", "Segment0_LabelValue": "2", "Segment0_NameAutoGenerated": "1"}
    assert seg_nrrd_values(made_up, CFG) == {0: 0, 2: 2}
    with pytest.raises(ValueError, match=r"^segment 'Segment_2' \(value 2 in the file\) is not a class"):
        seg_nrrd_values({**made_up, "Segment0_NameAutoGenerated": "0"}, CFG)  # a name the user gave
    with pytest.raises(ValueError, match=r"^its 2 segments overlap \(they lie on 2 layers\)"):
        seg_nrrd_values({**header, "Segment1_Layer": "1"}, CFG)
    assert seg_nrrd_values({"space": "left-posterior-superior"}, CFG) is None  # a plain NRRD label map
