"""Write cases into a MONAI Label studies folder (layout in :mod:`crossmodal.io`).

Every generated case also gets its dense truth in ``<studies>/truth/<case>.nii.gz`` (ignored by the
datastore; used by tests, benchmarks and the annotation simulator).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from crossmodal.config import CrossModalConfig
from crossmodal.data.phantom import SyntheticCase
from crossmodal.data.sparse import annotated_fraction, sparsify
from crossmodal.io import IMAGE_EXTENSIONS, CaseError, case_id_of, save_volume, split_ext, unread_volumes

TRUTH_DIR = "truth"
FINAL_LABELS = os.path.join("labels", "final")


def files_by_case(folder: Path, what: str) -> dict[str, Path]:
    """``{case_id: file}`` of the NIfTI / NRRD files in ``folder`` (sorted; empty when there is no such folder).

    Raises:
        CaseError: two files for one case (``a.nii.gz`` and ``a.nrrd``), ``what`` names them.
    """
    found: dict[str, Path] = {}
    unread_volumes(folder)
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        if p.is_file() and split_ext(p)[1] in IMAGE_EXTENSIONS:
            cid = case_id_of(p)
            if cid in found:
                raise CaseError(cid, p, f"a second {what} beside {found[cid].name}; keep one")
            found[cid] = p
    return dict(sorted(found.items()))


def truth_files(studies: str | os.PathLike[str]) -> dict[str, Path]:
    """``{case_id: file}`` of ``<studies>/truth`` (NIfTI or NRRD, as labels; sorted by case id); empty when
    there is no such folder.

    Raises:
        CaseError: two truth files for one case.
    """
    return files_by_case(Path(studies) / TRUTH_DIR, "truth file")


def primary_images(studies: str | os.PathLike[str]) -> dict[str, Path]:
    """``{case_id: primary image}`` of a studies folder (its top-level NIfTI / NRRD files; sorted by case id).

    Raises:
        CaseError: two primary images for one case.
    """
    return files_by_case(Path(studies), "primary image")


def check_new_cases(studies: str | os.PathLike[str], case_ids: Sequence[str], option: str = "--out",
                    instead: str = "give a new folder (or another --prefix)", sidecar_dir: str = "modalities") -> None:
    """Refuse to write ``case_ids`` into a studies folder that already holds one of them (its primary image, final
    label, truth or ``sidecar_dir`` folder: a half-written case too): generating or importing there replaced the
    case's images and its labels, an annotator's too. ``instead``: what the message tells the user to do.

    Raises:
        ValueError: naming the folder and the cases it holds.
    """
    root = Path(studies)
    if not root.is_dir():
        return
    held = (set(primary_images(root)) | set(files_by_case(root / FINAL_LABELS, "final label")) | set(truth_files(root))
            | {p.name for p in (root / sidecar_dir).glob("*/") if p.is_dir()})
    clash = [c for c in case_ids if c in held]
    if clash:
        named = ", ".join(clash[:5]) + (f" and {len(clash) - 5} more" if len(clash) > 5 else "")
        raise ValueError(f"{option} {root}: already holds {named}: writing would replace their images and labels "
                         f"(an annotator's too); {instead}, or remove it first")


def write_case(studies: str | os.PathLike[str], case_id: str, case: SyntheticCase, cfg: CrossModalConfig,
               ext: str = ".nii.gz") -> dict[str, Path]:
    """Write the primary image, the sidecar modalities and the truth of one case; returns the paths."""
    root = Path(studies)
    paths = {}
    for i, name in enumerate(cfg.modality_names):
        vol = case.images[name]
        p = root / f"{case_id}{ext}" if i == 0 else root / cfg.data.sidecar_dir / case_id / f"{name}{ext}"
        save_volume(p, vol.array, vol.affine)
        paths[name] = p
    paths["truth"] = root / TRUTH_DIR / f"{case_id}.nii.gz"
    save_volume(paths["truth"], case.label.array.astype(np.uint8), case.label.affine)
    return paths


def generate(studies: str | os.PathLike[str], cfg: CrossModalConfig, make: Callable[[np.random.Generator], SyntheticCase],
             cases: int, seed: int, prefix: str, dense: int = 0, sparse: int = 0, sparse_mode: str = "scribbles",
             ext: str = ".nii.gz") -> list[dict[str, object]]:
    """Generate ``cases`` cases; the first ``dense`` get a dense final label, the next ``sparse`` a sparse one.

    Returns one record per case: ``case``, ``label`` (``dense`` / ``sparse`` / None), ``annotated_fraction``,
    ``variant`` (the case's :attr:`SyntheticCase.variant`).
    """
    if dense + sparse > cases:
        raise ValueError(f"dense ({dense}) + sparse ({sparse}) labels exceed the number of cases ({cases})")
    records: list[dict[str, object]] = []
    for i in tqdm(range(cases), desc=f"{prefix} cases", unit="case"):
        rng = np.random.default_rng([seed, i])
        case_id = f"{prefix}{i:03d}"
        case = make(rng)
        write_case(studies, case_id, case, cfg, ext)
        kind, frac = None, 0.0
        if i < dense:
            save_volume(Path(studies) / FINAL_LABELS / f"{case_id}.nii.gz", case.label.array, case.label.affine)
            kind, frac = "dense", 1.0
        elif i < dense + sparse:
            sp = sparsify(case.label.array, cfg.labels, sparse_mode, rng)
            save_volume(Path(studies) / FINAL_LABELS / f"{case_id}.nii.gz", sp, case.label.affine)
            kind, frac = "sparse", annotated_fraction(sp)
        records.append({"case": case_id, "label": kind, "annotated_fraction": round(frac, 5),
                        "variant": case.variant})
    return records


def folder_modalities(studies: Path, sidecar_dir: str) -> set[str]:
    """Lower-case names of the secondary modality files under ``<studies>/<sidecar_dir>/<case>/``."""
    side = studies / sidecar_dir
    return {split_ext(f)[0].lower() for case in (sorted(side.iterdir()) if side.is_dir() else []) if case.is_dir()
            for f in case.iterdir() if f.is_file() and split_ext(f)[1] in IMAGE_EXTENSIONS}


def modalities(cfg: CrossModalConfig) -> str:
    """A preset's modalities as the messages name them: the primary, then the secondaries (``t1 + t2, pd``)."""
    return f"{cfg.modality_names[0]} + {', '.join(cfg.modality_names[1:])}" if len(cfg.modality_names) > 1 else \
        cfg.modality_names[0]


def candidate_presets(base: Path) -> tuple[dict[str, CrossModalConfig], dict[str, str | None]]:
    """The presets of ``base`` that name modalities (``base.yaml`` names none) and load, by name; and what each
    ``extends`` (a preset that extends another is no different choice where both fit)."""
    import yaml

    from crossmodal.config import load_config

    presets: dict[str, CrossModalConfig] = {}
    extends: dict[str, str | None] = {}
    for p in sorted(base.glob("*.yaml")):
        raw = yaml.safe_load(p.read_text()) or {}
        if not raw.get("modalities") and not raw.get("extends"):
            continue  # base: no modalities of its own
        try:
            presets[p.stem] = load_config(p.stem, base)
        except Exception:  # a broken user YAML beside the shipped ones: not a candidate
            continue
        extends[p.stem] = raw.get("extends")
    return presets, extends


def guess_preset(studies: str | os.PathLike[str], default: str,
                 configs_dir: str | os.PathLike[str] | None = None) -> tuple[str, str | None]:
    """The preset for a folder given without one: ``default`` where it fits the folder's modalities (or the folder
    says nothing about them: no secondary modality files, no ``dataset.json``), else the one preset in
    ``configs_dir`` that names them (an nnU-Net dataset: its ``channel_names``, in any order; a studies folder: the
    files under ``<sidecar_dir>/<case>/``). Returns (preset, a line saying why, or None where it is ``default``).

    Raises:
        ConfigError: no preset names the folder's modalities, or several do (presets that extend another match
            are not counted apart from it), with what was found and each preset's modalities.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "modalities" / "case000").mkdir(parents=True)
        >>> for name in ("pet.nii.gz", "mr.nii.gz"):
        ...     _ = (root / "modalities" / "case000" / name).write_bytes(b"")
        >>> guess_preset(root, "brain")[0]
        'phantom'
        >>> guess_preset(Path(tempfile.mkdtemp()), "brain")  # nothing to go by: the default
        ('brain', None)
    """
    import json

    from crossmodal.config import ConfigError, default_configs_dir

    root, base = Path(studies), Path(configs_dir) if configs_dir else default_configs_dir()
    presets, extends = candidate_presets(base)
    meta = root / "dataset.json"
    if meta.is_file():
        try:
            read = json.loads(meta.read_text())
            key = "channel_names" if "channel_names" in read else "modality"  # nnU-Net v2; the Decathlon, v1
            names = [str(read[key][k]).lower() for k in sorted(read[key], key=int)]
        except (ValueError, KeyError, TypeError, AttributeError):
            return default, None  # reading the dataset says what is wrong with its dataset.json
        found, where = ", ".join(names), f"{meta}'s {key}"
        which = f"whose modalities are {where}"
        fits = {n for n, c in presets.items() if sorted(m.lower() for m in c.modality_names) == sorted(names)}
    else:
        seen = {n: folder_modalities(root, c.data.sidecar_dir) for n, c in presets.items()}
        if not any(seen.values()):
            return default, None
        found = ", ".join(sorted(set().union(*seen.values())))
        where = f"the modality files under {root}"
        which = f"whose secondary modalities are those of the cases under {root}"
        fits = {n for n, c in presets.items()
                if seen[n] and seen[n] <= {m.lower() for m in c.modality_names[1:]}}
    if default in fits:
        return default, None
    roots = sorted(n for n in fits if extends.get(n) not in fits)
    shipped = "; ".join(f"{n}: {modalities(c)}" for n, c in presets.items())
    if len(roots) == 1:
        return roots[0], (f"--config not given: preset {roots[0]!r} ({modalities(presets[roots[0]])}), the one {which}"
                          f" (the default, {default!r}, takes "
                          f"{modalities(presets[default]) if default in presets else 'others'})")
    if roots:
        raise ConfigError(f"{where} ({found}) fit the presets {roots}; say which with --config")
    raise ConfigError(f"{where} ({found}) are not the modalities of any preset in {base} ({shipped}); write a "
                      f"preset naming them (see the README, On your own data) and pass it with --config")


def first_dicom_file(folder: str | os.PathLike[str], look_at: int = 200) -> Path | None:
    """A DICOM file (``DICM`` at byte 128, whatever its name: a CD's ``IM000001`` too) among the first ``look_at``
    files under ``folder``, or None."""
    seen = 0
    for top, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(top) / name
            try:
                with open(path, "rb") as f:
                    f.seek(128)
                    if f.read(4) == b"DICM":
                        return path
            except OSError:
                pass
            seen += 1
            if seen >= look_at:
                return None
    return None


def check_not_dicom(studies: str | os.PathLike[str], option: str = "--studies") -> None:
    """Refuse a folder of DICOM files given as a studies folder: it holds no NIfTI / NRRD case, so a server on it
    listed none and the commands found no case, without a word about why.

    Raises:
        ValueError: naming a DICOM file found and the import command to run.
    """
    root = Path(studies)
    if not root.is_dir() or primary_images(root) or (root / "dataset.json").is_file():
        return
    found = first_dicom_file(root)
    if found is not None:
        raise ValueError(f"{option} {root}: holds DICOM files ({found.relative_to(root)}, ...) and no NIfTI / NRRD "
                         f"case: import them first (`crossmodal data from-dicom --dicom {root} --out <studies>`) and "
                         "use <studies>, or serve them from a DICOMweb server (--studies http://.../dicom-web)")
