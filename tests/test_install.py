"""The installed environment: the stack breakages of FIELD_NOTES are dealt with by the project's own files."""

import subprocess
import sys

import pytest


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_the_app_imports_without_torchvision():
    """MONAI Label's app with pydicom < 3 (pydicom_seg needs it), and ours, import with torchvision removed."""
    r = run("import torchvision")
    assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr  # removed by `make install`
    r = run(
        "import sys; sys.path.insert(0, 'apps/crossmodal'); import monailabel.app, pydicom, pydicom_seg, main, "
        "crossmodal.cli, crossmodal.serving.offline; print(pydicom.__version__, 'torchvision' in sys.modules)"
    )
    assert r.returncode == 0, r.stderr[-2000:]
    version, torchvision = r.stdout.strip().splitlines()[-1].split()
    assert version.startswith("2.") and torchvision == "False"  # pydicom < 3 keeps pydicom_seg working


@pytest.mark.parametrize("pkg, version", [("torch", "2.13.0"), ("monailabel", "0.8.5"), ("monai", "1.5.2")])
def test_pinned_versions(pkg, version):
    from importlib.metadata import version as v

    assert v(pkg).split("+")[0] == version


def test_dcmqi_converter_is_on_path():
    import shutil
    from pathlib import Path

    assert shutil.which("itkimage2segimage", path=str(Path(sys.executable).parent)) is not None
