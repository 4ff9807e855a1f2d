"""Working grid and sliding-window inference helpers."""

from pathlib import Path

import numpy as np
import torch
from conftest import make_phantom_studies
from crossmodal.config import load_config
from crossmodal.inference import NetworkInferer, predict
from crossmodal.io import load_volume
from crossmodal.nets import CrossModalNet, build_network
from crossmodal.transforms import LoadCased, to_primary_grid


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
