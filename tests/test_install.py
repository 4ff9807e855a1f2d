"""The installed environment: the stack breakages of FIELD_NOTES are dealt with by the project's own files."""

import subprocess
import sys

import pytest


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_monailabel_app_imports():
    r = run("import monailabel.app, pydicom, pydicom_seg; print(pydicom.__version__)")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1].startswith("2.")  # pydicom < 3 keeps pydicom_seg working


def test_torchvision_is_absent_and_nothing_of_ours_needs_it():
    r = run("import torchvision")
    assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr  # removed by `make install`
    r = run(
        "import sys, runpy; sys.path.insert(0, 'apps/crossmodal'); import main, crossmodal.cli, "
        "crossmodal.serving.offline; print('torchvision' in sys.modules)"
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("pkg, version", [("torch", "2.13.0"), ("monailabel", "0.8.5"), ("monai", "1.5.2")])
def test_pinned_versions(pkg, version):
    from importlib.metadata import version as v

    assert v(pkg).split("+")[0] == version


def test_dcmqi_converter_is_on_path():
    import shutil
    from pathlib import Path

    assert shutil.which("itkimage2segimage", path=str(Path(sys.executable).parent)) is not None
