"""A ``LocalDatastore`` that validates before it writes, records the label kind, and writes atomically.

``save_label`` checks the label against the case's primary image (readable, finite, same grid, configured
values), classifies it dense or sparse (:mod:`crossmodal.labels`), then replaces the label file and the
datastore JSON through temp files. A rejected label raises HTTP 422 and changes nothing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import nrrd
import numpy as np
import pydantic
import torch
from crossmodal.config import (
    ConfigError,
    LabelConfig,
    as_device,
    as_flag,
    json_safe,
    near_miss,
    non_finite_at,
    written_temp,
)
from crossmodal.io import (
    IMAGE_EXTENSIONS,
    CaseError,
    atomic_copy,
    find_case,
    image_volume,
    load_volume,
    one_volume,
    onto_lattice,
    read_label,
    same_grid,
    save_volume,
    split_ext,
    unread_volumes,
)
from crossmodal.labels import (
    LABEL_KINDS,
    annotated_fraction,
    classify,
    invalid_values,
    overlay,
    seg_nrrd_segments,
    seg_nrrd_values,
    slicer_values,
)
from fastapi import HTTPException
from filelock import FileLock
from monai.data import MetaTensor
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.utils.others.generic import device_map, remove_file

logger = logging.getLogger(__name__)

EXTENSIONS = ("*.nii.gz", "*.nii", "*.nrrd", "*.seg.nrrd", "*.mha")
VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")  # an uploaded modality's file


def file_signature(st: os.stat_result) -> tuple[int, ...]:
    """What tells one version of a file from the next: inode, size, mtime and ctime in ns (an atomic replace makes
    a new inode; a coarse mtime alone can be the same for two writes a millisecond apart)."""
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def http_error(e: BaseException, status: int = 422, prefix: str = "") -> HTTPException:
    """A 4xx whose detail names the case, the file and the problem."""
    return HTTPException(status_code=status, detail=f"{prefix}{e}")


def request_device(value: Any) -> str | None:
    """A request's ``device``: ``cpu``, ``cuda``, ``cuda:<index>`` or a GPU by the name /info lists it under (MONAI
    Label's ``device_list``, e.g. ``NVIDIA H200``: what a viewer's device option sends back), as a torch device
    name; ``cuda`` is ``cpu`` where no GPU is visible, as in MONAI Label's own tasks. None when absent;
    :class:`~crossmodal.config.ConfigError` otherwise.

    Example:
        >>> request_device("cpu"), request_device(None)
        ('cpu', None)
    """
    device = as_device(value, {name: d for name, d in device_map().items() if name != d})  # GPU names
    return "cpu" if device and device.startswith("cuda") and not torch.cuda.is_available() else device


def no_such_case(image_id: object, hint: str = "") -> HTTPException:
    """The 404 for a case id the datastore does not hold (``hint``: what to do, after a '; ')."""
    return HTTPException(status_code=404, detail=f"case {image_id!r}: no such image in the datastore"
                                                 + (f"; {hint}" if hint else ""))


def no_such_label(image_id: object, tag: object, tags: list[str]) -> HTTPException:
    """The 404 for a label tag a case does not hold (``tags``: the ones it holds)."""
    return HTTPException(status_code=404, detail=f"case {image_id!r}: no {tag!r} label (its labels: {sorted(tags)})")


def one_of(extensions: tuple[str, ...]) -> str:
    """``('.a', '.b', '.c')`` -> ``'.a, .b or .c'``, for messages."""
    return ", ".join(extensions[:-1]) + f" or {extensions[-1]}" if len(extensions) > 1 else extensions[0]


def volume_extension(case_id: str, filename: str, what: str) -> str:
    """The extension of an uploaded volume (one of :data:`VOLUME_EXTENSIONS`), checked before it is read; 422
    naming the case and ``what`` was uploaded otherwise."""
    ext = split_ext(filename)[1]
    if ext not in VOLUME_EXTENSIONS:
        pair = " (a .mhd header's voxels lie in another file, which an upload does not carry: send one .mha)" \
            if ext.lower() == ".mhd" else ""
        raise HTTPException(status_code=422, detail=f"case {case_id!r}: uploaded {what}: extension {ext!r} is not one "
                                                    f"of {list(VOLUME_EXTENSIONS)} (the upload's file name gives it)"
                                                    f"{pair}")
    return ext


def check_name(name: str, what: str, case_id: str) -> None:
    """422 unless ``name`` is a plain file name (no '/' or '\\', not starting with '.'): MONAI Label joins image ids
    and label tags to the studies folder as they come, so ``../x`` was written outside it.

    Example:
        >>> check_name("final", "a label tag", "case1")
        >>> check_name("../x", "a label tag", "case1")
        Traceback (most recent call last):
        ...
        fastapi.exceptions.HTTPException: 422: case 'case1': a label tag must be a file name (no '/' or '\\', not \
starting with '.'), got '../x'
    """
    if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise HTTPException(status_code=422, detail=f"case {case_id!r}: {what} must be a file name (no '/' or '\\', "
                                                    f"not starting with '.'), got {name!r}")


def slicer_label(label_file: str, label_info: Any, case_id: str, cfg: LabelConfig,
                 scribbled: str | None = None) -> str:
    """``label_file`` with 3D Slicer's segment numbers turned into the configured values (a temp file, NIfTI or
    NRRD as it came; a ``.seg.nrrd`` becomes a plain ``.nrrd`` label map), or ``label_file`` itself where there is
    nothing to renumber. Slicer numbers the segments it exports 1, 2, ... in their order (a label drawn from
    scratch, or with ``marked_background`` painted: 4 in the brain app, not 255); the order comes from the
    ``label_info`` its MONAI Label module sends, or from a ``.seg.nrrd``'s header. ``scribbled``: the class a
    request of Slicer's scribbles panel is for (see :func:`crossmodal.labels.slicer_values`).

    Raises:
        CaseError: a segment that is no configured class, a layered file whose layers do not match its segments, or a
            value in the file that no segment of ``label_info`` numbers.
    """
    _, ext = split_ext(label_file)
    try:
        header = nrrd.read_header(label_file) if ext == ".seg.nrrd" else {}
        segments = seg_nrrd_segments(header, cfg)
        if len({layer for layer, _, _ in segments}) > 1:  # overlapping segments, saved on several layers
            return flattened_layers(label_file, segments, case_id, cfg)
        mapping = seg_nrrd_values(header, cfg) if segments else None
        mapping = mapping or slicer_values(label_info, cfg, scribbled)
    except CaseError:  # the file does not read: said with its case and file already
        raise
    except ValueError as e:
        raise CaseError(case_id, label_file, str(e)) from e
    except Exception as e:  # noqa: BLE001 - an unreadable header: reading the label says why
        logger.debug(f"{label_file}: no segment header ({e})")
        mapping = slicer_values(label_info, cfg, scribbled) if ext != ".seg.nrrd" else None
    if not mapping or all(k == v for k, v in mapping.items()):
        return label_file
    vol = load_volume(label_file, case_id)
    if vol.shape[0] != 1:  # not one label map: reading it as a label says so
        return label_file
    arr = np.rint(vol[0].numpy()).astype(np.int64)
    present = [int(v) for v in np.unique(arr)]
    unknown = [v for v in present if v not in mapping]
    if unknown:
        raise CaseError(case_id, label_file, f"label values {unknown} in the file are none of the {len(mapping) - 1} "
                                             f"segments the save names (values 1-{len(mapping) - 1}, in their "
                                             "order); save the label again from Slicer")
    lut = np.zeros(max(present) + 1, dtype=np.int64)
    for k, v in mapping.items():
        if k <= max(present):
            lut[k] = v
    return written_temp(".nrrd" if ext == ".seg.nrrd" else ext, lambda out: save_volume(
        out, lut[arr].astype(np.uint8 if cfg.marked_background < 256 else np.uint16), vol.affine.double().numpy()),
        prefix="crossmodal-label-")


def flattened_layers(label_file: str, segments: Sequence[tuple[int, int, int]], case_id: str,
                     cfg: LabelConfig) -> str:
    """A 3D Slicer ``.seg.nrrd`` whose segments overlap (saved on several layers, (L, I, J, K)) as one label map of
    the configured values (a temp ``.nrrd``): a voxel in several segments takes the smallest segment's class (a
    lesion drawn inside its organ stays lesion). ``segments``: :func:`crossmodal.labels.seg_nrrd_segments`.

    Raises:
        ValueError: one 3D array, or a segment on a layer the file does not hold.
        CaseError: the file does not read.
    """
    vol = load_volume(label_file, case_id)  # (L, H, W, D): a channel per layer
    if vol.shape[0] == 1:
        raise ValueError(f"its segments name {len({s[0] for s in segments})} layers, but it holds one 3D array "
                         f"{tuple(vol.shape[1:])}, not one 3D layer per segment layer; save it again from 3D Slicer")
    missing = sorted({layer for layer, _, _ in segments if not 0 <= layer < vol.shape[0]})
    if missing:
        raise ValueError(f"its segments lie on layers {missing}, but it holds {vol.shape[0]}; save it again from "
                         "3D Slicer")
    data = np.rint(vol.numpy()).astype(np.int64)
    for layer in sorted({s[0] for s in segments}):  # a value no segment of its layer names: the file is not Slicer's
        unknown = sorted(set(np.unique(data[layer]).tolist()) - {0} - {v for ly, v, _ in segments if ly == layer})
        if unknown:
            raise ValueError(f"values {unknown} on layer {layer} are none of its segments'; save it again from "
                             "3D Slicer")
    def mask(layer: int, value: int) -> np.ndarray:
        return data[layer] == value

    masks = [(functools.partial(mask, layer, value), target) for layer, value, target in segments if target != 0]
    label, shared = overlay(masks, data.shape[1:], np.uint8 if cfg.marked_background < 256 else np.uint16)
    logger.info(f"case {case_id!r}: {label_file}: {len(segments)} segments on {data.shape[0]} layers, {shared} voxels "
                "in more than one segment; each went to the smallest of its segments")
    return written_temp(".nrrd", lambda out: save_volume(out, label, vol.affine.double().numpy()),
                        prefix="crossmodal-label-")


def label_on_image_grid(label_file: str, image: MetaTensor, case_id: str) -> str:
    """``label_file`` placed onto the grid of ``image`` (1, H, W, D) (a temp file, NRRD or NIfTI as it came) where
    it lies on the image's voxel lattice with another extent (3D Slicer saves a segmentation cropped to its
    segments, or grown past the image: :func:`crossmodal.io.onto_lattice`), else ``label_file`` itself (reading it
    as a label then says what is wrong with it)."""
    try:
        lab = load_volume(label_file, case_id)
    except CaseError:
        return label_file
    if lab.shape[0] != 1 or same_grid(lab, image):
        return label_file
    placed = onto_lattice(lab, image, case_id, label_file)
    if placed is None:
        return label_file
    ext = split_ext(label_file)[1]
    return written_temp(".nrrd" if ext.endswith(".nrrd") else ext, lambda out: save_volume(
        out, np.rint(placed[0].numpy()).astype(np.uint16), image.affine.double().numpy()), prefix="crossmodal-label-")


def validate_label(label_file: str, image_file: str | MetaTensor, case_id: str, cfg: LabelConfig,
                   override: str | None = None, empty_ok: bool = True) -> tuple[str, float]:
    """Check ``label_file`` against the primary image (``image_file``: its path, or the image read); returns
    ``(kind, annotated_fraction)``. ``empty_ok=False``: a label with no voxel drawn (all 0) is refused.

    Raises:
        CaseError: unreadable, non-finite, other grid, non-integer or unconfigured values, bad override, empty.
    """
    image = image_file if isinstance(image_file, MetaTensor) else load_volume(image_file, case_id)
    arr = read_label(label_file, image, case_id)
    bad = invalid_values(arr, cfg)
    if bad:
        raise CaseError(case_id, label_file,
                        f"label values {bad} are not configured: classes {cfg.classes}, "
                        f"{cfg.marked_background_name}={cfg.marked_background}")
    if not empty_ok and not arr.any():
        classes = [n for n, v in cfg.classes.items() if v]
        raise CaseError(case_id, label_file, (
            f"the label is empty (no voxel of {classes} or {cfg.marked_background_name!r}): saved before drawing? "
            "Training would learn background everywhere on this case. Draw it, or, if the case has none of these, "
            'save it with params {"allow_empty": true}'))
    try:
        kind = classify(arr, cfg, override)
    except ValueError as e:
        raise CaseError(case_id, label_file, str(e)) from e
    return kind, annotated_fraction(arr, kind)


class CrossModalDatastore(LocalDatastore):
    """Local studies folder with validated, atomic label saves and the label kind in the label info.

    ``modalities`` (config order, the primary first) and ``sidecar_dir``: where a case's secondary modalities live
    (``<studies>/<sidecar_dir>/<case>/<name>.<ext>``); an image upload whose params name a secondary ``modality``
    goes there (:meth:`add_image`), and removing a case removes its folder.
    """

    files_are_local = True  # a case's files are on this machine, to be stat-ed (a PACS's are fetched first)

    def __init__(self, datastore_path: str, labels: LabelConfig, modalities: Sequence[str] = (),
                 sidecar_dir: str = "modalities", **kwargs: Any) -> None:
        self.label_config = labels
        self.modality_names, self.sidecar_dir = list(modalities), sidecar_dir
        self.on_remove: list[Callable[[str], None]] = []  # called with a removed case's id (its derived files)
        self._config_sig: tuple[int, ...] | None = None
        try:
            super().__init__(datastore_path, extensions=EXTENSIONS, **kwargs)
        except pydantic.ValidationError as e:  # a file cut short or edited by hand: was a pydantic traceback at start
            path = getattr(self, "_datastore_config_path", os.path.join(datastore_path, "datastore_v2.json"))
            why = "; ".join(str(err.get("msg")) for err in e.errors()[:2])
            raise ConfigError(
                f"{path}: the datastore file does not read ({why}): a copy cut short, or edited by hand? It holds the "
                "cases' label kinds and infos, scores and hand-outs. Put back a good copy, or move it aside "
                f"(mv {path} {path}.broken) and start again: the server then lists the cases and labels from the "
                "files (a label's kind by its marked_background voxels; scores recomputed), without the infos the "
                "file held"
            ) from None
        unread_volumes(datastore_path)  # MONAI Label's listing leaves them out without a word
        self._drop_non_finite()
        self._record_missing_kinds()

    def _drop_non_finite(self) -> None:
        """NaN / Inf in any image or label info become null: JSON has neither, and while one was stored (a client's
        ``client_id`` NaN in ``POST /activelearning``, which MONAI Label records in the case's info) the listing,
        that case's info and every next-sample request were 500s, the file keeping it over restarts."""
        for obj in self._datastore.objects.values():
            if non_finite_at(obj.image.info) is not None:
                obj.image.info = json_safe(obj.image.info)
            for label in obj.labels.values():
                if non_finite_at(label.info) is not None:
                    label.info = json_safe(label.info)

    def _record_missing_kinds(self) -> None:
        """Labels put on disk by hand (or by ``crossmodal data``) get their kind recorded once, by the rule."""
        changed = False
        for image_id, obj in self._datastore.objects.items():
            for tag, label in obj.labels.items():
                if "label_kind" in label.info:
                    continue
                path = os.path.join(self._datastore.label_path(tag), image_id + label.ext)
                try:
                    arr = np.rint(load_volume(path, image_id)[0].numpy())
                except CaseError as e:
                    logger.warning(f"cannot classify label {path}: {e}")
                    continue
                kind = classify(arr, self.label_config)
                label.info.update({"label_kind": kind, "annotated_fraction": round(annotated_fraction(arr, kind), 6)})
                changed = True
        if changed:
            self._update_datastore_file()

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise no_such_case(image_id)
        check_name(label_tag, "a label tag", image_id)
        info = dict(label_info or {})
        if typo := near_miss(info, ("label_kind", "allow_empty", "label_info")):  # other keys: the label's own info
            raise HTTPException(status_code=422, detail=f"case {image_id!r}: {typo[0]} is not a label option; did you "
                                                        f"mean {typo[1]}? (nothing stored)")
        override = info.pop("label_kind", None)
        allow_empty = as_flag(info.pop("allow_empty", False))
        if allow_empty is None:
            raise HTTPException(status_code=422, detail=f"case {image_id!r}: allow_empty="
                                                        f"{label_info['allow_empty']!r} must be true or false")
        _, ext = split_ext(label_filename)
        if ext not in IMAGE_EXTENSIONS:  # before reading: MONAI's readers take a PNG too
            raise HTTPException(status_code=422, detail=f"case {image_id!r}: label extension {ext!r} unsupported; "
                                                        f"send it as {one_of(IMAGE_EXTENSIONS)}")
        empty_ok = allow_empty or self.label_config.empty_final or label_tag != DefaultLabelTag.FINAL.value
        upload = label_filename
        try:  # (a model's 'original' label may be empty; a final one is what training learns from)
            label_filename = slicer_label(upload, info.get("label_info"), image_id, self.label_config)
            image = load_volume(self.get_image_uri(image_id), image_id)  # read once: placing and checking
            renumbered = label_filename
            label_filename = label_on_image_grid(renumbered, image, image_id)
            if renumbered not in (upload, label_filename):
                os.remove(renumbered)
            ext = split_ext(label_filename)[1]
            kind, frac = validate_label(label_filename, image, image_id, self.label_config,
                                        override, empty_ok=empty_ok)
        except CaseError as e:
            if label_filename != upload:
                os.remove(label_filename)
            if e.path in (str(upload), str(label_filename)):  # the upload's temp name means nothing to the user
                e = CaseError(image_id, None, f"uploaded {label_tag!r} label: {e.problem}")
            raise http_error(e) from e
        name = image_id + ext
        dest = os.path.join(self._datastore.label_path(label_tag), name)
        info.update({"label_kind": kind, "annotated_fraction": round(frac, 6)})
        try:
            with FileLock(self._lock_file):
                self._reload_unlocked(force=True)
                obj = self._datastore.objects.get(image_id) or obj
                atomic_copy(label_filename, dest)
                for other in IMAGE_EXTENSIONS:  # the case's label of this tag saved before in another format
                    if other != ext and os.path.isfile(stale := os.path.join(os.path.dirname(dest), image_id + other)):
                        os.remove(stale)
                info["ts"], info["name"] = int(time.time()), name
                obj.labels[label_tag] = DataModel(info=info, ext=ext)
                self._update_datastore_file(lock=False)
        finally:
            if label_filename != upload:  # our renumbered copy
                os.remove(label_filename)
        logger.info(f"Saved {kind} label for {image_id} ({frac:.4f} annotated) -> {dest}")
        return image_id

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """A new case from its primary image (409 for an id that exists); with ``modality`` (a secondary's name) in
        ``image_info`` (the upload's params), that modality of the existing case ``image_id`` instead (added, or
        replaced)."""
        info = dict(image_info or {})
        modality = info.pop("modality", None)
        if modality is None and (typo := near_miss(info, ("modality",))):  # kept as the image's info, and the upload
            # taken as a new case: a 409 "already exists" for a modality of one
            raise http_error(ValueError(f"case {image_id!r}: upload params: {typo[0]} is not an option; did you mean "
                                        f"{typo[1]}?"))
        if modality is not None and (not self.modality_names or modality != self.modality_names[0]):
            return self._add_modality(image_id, image_filename, modality)
        check_name(image_id, "an image id", image_id)
        volume_extension(image_id, image_filename, "image")
        self._fresh()
        self._refuse_existing(image_id)  # before reading the upload; again under the lock below
        try:
            image_volume(load_volume(image_filename, image_id), image_id, None, self.modality_names)
        except CaseError as e:
            raise http_error(CaseError(image_id, None, f"uploaded image: {e.problem}")) from e
        _, image_ext = self._to_id(os.path.basename(image_filename))
        name = self._filename(image_id, image_ext)
        dest = os.path.join(self._datastore.image_path(), name)
        # the check, the copy and the entry under one lock, on the file as another process left it: upstream wrote
        # the JSON it had read before the upload, dropping what a scoring / training child stored meanwhile, and two
        # writers of one folder adding one new id both passed the check (the second replaced the first's image)
        with FileLock(self._lock_file):
            self._reload_unlocked(force=True)
            self._refuse_existing(image_id, dest)
            atomic_copy(image_filename, dest)  # upstream copied in place: a crash left a half-written case
            info.update({"ts": int(time.time()), "name": name})
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=image_ext))
            self._update_datastore_file(lock=False)
        logger.info(f"Added image {image_id} -> {dest}")
        return image_id

    def _refuse_existing(self, image_id: str, dest: str | None = None) -> None:
        """409 for a case that exists (upstream replaced its image and dropped its labels) or whose image file is
        there (the next refresh would make it one)."""
        obj = self._datastore.objects.get(image_id)
        if obj is None and not (dest and os.path.exists(dest)):
            return
        held = f" (labels: {sorted(obj.labels)})" if obj and obj.labels else ""
        raise HTTPException(status_code=409, detail=(
            f"case {image_id!r} already exists{held}; remove it first (DELETE /datastore/image?id={image_id}) or "
            "upload under another id"))

    def get_dataset_archive(self, limit_cases: int | None) -> str:
        """``GET /datastore/dataset``: the cases with a final label (the first ``limit_cases`` by id) as a ZIP with
        upstream's ``image/``, ``label/`` and ``metadata.json`` (the datastore file, label kinds included) and each
        case's other modalities under ``modalities/<case>/``, which upstream left out. One archive a datastore in the
        temp folder, replaced atomically by the next request (upstream left one behind per request); 404 when no case
        has a final label (upstream: a 500 from an assert)."""
        pairs = sorted(self.datalist(), key=lambda pair: os.path.basename(pair["image"]))
        if not pairs:
            raise HTTPException(status_code=404, detail="no case has a final label: the dataset archive holds the "
                                                        "labelled cases; save a label first")
        if limit_cases and 1 <= limit_cases < len(pairs):
            pairs = pairs[:limit_cases]
        key = hashlib.sha256(os.path.realpath(self._datastore_path).encode()).hexdigest()[:12]
        dest = os.path.join(tempfile.gettempdir(), f"crossmodal-dataset-{key}.zip")
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".crossmodal-dataset-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w") as archive:
                for pair in pairs:
                    case = find_case(pair["image"], self.modality_names, self.sidecar_dir)
                    archive.write(pair["image"], f"image/{os.path.basename(pair['image'])}")
                    archive.write(pair["label"], f"label/{os.path.basename(pair['label'])}")
                    for path in case.modalities.values():
                        if path:
                            archive.write(path, f"{self.sidecar_dir}/{case.case_id}/{os.path.basename(path)}")
                archive.writestr("metadata.json", self._datastore.model_dump_json(exclude={"base_path"}))
            os.replace(tmp, dest)
        except BaseException:
            remove_file(tmp)
            raise
        return dest

    def sidecar_folder(self, image_id: str) -> str:
        """``<studies>/<sidecar_dir>/<image_id>``: the case's secondary modalities."""
        return os.path.join(self._datastore_path, self.sidecar_dir, image_id)

    def _add_modality(self, image_id: str, image_filename: str, modality: object) -> str:
        case = f"case {image_id!r}: "
        secondary = self.modality_names[1:]
        if modality not in secondary:
            primary = f" (the primary, {self.modality_names[0]!r}, is the case's image itself)" if secondary else ""
            raise HTTPException(status_code=422, detail=f"{case}modality {modality!r} is not one of the secondary "
                                                        f"modalities {secondary}{primary}")
        ext = volume_extension(image_id, image_filename, f"{modality} image")
        try:
            one_volume(image_volume(load_volume(image_filename, image_id), image_id, None), image_id, None)
        except CaseError as e:
            raise http_error(CaseError(image_id, None, f"uploaded {modality} image: {e.problem}")) from e
        folder = self.sidecar_folder(image_id)
        dest = os.path.join(folder, f"{modality}{ext}")
        with FileLock(self._lock_file):  # the case must still be there (a DELETE between would orphan the file)
            self._reload_unlocked(force=True)
            if image_id not in self._datastore.objects:
                raise no_such_case(image_id, f"upload its primary image ({self.modality_names[0]}) first")
            atomic_copy(image_filename, dest)
            for other in VOLUME_EXTENSIONS:  # one file a modality: the upload replaces another format's
                if other != ext and os.path.exists(os.path.join(folder, f"{modality}{other}")):
                    os.remove(os.path.join(folder, f"{modality}{other}"))
        logger.info(f"Added {modality} of {image_id} -> {dest}")
        return image_id

    def remove_image(self, image_id: str) -> None:
        """The case's labels, image and secondary modalities (a case added again under the same id found the old
        ones), and its entry, under the lock on the file as another process left it (upstream rewrote the JSON it
        had read, dropping what a child process stored meanwhile); an unknown case is a 404 (upstream: a bare 500).
        Files go before the entry: a crash between leaves an entry the next refresh drops, not a case that comes
        back. Then each of :attr:`on_remove` forgets what it derived from the case (the scoring's cached input)."""
        with FileLock(self._lock_file):
            self._reload_unlocked(force=True)
            obj = self._datastore.objects.get(image_id)
            if obj is None:
                raise no_such_case(image_id)
            logger.info(f"Removing image {image_id} (labels: {sorted(obj.labels)})")
            for tag in list(obj.labels):
                remove_file(self.get_label_uri(image_id, tag))
            remove_file(self.get_image_uri(image_id))
            if self.modality_names:
                shutil.rmtree(self.sidecar_folder(image_id), ignore_errors=True)
            del self._datastore.objects[image_id]
            self._update_datastore_file(lock=False)
        for forget in self.on_remove:
            forget(image_id)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        """The label file and its entry, under the lock as :meth:`remove_image`; a case or a label that is not there
        is a 404 (upstream answered 200 and removed nothing)."""
        with FileLock(self._lock_file):
            self._reload_unlocked(force=True)
            obj = self._datastore.objects.get(label_id)
            if obj is None:
                raise no_such_case(label_id)
            if label_tag not in obj.labels:
                raise no_such_label(label_id, label_tag, list(obj.labels))
            logger.info(f"Removing label {label_id} => {label_tag}")
            remove_file(self.get_label_uri(label_id, label_tag))
            del obj.labels[label_tag]
            self._update_datastore_file(lock=False)

    def label_kind(self, image_id: str, tag: str = "final") -> str:
        """The recorded kind, or the rule applied to the file (labels placed on disk by hand)."""
        kind = self.get_label_info(image_id, tag).get("label_kind")
        if kind:
            return kind
        arr = np.rint(load_volume(self.get_label_uri(image_id, tag), image_id)[0].numpy())
        return classify(arr, self.label_config)

    # MONAI Label runs scoring and training in child processes that build their own datastore on the same folder
    # and write the JSON: reads pick up their writes (a stat per call: inode, size, mtime and ctime in ns, since two
    # writes a millisecond apart can share a coarse mtime), and every write re-reads the file under the lock first,
    # whatever its stat says, so the server never overwrites what a child wrote.
    def _reload_unlocked(self, force: bool = False) -> None:
        path = self._datastore_config_path
        if not os.path.exists(path) or (not force and file_signature(os.stat(path)) == self._config_sig):
            return
        with open(path) as fp:
            st = os.fstat(fp.fileno())  # the signature of what is read, whatever replaces the file meanwhile
            self._datastore = LocalDatastoreModel.model_validate_json(fp.read())
        self._datastore.base_path = self._datastore_path
        self._drop_non_finite()  # a file written before 2026-12-03
        self._config_sig, self._config_ts = file_signature(st), st.st_mtime

    def _fresh(self) -> None:
        with FileLock(self._lock_file):
            self._reload_unlocked()

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        self._fresh()
        return super().get_image_info(image_id)

    def get_label_info(self, label_id: str, label_tag: str) -> dict[str, Any]:
        self._fresh()
        return super().get_label_info(label_id, label_tag)

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        self._fresh()
        return super().get_labeled_images(label_tag, labels)

    def get_unlabeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        self._fresh()
        return super().get_unlabeled_images(label_tag, labels)

    def json(self) -> dict[str, Any]:
        self._fresh()
        return super().json()

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        if self.update_image_infos({image_id: info}):
            raise no_such_case(image_id)

    def update_image_infos(self, infos: Mapping[str, dict[str, Any]]) -> list[str]:
        """:meth:`update_image_info` for many cases with one read and one write of the datastore file (under the
        lock, after what another process wrote); returns the ids that are not (or no longer) in the datastore,
        whose infos are dropped. The file holds every case, so writing it once per case costs O(cases) each:
        re-scoring a pool of 800 cases that way took 48.4 s instead of 9.6 s (``make bench-pool``)."""
        with FileLock(self._lock_file):
            self._reload_unlocked(force=True)
            missing = [i for i in infos if i not in self._datastore.objects]
            for image_id, info in infos.items():
                if image_id not in missing:
                    self._datastore.objects[image_id].image.info.update(info)
            if len(missing) < len(infos):
                self._update_datastore_file(lock=False)
        return missing

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        """As upstream (``PUT /datastore/label/info``), for the keys training reads: ``label_kind`` must be
        ``dense`` or ``sparse`` (its ``annotated_fraction`` follows; another kind stopped the next training in its
        data loader), and ``annotated_fraction`` is not set by hand (422 naming the case)."""
        info = dict(info)
        case = f"case {label_id!r}: {label_tag!r} label info: "
        if "annotated_fraction" in info:
            raise HTTPException(status_code=422, detail=f"{case}annotated_fraction is measured from the label, not "
                                                        "set; set label_kind (dense or sparse) instead")
        kind = info.get("label_kind")
        if "label_kind" in info and kind not in LABEL_KINDS:
            raise HTTPException(status_code=422, detail=f"{case}label_kind {kind!r} must be one of {list(LABEL_KINDS)}")
        with FileLock(self._lock_file):
            self._reload_unlocked(force=True)
            label = self._datastore.label(label_id, label_tag)
            if label is None:
                raise HTTPException(status_code=404, detail=f"case {label_id!r}: no {label_tag!r} label")
            if kind is not None:
                path = os.path.join(self._datastore.label_path(label_tag), label_id + label.ext)
                try:
                    arr = np.rint(load_volume(path, label_id)[0].numpy())
                except CaseError as e:
                    raise http_error(e) from e
                info["annotated_fraction"] = round(annotated_fraction(arr, kind), 6)
            label.info.update(info)
            self._update_datastore_file(lock=False)

    def _update_datastore_file(self, lock: bool = True) -> None:
        def write() -> None:
            self._ignore_event_config = True
            self._drop_non_finite()
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            folder = os.path.dirname(self._datastore_config_path)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".datastore.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                os.replace(tmp, self._datastore_config_path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            st = os.stat(self._datastore_config_path)
            self._config_sig, self._config_ts = file_signature(st), st.st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()
