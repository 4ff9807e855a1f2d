"""Multimodal studies on a PACS over DICOMweb: a case is a study, its primary series is the datastore image.

``--studies http://host:8042/dicom-web`` makes :class:`PacsDatastore` the app's datastore. Per study, each
configured modality is the series whose DICOM Modality and SeriesDescription match the config
(``modalities[*].dicom_modality`` / ``series_description``); the first modality's series is the case's image id.
Any series UID of the study (or the StudyInstanceUID) given by a viewer maps to that case.

A local cache (our validated :class:`~crossmodal.serving.datastore.CrossModalDatastore`) holds what was fetched:
``<cache>/<primary uid>.nii.gz``, the siblings as ``<cache>/modalities/<primary uid>/<name>.nii.gz`` (so every
reader of the local layout works unchanged) and the labels in ``<cache>/labels/<tag>/``. Series are immutable in
DICOM, so a cached series is never fetched twice; the study listing is re-read after ``list_ttl`` seconds and at
once after our own saves. Each cached NIfTI carries a stamp (``.<case id or modality>.series``: its series UID and
:data:`READER_VERSION`); one converted by an earlier version of the reader is converted again from the DICOM files
kept in the cache (``<cache>/dicom/<series uid>/``), without a download.

Saving a ``final`` label validates it, keeps it in the cache, writes it as DICOM SEG (dcmqi; highdicom on an
enhanced image) and stores it in the PACS. When the PACS is down or too slow the label stays in the cache marked
``pacs: pending``, the request gets HTTP 503 saying so, and pending labels are stored on the next request that
reaches the PACS.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests
from crossmodal.config import CrossModalConfig, ModalityConfig, written_temp
from crossmodal.dicom import SEG_SOP_CLASS, describe_series, label_to_seg, seg_kind, seg_to_label, series_to_nifti
from crossmodal.io import CaseError, load_volume, save_volume, staging_folder
from crossmodal.serving.datastore import CrossModalDatastore, http_error
from dicomweb_client import DICOMwebClient
from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.dicom import DICOMwebClientX
from monailabel.datastore.local import DataModel, ImageLabelModel
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.utils.others.generic import md5_digest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

logger = logging.getLogger(__name__)

FINAL = DefaultLabelTag.FINAL.value
# What a cached NIfTI was converted by; raised whenever the reading of DICOM changes what a series reads as. 2: a
# rescale per slice / frame applied to each (a PET read as int16 with its first slice's rescale before, 2026-12-04).
READER_VERSION = "2"


class PacsUnavailable(HTTPException):
    """HTTP 503: the PACS did not answer (down, refused, too slow)."""

    def __init__(self, url: str, what: str, error: Exception) -> None:
        reason = type(error).__name__ if isinstance(error, requests.Timeout) else str(error).splitlines()[0][:200]
        super().__init__(status_code=503, detail=f"PACS {url} did not answer while {what} ({reason}); "
                                                 f"check that it runs and is reachable, then retry")


class _TimeoutSession(requests.Session):
    """A requests session with a default timeout (dicomweb-client passes none)."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        return super().request(*args, **kwargs)


def make_client(url: str, timeout: float = 30.0, attempts: int = 2) -> DICOMwebClient:
    """A DICOMweb client for ``url``: each request times out after ``timeout`` s and is tried ``attempts`` times
    (dicomweb-client's default of 5 with exponential back-off keeps a viewer waiting for a minute)."""
    client = DICOMwebClientX(url=url.rstrip("/"), session=_TimeoutSession(timeout))
    client.set_http_retry_params(retry=attempts > 1, max_attempts=attempts, wait_exponential_multiplier=200)
    return client


@dataclass
class Series:
    """One DICOM series of a study as the PACS lists it (its SeriesInstanceUID, StudyInstanceUID, Modality, ...)."""

    uid: str
    study: str
    modality: str
    description: str
    number: int
    when: str = ""  # SeriesDate + SeriesTime
    # known from a DICOM folder's headers (a PACS's listing counts instances, and an enhanced volume is one):
    images: int | None = None  # the frames of its files
    localizer: bool = False  # its ImageType says LOCALIZER

    @property
    def aside(self) -> bool:
        """Whether the series is not the volume a study's modality means (a scout, a localizer, a dose report, a
        series of one or two images): a modality takes such a series only where no other one matches."""
        few = self.images is not None and self.images < 3
        return self.localizer or few or bool(NOT_A_VOLUME.search(self.description))


NOT_A_VOLUME = re.compile(r"topogram|scout|locali[sz]er|\bloc\b|surview|survey|scanogram|dose ?(report|info)|"
                          r"patient protocol|screen ?(save|capture)", re.I)
"""Series descriptions of what scanners put in a study beside its volumes (CT topograms / scouts, MR localizers and
surveys, dose reports, screen captures); not "dose" alone: a PET/CT's CT is often "CT LOW DOSE"."""


@dataclass
class StudyCase:
    """One study as a case: its primary series and, per secondary modality name, a series (or None)."""

    study: str
    primary: Series
    siblings: dict[str, Series | None] = field(default_factory=dict)


def _value(ds: dict, tag: str, default: Any = "") -> Any:
    v = ds.get(tag, {}).get("Value")
    return v[0] if v else default


SERIES_FIELDS = ["SeriesDescription", "SeriesNumber", "Modality", "SeriesDate", "SeriesTime"]
"""The fields a series listing asks for beside the UIDs (QIDO-RS ``includefield``)."""


def series_of(rows: list[dict]) -> list[Series]:
    """QIDO-RS series rows (DICOM JSON, with :data:`SERIES_FIELDS`) as :class:`Series`."""
    return [Series(str(_value(r, "0020000E")), str(_value(r, "0020000D")), str(_value(r, "00080060")),
                   str(_value(r, "0008103E")), int(_value(r, "00200011", 0) or 0),
                   f"{_value(r, '00080021')}{_value(r, '00080031')}") for r in rows]


def pacs_series(url: str, timeout: float = 30.0) -> list[Series]:
    """Every series of the DICOMweb server at ``url``.

    Raises:
        PacsUnavailable: it does not answer.
    """
    try:
        return series_of(make_client(url.rstrip("/"), timeout).search_for_series(get_remaining=True,
                                                                                 fields=SERIES_FIELDS))
    except requests.RequestException as e:
        raise PacsUnavailable(url, "listing series", e) from e


def match_studies(series: list[Series], modalities: list[ModalityConfig]) -> dict[str, StudyCase]:
    """Assign each study's series to the configured modalities; returns cases by primary series UID.

    A modality takes the series (SEG excluded) with its DICOM Modality whose SeriesDescription matches its regex
    (case-insensitive), lowest SeriesNumber first, a series :attr:`Series.aside` (a scout, a localizer: scanners
    number them first) only where no other one matches; each series serves one modality. Studies without a primary
    series are not cases.

    Example:
        >>> s = [Series("1", "A", "MR", "T2 axial", 2), Series("2", "A", "MR", "T1 mprage", 1)]
        >>> mods = [ModalityConfig("t1", series_description="t1"), ModalityConfig("t2", series_description="t2")]
        >>> c = match_studies(s, mods)["2"]; (c.primary.uid, c.siblings["t2"].uid)
        ('2', '1')
        >>> ct = [Series("9", "B", "CT", "Topogram 0.6 T20s", 1), Series("8", "B", "CT", "WB 3.0 B31f", 2)]
        >>> match_studies(ct, [ModalityConfig("ct", kind="ct")])["8"].primary.description
        'WB 3.0 B31f'
    """
    by_study: dict[str, list[Series]] = {}
    for s in series:
        if s.modality != "SEG":
            by_study.setdefault(s.study, []).append(s)
    cases = {}
    for study, items in by_study.items():
        free = sorted(items, key=lambda s: (s.aside, s.number, s.uid))
        chosen: dict[str, Series | None] = {}
        for m in modalities:
            pick = next((s for s in free if s.modality == m.dicom_modality and
                         (not m.series_description or re.search(m.series_description, s.description, re.I))), None)
            chosen[m.name] = pick
            if pick is not None:
                free.remove(pick)
        primary = chosen.pop(modalities[0].name)
        if primary is None:
            logger.debug(f"study {study}: no {modalities[0].dicom_modality} series for {modalities[0].name}; skipped")
            continue
        cases[primary.uid] = StudyCase(study, primary, chosen)
    return cases


def labels_onto_grid(label: str, label_grid: str, target: str, case_id: str, keep_ext: bool = False) -> str:
    """A label map on the grid of ``label_grid`` moved (nearest neighbour) onto the grid of ``target``; returns a
    temp file (NIfTI, or ``label``'s own format with ``keep_ext``; a 3D Slicer ``.seg.nrrd`` stays one, with the
    segments its header names, which say what its values are, and its layers where segments overlap), or ``label``
    unchanged when it is not on ``label_grid``'s grid (validation then says why) or already on ``target``'s."""
    import nrrd
    from crossmodal.io import resample_to, same_grid, split_ext

    lab, ref, dst = load_volume(label, case_id), load_volume(label_grid, case_id), load_volume(target, case_id)
    if not same_grid(lab, ref) or same_grid(lab, dst):
        return label
    src_ext = split_ext(label)[1]
    ext = src_ext if keep_ext or src_ext == ".seg.nrrd" else ".nii.gz"
    moved = np.rint(resample_to(lab, dst, mode="nearest").numpy())  # (L, H, W, D): a .seg.nrrd's layers, or one map
    arr = np.moveaxis(moved, 0, -1) if moved.shape[0] > 1 and ext == ".seg.nrrd" else moved[0]
    # a .seg.nrrd: the segments' names and values (not their extents: those were on the old grid)
    fields = {k: v for k, v in nrrd.read_header(label).items() if SEGMENT_FIELD.fullmatch(k)} \
        if ext == ".seg.nrrd" else None
    return written_temp(ext, lambda path: save_volume(path, arr.astype(np.uint8 if arr.max() < 256 else np.uint16),
                                                      dst.affine.double().numpy(), nrrd_fields=fields),
                        prefix="crossmodal-label-")


# the fields of a .seg.nrrd header that name its segments (labels.seg_nrrd_values reads them), grid-independent
SEGMENT_FIELD = re.compile(r"Segment\d+_(ID|Name|NameAutoGenerated|Color|ColorAutoGenerated|LabelValue|Layer|Tags)")


class PacsDatastore(CrossModalDatastore):
    """Cases are studies on a DICOMweb server; see the module docstring."""

    files_are_local = False  # get_image_uri fetches a case's series: scoring does not stat every case's files

    def __init__(self, url: str, cfg: CrossModalConfig, cache_path: str | None = None, list_ttl: float = 30.0,
                 timeout: float = 30.0, client: DICOMwebClient | None = None) -> None:
        self.url = url.rstrip("/")
        self.cfg = cfg
        self.client = client or make_client(self.url, timeout)
        self.list_ttl = list_ttl
        self._index: dict[str, StudyCase] = {}
        self._alias: dict[str, str] = {}
        self._segs: dict[str, tuple[str, str, str | None, str]] = {}  # seg uid -> (study, ref series, kind, when)
        self._index_ts = -1.0
        self._unmatched: frozenset[str] = frozenset()  # studies without a primary series, as last logged
        self.pacs_ok = True
        self.pacs_error: PacsUnavailable | None = None
        self._index_lock = threading.RLock()
        root = cache_path or os.path.join(Path.home(), ".cache", "crossmodal", "dicomweb")
        path = os.path.join(root, md5_digest(self.url))
        os.makedirs(path, exist_ok=True)
        super().__init__(path, cfg.labels)

    def name(self) -> str:
        return self.url

    # ---- the PACS index --------------------------------------------------------------------------------------
    def _search(self, what: str, **kwargs: Any) -> list[dict]:
        try:
            return self.client.search_for_series(get_remaining=True, **kwargs)
        except requests.RequestException as e:
            raise PacsUnavailable(self.url, what, e) from e

    def refresh_index(self, force: bool = False, flush: bool = True) -> dict[str, StudyCase]:
        """Re-read the PACS's series list when older than ``list_ttl`` (or ``force``); returns cases by id.

        When the PACS does not answer, the last listing is kept (cached cases stay usable) and only a first
        listing raises :class:`PacsUnavailable`. ``flush`` stores pending labels once the PACS answers.
        """
        with self._index_lock:
            if not force and self._index_ts >= 0 and time.monotonic() - self._index_ts < self.list_ttl:
                return self._index
            try:
                series = series_of(self._search("listing series", fields=SERIES_FIELDS))
                self._read_segs([s for s in series if s.modality == "SEG"])
            except PacsUnavailable as e:
                if self._index_ts < 0:
                    raise
                logger.warning(f"{e.detail}; using the listing of {time.monotonic() - self._index_ts:.0f} s ago")
                self.pacs_ok, self.pacs_error = False, e
                return self._index
            self.pacs_ok = True
            self._index = match_studies(series, self.cfg.modalities)
            self._log_unmatched(series)
            self._alias = {}
            for pid, case in self._index.items():
                self._alias[case.study] = pid
                for s in [case.primary, *[s for s in case.siblings.values() if s]]:
                    self._alias[s.uid] = pid
            for s in series:  # every other series of a case's study (SEG, unmatched ones) maps to the case too
                if s.study in self._alias:
                    self._alias.setdefault(s.uid, self._alias[s.study])
            self._index_ts = time.monotonic()
            if flush:
                self._flush_pending()
            return self._index

    def _log_unmatched(self, series: list[Series]) -> None:
        """A warning, once each time they change, naming the studies that have no series the preset's primary
        modality takes (a PACS of CT + PET studies served with the brain preset listed no case, without a word)."""
        studies = {s.study for s in series if s.modality != "SEG"}
        unmatched = frozenset(studies - {c.study for c in self._index.values()})
        if unmatched == self._unmatched:
            return
        self._unmatched = unmatched
        if not unmatched:
            return
        first = min(unmatched)
        found = [describe_series(s) for s in sorted(series, key=lambda s: (s.number, s.modality, s.uid))
                 if s.study == first]
        primary = self.cfg.modalities[0]
        rule = f", description matching {primary.series_description!r}" if primary.series_description else ""
        what = f"none of its {len(studies)} studies has a" if len(unmatched) == len(studies) else \
            f"{len(unmatched)} of its {len(studies)} studies have no"
        logger.warning(f"PACS {self.url}: {what} series for {primary.name!r} ({primary.dicom_modality}{rule}), so "
                       f"they are no case (e.g. study {first}: {found[:6]}); the preset names the series each modality "
                       f"takes (--conf preset, modalities: dicom_modality, series_description)")

    def _read_segs(self, segs: list[Series]) -> None:
        """Which image series each SEG references (read once per SEG: DICOM series are immutable)."""
        for s in segs:
            if s.uid in self._segs:
                continue
            try:
                meta = Dataset.from_json(self.client.retrieve_series_metadata(s.study, s.uid)[0])
            except requests.RequestException as e:
                raise PacsUnavailable(self.url, f"reading SEG {s.uid}", e) from e
            ref = meta.get("ReferencedSeriesSequence")
            ref_uid = str(ref[0].SeriesInstanceUID) if ref else ""
            self._segs[s.uid] = (s.study, ref_uid, seg_kind(meta), s.when)

    def resolve(self, image_id: str, flush: bool = True) -> str:
        """The case id (primary series UID) for any series or study UID of a case.

        Raises:
            HTTPException: 404 when no case of the PACS holds ``image_id``.
        """
        index = self.refresh_index(flush=flush)
        if image_id in index:
            return image_id
        if image_id not in self._alias:
            index = self.refresh_index(force=True, flush=flush)
        if image_id in self._alias:
            return self._alias[image_id]
        if not self.pacs_ok and self.pacs_error is not None:
            raise self.pacs_error  # not a wrong id: the PACS that would know it does not answer
        m = self.cfg.modalities[0]
        raise HTTPException(status_code=404, detail=(
            f"case {image_id!r}: no study on {self.url} holds this series or study with a primary "
            f"{m.dicom_modality} series for {m.name!r}" + (f" (SeriesDescription ~ /{m.series_description}/)"
                                                             if m.series_description else "")))

    # ---- images ------------------------------------------------------------------------------------------------
    def list_images(self) -> list[str]:
        return sorted(self.refresh_index())

    def _fetch_series(self, series: Series, dest: Path) -> None:
        """Download one series and write it as NIfTI at ``dest`` (atomically); keep the DICOM files (for SEG)."""
        from monailabel.datastore.utils.dicom import dicom_web_download_series

        dicom_dir = Path(self.dicom_dir(series.uid))
        tmp_dir = staging_folder(self._datastore.base_path, ".dl-")
        try:
            try:
                dicom_web_download_series(series.study, series.uid, str(tmp_dir), self.client)
            except requests.RequestException as e:
                raise PacsUnavailable(self.url, f"fetching series {series.uid}", e) from e
            try:  # whole (no slice missing or cut short), readable and finite
                series_to_nifti(sorted(p for p in tmp_dir.iterdir() if p.is_file()), dest, series.uid)
            except CaseError as e:  # named by the series on the PACS, not by the download's temp folder
                raise CaseError(series.uid, None, f"{series.modality} series on {self.url}: {e.problem}; store "
                                                  "the series there again") from e
            if not dicom_dir.is_dir():
                dicom_dir.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp_dir, dicom_dir)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)

    def dicom_dir(self, series_uid: str) -> str:
        return os.path.join(self._datastore.base_path, "dicom", series_uid)

    def _cached(self, series: Series, dest: Path, stamp: Path) -> None:
        """Make ``dest`` hold ``series`` as this version of the reader converts it (``stamp``: the series and
        :data:`READER_VERSION` it holds): kept as it is when its stamp says so; else converted from the series' DICOM
        files kept in the cache (a conversion by an earlier reader, or from before the stamps), else fetched."""
        want = f"{series.uid} {READER_VERSION}"
        if dest.is_file() and stamp.is_file() and stamp.read_text() == want:
            return
        files = sorted(p for p in Path(self.dicom_dir(series.uid)).glob("*") if p.is_file())
        if files:  # the kept files are this series' whole (a download is moved there only once it converted)
            logger.info(f"{dest.name}: series {series.uid} converted again from its {len(files)} cached DICOM files "
                        f"(reader version {READER_VERSION})")
            try:
                series_to_nifti(files, dest, series.uid)
            except CaseError as e:
                raise CaseError(series.uid, None, f"{series.modality} series cached from {self.url}: {e.problem}; "
                                                  f"delete {self.dicom_dir(series.uid)} to fetch it again") from e
        else:
            self._fetch_series(series, dest)
        fd, tmp = tempfile.mkstemp(dir=stamp.parent, prefix=f".{stamp.name}.")
        with os.fdopen(fd, "w") as f:
            f.write(want)
        os.replace(tmp, stamp)

    def get_image_uri(self, image_id: str) -> str:
        """Fetch the case's primary series and its sibling modalities (once); returns the primary NIfTI path."""
        cid = self.resolve(image_id)
        case = self._index[cid]
        base = Path(self._datastore.base_path)
        primary = base / f"{cid}.nii.gz"
        with FileLock(str(base / f".{cid}.lock")):
            self._cached(case.primary, primary, base / f".{cid}.series")
            side = base / self.cfg.data.sidecar_dir / cid
            for name, s in case.siblings.items():
                if s is not None:
                    self._cached(s, side / f"{name}.nii.gz", side / f".{name}.series")
            with FileLock(self._lock_file):
                self._reload_unlocked()
                if cid not in self._datastore.objects:
                    info = {"StudyInstanceUID": case.study, "SeriesInstanceUID": cid,
                            "modalities": [self.cfg.modality_names[0],
                                           *[n for n, s in case.siblings.items() if s is not None]]}
                    self._datastore.objects[cid] = ImageLabelModel(image=DataModel(info=info, ext=".nii.gz"))
                    self._update_datastore_file(lock=False)
        return str(primary)

    def viewer_grid(self, image_id: str) -> tuple[str, str] | None:
        """``(modality name, its cached NIfTI)`` when ``image_id`` is a secondary modality's series (a viewer showing
        it wants labels on its grid); None for the primary series, the study UID and unmatched series."""
        cid = self.resolve(image_id)
        for name, s in self._index[cid].siblings.items():
            if s is not None and s.uid == image_id:
                self.get_image_uri(cid)
                return name, str(Path(self._datastore.base_path) / self.cfg.data.sidecar_dir / cid / f"{name}.nii.gz")
        return None

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        cid = self.resolve(image_id)
        case = self._index[cid]
        info = super().get_image_info(cid)
        info.update({"StudyInstanceUID": case.study, "SeriesInstanceUID": cid,
                     "modalities": {self.cfg.modality_names[0]: cid,
                                    **{n: (s.uid if s else None) for n, s in case.siblings.items()}}})
        return info

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        """Scores and strategy stamps for any case, fetched or not (kept in the cache's datastore JSON); 404 for a
        series no case of the PACS holds."""
        self._write_infos({self.resolve(image_id): info})

    def update_image_infos(self, infos: Mapping[str, dict[str, Any]]) -> list[str]:
        """:meth:`update_image_info` for many cases with one write; returns the ids no case of the PACS holds (any
        other case has an entry to update, fetched or not)."""
        cids, missing = {}, []
        for image_id, info in infos.items():
            try:
                cids[self.resolve(image_id)] = info
            except HTTPException as e:
                if isinstance(e, PacsUnavailable):
                    raise
                missing.append(image_id)
        if cids:
            self._write_infos(cids)
        return missing

    def _write_infos(self, infos: Mapping[str, dict[str, Any]]) -> None:
        """Merge infos by case id into the cache's datastore JSON: one locked re-read, one write."""
        with FileLock(self._lock_file):
            self._reload_unlocked(force=True)  # after whatever another process wrote in the same mtime tick
            for cid, info in infos.items():
                obj = self._datastore.objects.setdefault(cid, ImageLabelModel(image=DataModel(info={}, ext=".nii.gz")))
                obj.image.info.update(info)
            self._update_datastore_file(lock=False)

    # ---- labels ------------------------------------------------------------------------------------------------
    def _pacs_labels(self) -> dict[str, str]:
        """Case id -> the newest SEG series UID (by SeriesDate/Time) referencing its primary series."""
        self.refresh_index()
        newest: dict[str, tuple[str, str]] = {}
        for uid, (_, ref, _, when) in self._segs.items():
            if ref in self._index and (ref not in newest or when >= newest[ref][0]):
                newest[ref] = (when, uid)
        return {ref: uid for ref, (_, uid) in newest.items()}

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        tag = label_tag or FINAL
        local = {i for i in CrossModalDatastore.get_labeled_images(self, tag) if i in self._index}
        return sorted(local | (set(self._pacs_labels()) if tag == FINAL else set()))

    def get_unlabeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        return sorted(set(self.list_images()) - set(self.get_labeled_images(label_tag)))

    def _sync_label(self, cid: str, seg_uid: str) -> None:
        """Bring the PACS's SEG ``seg_uid`` of case ``cid`` into the cache as a NIfTI label (once per SEG)."""
        self._fresh()
        obj = self._datastore.objects.get(cid)
        have = obj.labels.get(FINAL) if obj else None
        if have is not None and have.info.get("SegSeriesInstanceUID") == seg_uid:
            return
        if have is not None and have.info.get("pacs") == "pending":
            return  # a newer local save waits for upload
        image = self.get_image_uri(cid)
        study, _, kind, _ = self._segs[seg_uid]
        tmp_dir = staging_folder(self._datastore.base_path, ".seg-")
        try:
            from monailabel.datastore.utils.dicom import dicom_web_download_series

            try:
                dicom_web_download_series(study, seg_uid, str(tmp_dir), self.client)
            except requests.RequestException as e:
                raise PacsUnavailable(self.url, f"fetching SEG {seg_uid}", e) from e
            ref = load_volume(image, cid)
            arr = seg_to_label(next(tmp_dir.glob("*.dcm")), self.label_config, ref.affine.numpy(), ref.shape[1:])
            nii = tmp_dir / f"{cid}.nii.gz"
            save_volume(nii, arr, ref.affine.numpy())
            stored = {"SegSeriesInstanceUID": seg_uid, "pacs": "stored", "allow_empty": True}  # the PACS's, as is
            CrossModalDatastore.save_label(self, cid, str(nii), FINAL,
                                           {"label_kind": kind, **stored} if kind else stored)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        cid = self.resolve(image_id or label_id)
        if label_tag == FINAL:
            seg = self._pacs_labels().get(cid)
            if seg:
                self._sync_label(cid, seg)
        return super().get_label_uri(cid, label_tag)

    def label_kind(self, image_id: str, tag: str = FINAL) -> str:
        return super().label_kind(self.resolve(image_id), tag)

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """Refused (422): the cases are the PACS's studies. The local add answered 200, wrote the upload into this
        server's cache folder and listed it as a case the PACS never got."""
        raise HTTPException(status_code=422, detail=(
            f"case {image_id!r}: this server's cases are the studies on the PACS at {self.url}; store the study there "
            f"(e.g. `crossmodal data to-dicom --studies DIR --upload {self.url}`): it is listed within "
            f"{self.list_ttl:g} s"))

    def remove_image(self, image_id: str) -> None:
        """Refused (422): a study is removed on the PACS. The local remove answered 500 after dropping the case from
        the datastore's listing."""
        raise HTTPException(status_code=422, detail=(
            f"case {image_id!r}: this server's cases are the studies on the PACS at {self.url}; remove the study "
            "there"))

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """Validate and cache the label (HTTP 422 on a bad one, nothing written); a ``final`` one goes to the PACS
        as DICOM SEG (HTTP 503 when unreachable: the label is kept and stored later)."""
        cid = self.resolve(image_id, flush=False)  # this save replaces a pending label of the case: no double upload
        try:
            primary = self.get_image_uri(cid)
        except CaseError as e:  # its series do not read: a 422 naming it (was a 500)
            raise http_error(e) from e
        grid, upload = self.viewer_grid(image_id), label_filename
        if grid is not None:  # drawn on a secondary series (OHIF's active viewport): onto the primary grid
            try:
                label_filename = labels_onto_grid(label_filename, grid[1], primary, cid)
            except CaseError as e:
                raise http_error(CaseError(cid, None, f"uploaded {label_tag!r} label: {e.problem}")) from e
        info = dict(label_info or {})
        if label_tag == FINAL:
            info["pacs"] = "pending"
        try:
            super().save_label(cid, label_filename, label_tag, info)
        finally:
            if label_filename != upload:  # our regridded copy (it stayed in the temp folder on every such save)
                os.remove(label_filename)
        if label_tag == FINAL:
            self._upload(cid)
        return cid

    def _upload(self, cid: str) -> None:
        """Store the cached final label of ``cid`` in the PACS as DICOM SEG; 503 (label kept pending) on failure."""
        info = self.get_label_info(cid, FINAL)
        label = CrossModalDatastore.get_label_uri(self, cid, FINAL)
        case = self._index[cid]
        series_dir = self.dicom_dir(case.primary.uid)
        try:  # dcmqi on single-frame series, highdicom on an enhanced (multi-frame) one
            seg = label_to_seg(label, series_dir, self.label_config, info.get("label_kind", "dense"))
        except RuntimeError as e:  # never stored, so not retried on each request as a pending one is
            self.update_label_info(cid, FINAL, {"pacs": "not stored", "pacs_error": str(e)})
            raise HTTPException(status_code=422, detail=(
                f"case {cid!r}: the label is saved on this server ({label}) and trains, but it cannot be stored in "
                f"the PACS as DICOM SEG: {e}")) from e
        try:
            from pydicom import dcmread

            ds = dcmread(str(seg))
            if ds.SOPClassUID != SEG_SOP_CLASS:
                raise RuntimeError(f"the SEG writer wrote SOP class {ds.SOPClassUID}, not DICOM SEG")
            # UIDs from the label's content: a retry after a timeout the PACS did serve stores no second copy
            digest = hashlib.sha256(Path(label).read_bytes()).hexdigest()
            ds.SeriesInstanceUID = generate_uid(entropy_srcs=["series", cid, digest])
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[cid, digest])
            try:
                self.client.store_instances([ds])
            except requests.RequestException as e:
                raise PacsUnavailable(self.url, f"storing the label of case {cid} as DICOM SEG", e) from e
        except PacsUnavailable as e:
            e.detail += f"; the label is kept in {label} and will be stored in the PACS on the next request"
            raise
        finally:
            Path(seg).unlink(missing_ok=True)
        self._segs[str(ds.SeriesInstanceUID)] = (case.study, cid, info.get("label_kind"),
                                                 f"{ds.get('SeriesDate', '')}{ds.get('SeriesTime', '')}")
        self.update_label_info(cid, FINAL, {"pacs": "stored", "SegSeriesInstanceUID": str(ds.SeriesInstanceUID)})
        logger.info(f"case {cid}: label stored in {self.url} as SEG {ds.SeriesInstanceUID}")

    def _flush_pending(self) -> None:
        self._fresh()
        for cid, obj in list(self._datastore.objects.items()):
            label = obj.labels.get(FINAL)
            if label is not None and label.info.get("pacs") == "pending" and cid in self._index:
                try:
                    self._upload(cid)
                except PacsUnavailable as e:
                    logger.warning(f"case {cid}: pending label not stored yet: {e.detail}")
                    return

    def pending_labels(self) -> list[str]:
        """Cases whose saved final label waits to be stored in the PACS."""
        self._fresh()
        return sorted(c for c, o in self._datastore.objects.items()
                      if (lab := o.labels.get(FINAL)) is not None and lab.info.get("pacs") == "pending")

    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        """Every labelled case with its image and final label in the cache (labels saved elsewhere included)."""
        for cid, seg in self._pacs_labels().items():
            self._sync_label(cid, seg)
        out = []
        for cid in self.get_labeled_images(FINAL):
            out.append({"image": self.get_image_uri(cid), "label": CrossModalDatastore.get_label_uri(self, cid, FINAL)})
        return out

    def status(self) -> dict[str, Any]:
        labelled = len(self.get_labeled_images())
        return {"total": len(self.list_images()), "completed": labelled, "label_tags": {FINAL: labelled},
                "pending_upload": self.pending_labels(),
                "not_in_pacs": sorted(c for c, o in self._datastore.objects.items()
                                      if (lab := o.labels.get(FINAL)) is not None
                                      and lab.info.get("pacs") == "not stored"),
                "pacs": self.url, "pacs_answering": self.pacs_ok}

    def _record_missing_kinds(self) -> None:
        return None  # labels only enter the cache through save_label, which records the kind

