"""The nnU-Net v2 raw layout, to and from our studies layout.

nnU-Net: ``imagesTr/<case>_<XXXX>.nii.gz`` (channel XXXX, all channels on one grid), ``labelsTr/<case>.nii.gz``,
``imagesTs`` / ``labelsTs``, ``dataset.json`` with ``channel_names``, ``labels`` and an optional ``ignore``
label (the highest value) marking unannotated voxels of sparse labels. A training case without a label file
is unlabeled. Ours: see :mod:`crossmodal.io`; held-out truth of test cases goes to ``<studies>/truth/``.

Read too: the Medical Segmentation Decathlon's layout (``imagesTr/<case>.nii.gz``, every modality a channel of one
4D file) and nnU-Net v1's (its ``_XXXX`` channel files), whose ``dataset.json`` names the channels ``modality`` and
the classes ``labels`` as ``{"1": "edema"}``.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from monai.data import MetaTensor
from tqdm import tqdm

from crossmodal.config import CrossModalConfig, atomic_write_text
from crossmodal.data.studies import FINAL_LABELS, TRUTH_DIR, primary_images, truth_files
from crossmodal.io import (
    CaseError,
    case_id_of,
    find_case,
    load_volume,
    read_label,
    resample_to,
    save_volume,
    staging_folder,
)
from crossmodal.labels import DENSE, IGNORE_INDEX, SPARSE, classify, from_training, name_key, to_training

# the ``file_ending`` values of dataset.json whose 3D volumes MONAI's readers open (nnU-Net also knows 2D .png / .tif)
FILE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha")


@dataclass
class NnunetCase:
    """One case of an nnU-Net dataset: channel files by modality name, optional label, train or test split."""

    case_id: str
    channels: dict[str, str]
    label: str | None
    split: str
    index: dict[str, int] | None = None  # {modality: its channel in a 4D file (a Decathlon case)}; None: channel 0


def msd_meta(path: Path, meta: dict) -> dict:
    """A Decathlon / nnU-Net v1 ``dataset.json`` (``modality`` {"0": "T2"}, ``labels`` {"0": "background"}) in
    nnU-Net v2's terms (``channel_names``, ``labels`` {name: value}), ``"layout": "msd"`` added.

        >>> meta = msd_meta(Path("dataset.json"), {"modality": {"0": "T2", "1": "ADC"},
        ...                                        "labels": {"0": "background", "1": "PZ"}})
        >>> meta["channel_names"], meta["labels"]
        ({'0': 'T2', '1': 'ADC'}, {'background': 0, 'PZ': 1})
    """
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels or not all(str(k).isdigit() for k in labels):
        raise ValueError(f"{path}: a Decathlon / nnU-Net v1 dataset.json (it has 'modality'): labels must map label "
                         f"values to class names ({{\"0\": \"background\", \"1\": ...}}), got "
                         f"{json.dumps(labels)[:80]}")
    return {"channel_names": meta["modality"], "labels": {str(n): int(v) for v, n in labels.items()},
            "file_ending": ".nii.gz", "layout": "msd"}


def read_dataset_json(dataset: str | os.PathLike[str]) -> dict:
    path = Path(dataset) / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not an nnU-Net v2 raw dataset folder")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: a JSON object with channel_names and labels expected, got {type(meta).__name__}")
    if "channel_names" not in meta and isinstance(meta.get("modality"), dict):  # the Decathlon's / nnU-Net v1's
        meta = msd_meta(path, meta)
    for key in ("channel_names", "labels"):
        if key not in meta:
            raise ValueError(f"{path}: key {key!r} is missing")
        if not isinstance(meta[key], dict) or not meta[key]:
            raise ValueError(f"{path}: {key} must be a non-empty object ({{name: value}} / {{\"0\": name}}), got "
                             f"{json.dumps(meta[key])[:80]}")
    if not all(str(k).isdigit() for k in meta["channel_names"]):
        raise ValueError(f"{path}: channel_names keys must be channel numbers (\"0\", \"1\", ...), got "
                         f"{list(meta['channel_names'])}")
    return meta


def class_map(dataset: str | os.PathLike[str], meta: dict, cfg: CrossModalConfig) -> dict[int, int]:
    """{the dataset's label value: the config's} for each class of ``dataset.json``'s ``labels`` (``ignore`` aside),
    matched by name (case, spaces and punctuation aside, as a DICOM SEG's segments): a dataset whose values differ from the preset's (organ 2, lesion 1 for the phantom's
    organ 1, lesion 2) is imported in the preset's.

    Raises:
        ValueError: a class the config does not have (its labels would train as another class), or a region
            (a list of values: nnU-Net's region-based training), naming ``dataset.json``.

    Example:
        >>> from crossmodal.config import load_config
        >>> class_map(".", {"labels": {"background": 0, "Lesion": 1, "organ": 2, "ignore": 4}}, load_config("phantom"))
        {0: 0, 1: 2, 2: 1}
        >>> class_map(".", {"labels": {"background": 0, "Grey Matter": 1}}, load_config("brain"))
        {0: 0, 1: 1}
    """
    path = Path(dataset) / "dataset.json"
    ours = {name_key(n): v for n, v in cfg.labels.classes.items()}
    labels = {str(n): v for n, v in meta["labels"].items() if n != "ignore"}
    regions = sorted(n for n, v in labels.items() if not isinstance(v, int) or isinstance(v, bool))
    if regions:
        raise ValueError(f"{path}: labels {regions} are regions (lists of values) or not integers; import takes one "
                         f"value a class (nnU-Net's region-based labels are not supported)")
    unknown = sorted(n for n in labels if name_key(n) not in ours)
    if unknown:
        raise ValueError(f"{path}: labels {unknown} are not classes of the config ({cfg.labels.classes}); their "
                         f"voxels would train as other classes: use a config whose labels.classes name them")
    return {v: ours[name_key(n)] for n, v in labels.items()}


def file_ending(dataset: str | os.PathLike[str], meta: dict) -> str:
    """The dataset's ``file_ending`` (default ``.nii.gz``); ValueError naming it when our readers do not take it."""
    ending = meta.get("file_ending", ".nii.gz")
    if ending not in FILE_ENDINGS:
        raise ValueError(f"{Path(dataset) / 'dataset.json'}: file_ending {ending!r} is not one of {list(FILE_ENDINGS)}"
                         " (3D volumes); convert the images, e.g. with SimpleITK, to one of them")
    return ending


def list_cases(dataset: str | os.PathLike[str], cfg: CrossModalConfig) -> list[NnunetCase]:
    """All cases of an nnU-Net dataset (files ending in its ``file_ending``); the channel names in ``dataset.json``
    must be ``cfg``'s modalities (any case, in any order: each channel goes to the modality it names, the config's
    first being the primary).

    Raises:
        ValueError: other channel names, an unreadable ``file_ending``, or no case at all.
        CaseError: a case lacks a channel file or has one beyond the channels named.
    """
    root = Path(dataset)
    meta = read_dataset_json(root)
    ending = file_ending(root, meta)
    channel = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})" + re.escape(ending) + "$")
    names = [str(meta["channel_names"][k]).lower() for k in sorted(meta["channel_names"], key=int)]
    ours = {n.lower(): n for n in cfg.modality_names}
    if sorted(names) != sorted(ours):  # CT, MR, PET for a CT, PET, MR preset: each channel names its modality
        raise ValueError(f"{root / 'dataset.json'}: channel_names {names} differ from the config's modalities "
                         f"{cfg.modality_names}; use a config that names the same modalities")
    by_channel = [ours[n] for n in names]
    class_map(root, meta, cfg)  # before any case is read
    cases = []
    for split, img_dir, lab_dir in (("train", "imagesTr", "labelsTr"), ("test", "imagesTs", "labelsTs")):
        found: dict[str, dict[str, str]] = {}
        files = [p for p in sorted((root / img_dir).glob(f"*{ending}")) if not p.name.startswith(".")]  # "._x": macOS
        if meta.get("layout") == "msd" and not any(channel.match(p.name) for p in files):  # one file a case
            for p in files:
                cid = p.name[: -len(ending)]
                lab = root / lab_dir / p.name
                cases.append(NnunetCase(cid, {n: str(p) for n in by_channel}, str(lab) if lab.is_file() else None,
                                        split, {n: k for k, n in enumerate(by_channel)}))
            continue
        for p in files:
            m = channel.match(p.name)
            if m:
                if int(m["ch"]) >= len(names):
                    raise CaseError(m["case"], p, f"channel {m['ch']} is not one of dataset.json's "
                                                  f"{len(names)} channel_names {names}")
                found.setdefault(m["case"], {})[by_channel[int(m["ch"])]] = str(p)
        for cid, chans in found.items():
            missing = [n for n in cfg.modality_names if n not in chans]
            if missing:
                raise CaseError(cid, root / img_dir, f"channel files for {missing} are missing")
            lab = root / lab_dir / f"{cid}{ending}"
            cases.append(NnunetCase(cid, chans, str(lab) if lab.is_file() else None, split))
    if not cases:
        raise ValueError(f"{root}: no case in imagesTr or imagesTs (files <case>_<XXXX>{ending}, as dataset.json's "
                         f"file_ending says)")
    return cases


def check_test_labels(dataset: str | os.PathLike[str], cfg: CrossModalConfig) -> None:
    """Check, before the dataset is read, that an imagesTs case has its label in labelsTs: the held-out cases
    ``evaluate`` scores (its error named the temp folder the dataset was imported into).

    Raises:
        ValueError: naming the dataset, its imagesTs cases and the label file the first would have.
    """
    root = Path(dataset)
    test = [c for c in list_cases(root, cfg) if c.split == "test"]
    if any(c.label for c in test):
        return
    ending = file_ending(root, read_dataset_json(root))
    where = (f"none of its {len(test)} imagesTs cases ({', '.join(c.case_id for c in test[:5])}"
             f"{' ...' if len(test) > 5 else ''}) has its label in labelsTs (e.g. "
             f"{root / 'labelsTs' / (test[0].case_id + ending)})" if test else "it has no imagesTs case")
    raise ValueError(f"{root}: no held-out case to evaluate: {where}; held-out cases are imagesTs cases with their "
                     "labels in labelsTs")


def import_nnunet(dataset: str | os.PathLike[str], studies: str | os.PathLike[str],
                  cfg: CrossModalConfig, leave_out: Collection[str] = ()) -> list[dict[str, object]]:
    """Copy an nnU-Net dataset into a studies folder, but the cases ``leave_out`` names; ``ignore`` regions become
    sparse labels.

    All or nothing: the cases are written into a temp folder beside ``studies`` and moved in when every one has
    been read (each case's primary image last, so a served datastore never lists a case without its other files): a
    case that does not read leaves ``studies`` as it was, where the cases before it stayed and the next import
    refused them as already there.
    """
    out = Path(studies)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = staging_folder(out.parent, f".{out.name}.import-")
    try:
        records = _import_cases(dataset, stage, cfg, leave_out)
        files = sorted((p for p in stage.rglob("*") if p.is_file()), key=lambda p: (p.parent == stage, str(p)))
        for p in files:
            target = out / p.relative_to(stage)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(p, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return records


def _import_cases(dataset: str | os.PathLike[str], out: Path, cfg: CrossModalConfig,
                  leave_out: Collection[str] = ()) -> list[dict[str, object]]:
    """:func:`import_nnunet`'s cases, written into ``out``."""
    meta = read_dataset_json(dataset)
    ignore = meta["labels"].get("ignore")
    classes = class_map(dataset, meta, cfg)
    records = []
    for case in tqdm([c for c in list_cases(dataset, cfg) if c.case_id not in leave_out], desc="import", unit="case"):
        read: dict[str, MetaTensor] = {}
        primary = channel_volume(case, cfg.modality_names[0], read)
        save_volume(out / f"{case.case_id}.nii.gz", primary[0].numpy(), primary.affine.numpy())
        for name in cfg.modality_names[1:]:
            vol = channel_volume(case, name, read)
            save_volume(out / cfg.data.sidecar_dir / case.case_id / f"{name}.nii.gz", vol[0].numpy(),
                        vol.affine.numpy())
        kind = None
        if case.label:  # on the image's grid, as nnU-Net has it (a label on another grid was found after the
            # import, named by its temp copy)
            arr = read_label(case.label, primary, case.case_id)
            ignored = arr == int(ignore) if ignore is not None else np.zeros(arr.shape, bool)
            arr = relabel(arr, classes)
            if case.split == "test":
                save_volume(out / TRUTH_DIR / f"{case.case_id}.nii.gz", arr.astype(np.uint8), primary.affine.numpy())
            else:
                if ignored.any():
                    arr = from_training(np.where(ignored, IGNORE_INDEX, arr), cfg.labels)
                    kind = SPARSE
                else:
                    kind = DENSE
                save_volume(out / FINAL_LABELS / f"{case.case_id}.nii.gz", arr, primary.affine.numpy())
        records.append({"case": case.case_id, "split": case.split, "label": kind})
    return records


def channel_volume(case: NnunetCase, name: str, read: dict[str, MetaTensor]) -> MetaTensor:
    """Modality ``name`` of ``case`` as (1, H, W, D): its channel file, or its channel of the case's 4D file (read
    once: ``read`` keeps the files read, by path).

    Raises:
        CaseError: the file is unreadable, or a Decathlon case's file has other than the channels ``modality`` names.
    """
    path = case.channels[name]
    if path not in read:
        read[path] = load_volume(path, case.case_id)
    vol = read[path]
    if not case.index:
        return vol
    if vol.shape[0] != len(case.index):
        raise CaseError(case.case_id, path, f"holds {vol.shape[0]} volume(s) where dataset.json's modality names "
                                            f"{len(case.index)} channels {list(case.index)}")
    k = case.index[name]
    return MetaTensor(vol.as_tensor()[k : k + 1], affine=vol.affine)


def relabel(arr: np.ndarray, classes: dict[int, int]) -> np.ndarray:
    """``arr`` with each value of ``classes`` replaced by its class value; other values (an ignore label, a value
    the dataset does not name, which loading the label refuses) as they are."""
    if all(k == v for k, v in classes.items()):
        return arr
    out = arr.copy()
    for k, v in classes.items():
        out[arr == k] = v
    return out


def export_nnunet(studies: str | os.PathLike[str], dataset: str | os.PathLike[str], cfg: CrossModalConfig,
                  test_cases: tuple[str, ...] = ()) -> dict:
    """Write a studies folder as an nnU-Net dataset; secondaries are resampled onto the primary grid.

    Training cases take their final label (sparse ones with the ``ignore`` label), or none (unlabeled);
    ``test_cases`` go to imagesTs with their truth (``<studies>/truth``) in labelsTs. ``dataset`` must be new or
    empty (ValueError otherwise, before anything is written). The dataset is written into a temp folder beside it
    and renamed into place when whole: an export stopped by a case that does not read leaves no half dataset, which
    nnU-Net would take as whole and the next export refused as not empty (a kill leaves the hidden
    ``.<name>.partial-*`` folder beside it, not ``dataset``).
    """
    src, dst = Path(studies), Path(dataset)
    primaries = list(primary_images(src).values())
    if not primaries:  # was an nnU-Net dataset of no case (numTraining 0), exit 0
        raise ValueError(f"{src}: no primary images (*.nii.gz, *.nii, *.nrrd, *.mha) in this studies folder: nothing to "
                         "export")
    ids = [case_id_of(p) for p in primaries]
    unknown = [c for c in test_cases if c not in ids]
    if unknown:  # the case went to imagesTr, and the dataset had no test case, without a word
        close = {c: m[0] for c in unknown if (m := difflib.get_close_matches(c, ids, n=1))}
        raise ValueError(f"--test {' '.join(unknown)}: not a case of {src}"
                         + (f" (did you mean {', '.join(close.values())}?)" if close else "")
                         + f"; its cases: {', '.join(ids[:8])}{' ...' if len(ids) > 8 else ''}")
    held = sorted(p.name for p in dst.iterdir()) if dst.is_dir() else []
    if held:  # an earlier export's files left beside the new ones (a label since removed) would train as current
        raise ValueError(f"--out {dst}: not empty (holds {', '.join(held[:3])}{' ...' if len(held) > 3 else ''}); an "
                         f"export writes a whole nnU-Net dataset: give a new folder, or remove this one first")
    dst.parent.mkdir(parents=True, exist_ok=True)
    final, dst = dst, staging_folder(dst.parent, f".{dst.name}.partial-")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(dst, 0o777 & ~umask)  # mkdtemp's 0700: the dataset as a folder made by hand
    try:
        meta = _export_cases(src, dst, cfg, primaries, test_cases)
        if final.is_dir():
            final.rmdir()  # empty (checked above); rename() onto a folder needs it gone
        dst.rename(final)
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)
        raise
    return meta


def _export_cases(src: Path, dst: Path, cfg: CrossModalConfig, primaries: list[Path],
                  test_cases: tuple[str, ...]) -> dict:
    """:func:`export_nnunet`'s cases and dataset.json, written into ``dst``."""
    ignore_value = cfg.labels.num_classes
    any_sparse = False
    n_train = 0
    truths = truth_files(src)
    for p in tqdm(primaries, desc="export", unit="case"):
        cid = case_id_of(p)
        split = "Ts" if cid in test_cases else "Tr"
        case = find_case(p, cfg.modality_names, cfg.data.sidecar_dir)
        primary = load_volume(case.primary, cid)
        affine = primary.affine.numpy()
        save_volume(dst / f"images{split}" / f"{cid}_0000.nii.gz", primary[0].numpy(), affine)
        for k, name in enumerate(cfg.modality_names[1:], start=1):
            path = case.modalities[name]
            if path is None:
                raise CaseError(cid, None, f"modality {name!r} is missing; nnU-Net needs every channel")
            vol = resample_to(load_volume(path, cid), primary)
            save_volume(dst / f"images{split}" / f"{cid}_{k:04d}.nii.gz", vol[0].numpy(), affine)
        if split == "Ts":
            truth = truths.get(cid)
            if truth is not None:
                save_volume(dst / "labelsTs" / f"{cid}.nii.gz", load_volume(truth, cid)[0].numpy().astype(np.uint8),
                            affine)
            continue
        n_train += 1
        labels = sorted((src / FINAL_LABELS).glob(f"{cid}.*"))
        if labels:
            arr = read_label(labels[0], primary, cid)  # on the image's grid (it was written with its affine as it was)
            kind = classify(arr, cfg.labels)
            target = to_training(arr, kind, cfg.labels)
            if kind == SPARSE:
                any_sparse = True
                target[target == IGNORE_INDEX] = ignore_value
            save_volume(dst / "labelsTr" / f"{cid}.nii.gz", target.astype(np.uint8), affine)
    meta = {
        "channel_names": {str(i): n for i, n in enumerate(cfg.modality_names)},
        "labels": {**cfg.labels.classes, **({"ignore": ignore_value} if any_sparse else {})},
        "numTraining": n_train,
        "file_ending": ".nii.gz",
    }
    atomic_write_text(dst / "dataset.json", json.dumps(meta, indent=2))
    return meta
