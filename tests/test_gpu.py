"""The CUDA path: the same request on a GPU gives what it gives on the CPU (skipped where no GPU is visible).

Written after the first run on a GPU machine (2026-12-04): an infer request failed there in the label resampling
(index tensors made on the CPU) and scoring in its descriptor (``.numpy()`` of a CUDA tensor); a GPU named as /info
lists it was not a device. CI has no GPU; run these where one is (docs/gpu.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import APP, make_phantom_studies
from crossmodal.active import score_image, scoring_input
from crossmodal.config import load_config
from crossmodal.io import load_volume
from crossmodal.nets import build_network
from crossmodal.resample import resample_argmax, separable_resample
from crossmodal.serving.activelearning import SCORES_KEY
from crossmodal.serving.app import AppParts
from crossmodal.serving.offline import infer_request, train_offline
from crossmodal.transforms import preprocessing
from monailabel.utils.others.generic import device_list

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CFG = load_config("phantom")
WEIGHTS = APP / "pretrained" / "phantom_crossmodal.pt"


def test_resampling_on_the_gpu_equals_the_cpu():
    """Label and probability resampling (working grid -> primary grid) where the logits lie, the same values."""
    g = torch.Generator().manual_seed(0)
    logits = torch.nn.functional.avg_pool3d(torch.randn(4, 20, 18, 12, generator=g)[None], 3, 1, 1)[0]
    shape, scale, offset = (37, 41, 23), (0.52, 0.43, 0.5), (-0.2, 0.1, 0.0)
    cpu = resample_argmax(logits, shape, scale, offset)
    gpu = resample_argmax(logits.cuda(), shape, scale, offset)
    assert gpu.device.type == "cuda" and gpu.shape == cpu.shape == shape
    assert torch.equal(gpu.cpu(), cpu)
    torch.testing.assert_close(separable_resample(logits.cuda(), shape, scale, offset).cpu(),
                               separable_resample(logits, shape, scale, offset), rtol=1e-5, atol=1e-5)


@pytest.fixture
def parts_and_store(tmp_path: Path):
    studies = make_phantom_studies(tmp_path / "studies", CFG, cases=4, dense=1, sparse=1, seed=21)
    parts = AppParts.from_conf(str(APP), {"preset": "phantom", "model_dir": str(tmp_path / "model")})
    return parts, parts.datastore(str(studies)), studies


@pytest.mark.parametrize("prediction", ["fused", "ct", "uncertainty"])
def test_an_infer_request_on_the_gpu_segments_as_on_the_cpu(parts_and_store, prediction: str):
    """The infer task (committed phantom model) on ``cuda`` and on ``cpu``: the map comes back on the CPU, and the
    two agree but for a few boundary voxels (cuDNN's convolutions round otherwise)."""
    parts, _, studies = parts_and_store
    task = parts.infer()
    maps = {}
    for device in ("cpu", "cuda"):
        request = {**infer_request(studies / "phantom003.nii.gz", device), "prediction": prediction, "mc_samples": 1}
        _, data = task(request)
        assert data["pred"].device.type == "cpu" and data["pred"].dtype == torch.uint8
        maps[device] = data["pred"].numpy()
    assert maps["cuda"].shape == maps["cpu"].shape == (48, 48, 48)
    if prediction == "uncertainty":  # a 0-100 map of Monte-Carlo dropout samples: random where it is not 0, so the
        # maps agree on average only (two CPU runs of one sample: mean difference 0.05-0.13 points, up to 29)
        assert maps["cpu"].max() > 10 and np.abs(maps["cuda"].astype(int) - maps["cpu"].astype(int)).mean() < 0.5
    else:
        assert len(np.unique(maps["cpu"])) > 1
        assert (maps["cuda"] == maps["cpu"]).mean() > 0.999


def test_an_infer_request_on_the_gpu_writes_its_label_file(parts_and_store):
    """Through the writer (a NIfTI file, as the server returns it): the label map the CPU writes; the GPU asked for
    by the name /info lists it under (what a viewer's device option sends), as MONAI Label's own tasks take it."""
    parts, store, studies = parts_and_store
    task = parts.infer()
    name = device_list()[0]
    assert name not in ("cpu", "cuda")  # e.g. 'NVIDIA H200'
    files = {}
    for device in ("cpu", "cuda", name):
        path, result = task({"image": str(studies / "phantom002.nii.gz"), "device": device})
        files[device] = np.rint(load_volume(path, "phantom002")[0].numpy())
        assert result["case"] == "phantom002"
    assert (files["cuda"] == files["cpu"]).mean() > 0.999 and files["cuda"].max() > 0
    assert np.array_equal(files[name], files["cuda"])
    assert parts.scoring(parts.infer())({"device": [name]}, store)["scored"] == 2


def test_scoring_on_the_gpu_scores_as_on_the_cpu(parts_and_store):
    """The scores of one case from one forward on each device, then the app's scoring of the pool on the GPU
    (scores stored for every unlabelled case) and MONAI Label's Epistemic on the GPU."""
    parts, store, studies = parts_and_store
    net = build_network(CFG)
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=False)
    net.load_state_dict(state.get("model", state) if isinstance(state, dict) and "model" in state else state)
    net.eval()
    img = preprocessing(CFG, "infer")({"image": str(studies / "phantom003.nii.gz")})["image"].as_tensor()
    x = scoring_input(img, CFG.active.scoring_scale, 8)
    cpu = score_image(net, x, mc_samples=0)
    gpu = score_image(net.cuda(), x.cuda(), mc_samples=0)
    assert abs(gpu.disagreement - cpu.disagreement) < 1e-3 and abs(gpu.entropy - cpu.entropy) < 1e-3
    np.testing.assert_allclose(gpu.descriptor, cpu.descriptor, atol=1e-4)
    out = parts.scoring(parts.infer())({"device": "cuda"}, store)
    assert out["scored"] == len(store.get_unlabeled_images()) == 2 and not out["failed"]
    for case in store.get_unlabeled_images():
        assert 0.0 < store.get_image_info(case)[SCORES_KEY]["entropy"] < 1.0
    epistemic, _ = parts.epistemic()
    case = store.get_unlabeled_images()[0]
    epistemic.run_scoring(case, 5, 0.0, store)
    assert store.get_image_info(case)["epistemic_entropy"] > 0.0


def test_training_on_the_gpu_from_every_source_publishes_a_model_the_cpu_serves(tmp_path: Path):
    """Dense, sparse and unlabelled cases, held-out validation, on ``cuda``: a model is published, and it loads and
    segments on the CPU."""
    studies = make_phantom_studies(tmp_path / "studies", CFG, cases=6, dense=2, sparse=2, seed=5)
    stats = train_offline(str(studies), "phantom", str(tmp_path / "model"), epochs=2, device="cuda")
    assert stats["total_epochs"] == 2 and Path(stats["published"]).is_file()
    parts = AppParts.from_conf(str(tmp_path / "app"), {"preset": "phantom", "pretrained": stats["published"]})
    _, data = parts.infer()(infer_request(studies / "phantom005.nii.gz", "cpu"))
    assert data["pred"].shape == (48, 48, 48) and data["pred"].max() > 0
