"""Shared fixtures: small phantom studies folders and a real MONAI Label server on a free loopback port."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import torch
from crossmodal.config import CrossModalConfig, load_config
from crossmodal.data.brain import extract_templates, load_templates
from crossmodal.data.phantom import Volume, make_phantom
from crossmodal.data.studies import generate
from crossmodal.orthanc import free_port

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "crossmodal"
PRETRAINED_PHANTOM = APP / "pretrained" / "phantom_baseline_unet.pt"
PRETRAINED_BRAIN = APP / "pretrained" / "brain_baseline_unet.pt"
SPM_DIR = REPO / "data" / "spm12"
ALL_CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []  # before a worker's share


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test``: ``-n 2``), each worker process and what it starts (servers, training
    processes) runs on its own share of the cores: without it every worker's torch and SimpleITK took all of them,
    and the oversubscribed threads made two workers no faster than one (930 s against 909 s)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker and count <= len(ALL_CORES):
        _use_cores(ALL_CORES[int(worker.removeprefix("gw")) % count::count])
    # The suite's temp files (the doctests' mkdtemp folders, the temp files a test leaves, a failure's traces) go to
    # a folder of this process's, removed when it ends, and so do those of the processes it starts: each run of the
    # suite left a dozen in the machine's temp folder. (pytest's own tmp_path folders stay where pytest keeps them,
    # its last 3 runs', for a look after a failure.)
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
    temp = tempfile.mkdtemp(prefix="crossmodal-tests-")
    tempfile.tempdir = os.environ["TMPDIR"] = temp
    config.add_cleanup(functools.partial(shutil.rmtree, temp, ignore_errors=True))


def _use_cores(cores: list[int], threads: int | None = None) -> None:
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(threads or len(cores))


@pytest.fixture
def whole_machine():
    """Every core of the machine for this test (a data-parallel run of a process a core), whatever share of them
    its pytest-xdist worker runs on."""
    if not ALL_CORES:
        yield
        return
    share, threads = sorted(os.sched_getaffinity(0)), torch.get_num_threads()
    _use_cores(ALL_CORES)
    try:
        yield
    finally:
        _use_cores(share, threads)


@pytest.fixture(scope="session")
def phantom_cfg() -> CrossModalConfig:
    return load_config("phantom")


@pytest.fixture(scope="session")
def brain_cfg() -> CrossModalConfig:
    return load_config("brain")


def make_phantom_studies(root: Path, cfg: CrossModalConfig, cases: int = 4, dense: int = 1, sparse: int = 1,
                         seed: int = 7, misregistration_mm: float = 0.0) -> Path:
    generate(root, cfg, lambda rng: make_phantom(cfg, rng, size=48, misregistration_mm=misregistration_mm),
             cases, seed, "phantom", dense, sparse)
    return root


@pytest.fixture(scope="session")
def templates(tmp_path_factory) -> dict[str, Volume]:
    """The SPM12 T1 / T2 / PD templates and tissue probability maps (brain cases)."""
    wheel = next(SPM_DIR.glob("*.whl"), None)
    assert wheel is not None, f"the SPM12 wheel is set up by `make test` into {SPM_DIR}"
    out = tmp_path_factory.mktemp("spm")
    extract_templates(wheel, out)
    return load_templates(out)


@pytest.fixture
def phantom_studies(tmp_path: Path, phantom_cfg: CrossModalConfig) -> Path:
    return make_phantom_studies(tmp_path / "studies", phantom_cfg)


@dataclass
class Server:
    url: str
    studies: Path
    model_dir: Path
    log: Path
    proc: subprocess.Popen
    tmp: Path  # the server's TMPDIR (MONAI Label's upload endpoints copy each upload there)


def start_server(studies: Path, model_dir: Path, log: Path, conf: dict[str, str], timeout: float = 180) -> Server:
    """``monailabel start_server`` with our app on 127.0.0.1:<free port>, its temp folder ``<log>.tmp``; waits until
    ``/info/`` answers."""
    port = free_port()
    tmp = log.with_suffix(".tmp")
    tmp.mkdir(exist_ok=True)
    cmd = [str(Path(sys.executable).parent / "monailabel"), "start_server", "--app", str(APP), "--studies",
           str(studies), "-i", "127.0.0.1", "-p", str(port), "--conf", "model_dir", str(model_dir)]
    for k, v in conf.items():
        cmd += ["--conf", k, v]
    venv_bin = str(Path(sys.executable).parent)  # the `monailabel` launcher runs `$MONAILABEL_PYEXE -m monailabel.main`
    env = {**os.environ, "MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "MONAILABEL_PYEXE": sys.executable,
           "TMPDIR": str(tmp), "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/info/", timeout=2).status_code == 200:
                return Server(url, studies, model_dir, log, proc, tmp)
        except requests.RequestException:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError(f"server did not answer within {timeout}s:\n{log.read_text()[-3000:]}")


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.proc.kill()


@pytest.fixture(scope="module")
def phantom_server(tmp_path_factory: pytest.TempPathFactory):
    """A server on 6 phantom cases (2 dense labels, 1 sparse, 3 unlabeled) with the committed phantom weights; no
    ``--conf preset``: the cases' CT + PET + MR pick the phantom preset."""
    cfg = load_config("phantom")
    root = tmp_path_factory.mktemp("e2e")
    studies = make_phantom_studies(root / "studies", cfg, cases=6, dense=2, sparse=1, seed=11)
    server = start_server(studies, root / "model", root / "server.log",
                          {"pretrained_baseline_unet": str(PRETRAINED_PHANTOM), "max_epochs": "2"})
    yield server
    stop_server(server)


def snapshot(studies: Path) -> dict[str, bytes]:
    """Every file under the studies folder (datastore JSON, images, labels) with its bytes."""
    return {str(p.relative_to(studies)): p.read_bytes() for p in sorted(studies.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def crop_slab(path: Path, keep: float) -> None:
    """Keep the last ``keep`` share of a NIfTI volume's slices (axis 2), in place, where they were in space: a
    modality whose field of view covers part of its case's (an MR slab on a longer CT)."""
    img = nib.load(path)
    a = np.asarray(img.dataobj)
    k = int(round(a.shape[2] * (1 - keep)))
    affine = img.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ [0, 0, k]
    nib.save(nib.Nifti1Image(a[:, :, k:], affine), path)


def dice(a: np.ndarray, b: np.ndarray, value: int) -> float:
    x, y = a == value, b == value
    return float(2 * (x & y).sum() / max(x.sum() + y.sum(), 1))


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
