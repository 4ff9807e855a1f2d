"""Everything the MONAI Label app registers, built from a config preset; ``apps/crossmodal/main.py`` adapts it.

Server ``--conf`` keys (all optional): ``preset`` (a name in ``configs/``, default: the one naming a local studies
folder's modalities, else ``brain``), ``configs_dir``,
``model_dir`` (default ``<app>/model``), ``models`` (comma-separated network names; default the preset's model
and ``baseline_unet``), ``pretrained_<model>`` (weights used until that model is trained; default
``<app>/pretrained/<preset>_<model>.pt`` when present; ``pretrained`` alone names the first model's),
``max_epochs`` (overrides the preset), ``epistemic`` (``true`` adds MONAI Label's Epistemic scoring and strategy,
for comparisons), ``missing_modality`` (``error`` / ``zero_fill``; default the preset's,
``zero_fill`` on a PACS where a study may lack a series), ``mirror_axes`` (test-time mirroring of every infer
request, e.g. ``0,1,2``: 8 passes; default the preset's ``infer.mirror_axes``, none), ``overlap`` (the sliding
window's for every infer request that does not say; default the preset's ``infer.overlap``), ``largest_component``
(comma-separated classes each kept to its largest connected component, ``foreground`` for all of them as one, ``none``;
default the preset's ``infer.largest_component``, none).

With ``--studies http(s)://.../dicom-web`` the datastore is :class:`~crossmodal.serving.dicomweb.PacsDatastore`;
keys ``pacs_cache`` (cache folder; default MONAI Label's DICOMweb cache path or ``~/.cache/crossmodal/dicomweb``),
``pacs_list_ttl`` (seconds a study listing is reused, default 30) and ``pacs_timeout`` (seconds per request,
default 30).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import overload

from crossmodal.config import (
    ConfigError,
    CrossModalConfig,
    as_flag,
    as_number,
    load_config,
    near_miss,
    non_finite_at,
    parse_mirror_axes,
    parse_overlap,
    resolve_preset,
)
from crossmodal.data.studies import check_not_dicom, folder_modalities, guess_preset, modalities
from crossmodal.io import atomic_copy
from crossmodal.nets import ModelFileError, build_network, check_weights
from crossmodal.serving.activelearning import CrossModalScoring, CrossModalStrategy
from crossmodal.serving.datastore import CrossModalDatastore, no_such_case
from crossmodal.serving.grow import CrossModalGrow
from crossmodal.serving.infer import CrossModalInfer
from crossmodal.serving.train import CrossModalTrain
from fastapi import HTTPException
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask

logger = logging.getLogger(__name__)
CONF_KEYS = ("preset", "configs_dir", "model_dir", "models", "pretrained", "max_epochs", "missing_modality",
             "mirror_axes", "overlap", "largest_component", "epistemic", "benchmark_pipelines", "pacs_cache",
             "pacs_list_ttl", "pacs_timeout")
MONAILABEL_CONF_KEYS = ("preload", "server_mode", "zoo_source", "zoo_repo", "auth_token")  # read by MONAI Label


def check_conf_keys(conf: dict[str, str], models: Iterable[str]) -> None:
    """ConfigError naming a ``--conf`` key that neither this app (with ``pretrained_<model>`` for each served model)
    nor MONAI Label reads, with the closest key: a mistyped key was ignored without a word, so ``--conf presett
    phantom`` served the default preset and ``--conf pretrained_crossmodel w.pt`` the shipped weights.

    Example:
        >>> check_conf_keys({"preset": "phantom", "pretrained_crossmodal": "w.pt", "preload": "true"}, ["crossmodal"])
        >>> check_conf_keys({"presett": "phantom"}, ["crossmodal"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        crossmodal.config.ConfigError: --conf presett: not a key of this app; did you mean 'preset'? Its keys: ...
    """
    models = list(models)
    known = set(CONF_KEYS) | {f"pretrained_{m}" for m in models}
    for key in sorted(conf):
        if key not in known and key not in MONAILABEL_CONF_KEYS:
            close = near_miss([key], known, cutoff=0.6)  # it is refused anyway: the closest key, if any is at all
            hint = f"; did you mean {close[1]!r}?" if close else "."
            if key.startswith("pretrained_"):
                raise ConfigError(f"--conf {key}: no model {key[len('pretrained_'):]!r} is served here{hint} Served: "
                                  f"{', '.join(models)} (--conf models picks them)")
            raise ConfigError(f"--conf {key}: not a key of this app{hint} Its keys: {', '.join(sorted(known))}")


@overload
def conf_number(conf: dict[str, str], key: str, kind: type = int, default: None = None,
                zero: bool = False) -> float | None: ...
@overload
def conf_number(conf: dict[str, str], key: str, kind: type, default: float, zero: bool = False) -> float: ...


def conf_number(conf: dict[str, str], key: str, kind: type = int, default: float | None = None,
                zero: bool = False) -> float | None:
    """``--conf key value`` as a positive (``zero``: or 0) ``kind`` (int / float), ``default`` when absent;
    ConfigError naming the key otherwise.

    Example:
        >>> conf_number({"max_epochs": "3"}, "max_epochs"), conf_number({}, "pacs_timeout", float, 30.0)
        (3, 30.0)
        >>> conf_number({"max_epochs": "abc"}, "max_epochs")
        Traceback (most recent call last):
        ...
        crossmodal.config.ConfigError: --conf max_epochs 'abc': must be a positive int
    """
    raw = conf.get(key)
    if raw in (None, ""):
        return default
    value = as_number(raw, kind)
    if value is None or not (value > 0 or (zero and value == 0)):
        raise ConfigError(f"--conf {key} {raw!r}: must be a {'non-negative' if zero else 'positive'} {kind.__name__}")
    return value


def conf_flag(conf: dict[str, str], key: str) -> bool:
    """``--conf key true|false`` (absent: false); ConfigError naming the key for anything else (``yes``-like
    spellings as :func:`crossmodal.config.as_flag` reads them).

    Example:
        >>> conf_flag({"epistemic": "True"}, "epistemic"), conf_flag({}, "epistemic")
        (True, False)
        >>> conf_flag({"epistemic": "on"}, "epistemic")
        Traceback (most recent call last):
        ...
        crossmodal.config.ConfigError: --conf epistemic 'on': must be true or false
    """
    raw = conf.get(key)
    flag = False if raw in (None, "") else as_flag(raw)
    if flag is None:
        raise ConfigError(f"--conf {key} {raw!r}: must be true or false")
    return flag


def not_served(kind: str, name: object, served: Iterable[str]) -> HTTPException:
    """404 for a model / strategy name the app does not serve, listing those it does."""
    return HTTPException(status_code=404, detail=f"{kind} {name!r} is not served here; served: {sorted(served)}")


def refuse_non_finite(request: dict, what: str) -> None:
    """422 for a request holding NaN or Infinity (Python's ``json`` reads them; JSON has neither): a next-sample
    request's ``client_id`` NaN was recorded in the case's info, and the listing and that case's info were 500s.

    Example:
        >>> refuse_non_finite({"client_id": float("nan")}, "next-sample request")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        fastapi.exceptions.HTTPException: 422: next-sample request: `client_id` is NaN or Infinity, which JSON does ...
    """
    where = non_finite_at(request)
    if where is not None:
        raise HTTPException(status_code=422, detail=f"{what}: `{where}` is NaN or Infinity, which JSON does not have; "
                                                    "send a number or null")


INFER_REQUEST_KEYS = ("drop_modalities", "mc_samples", "result_extension", "result_dtype", "result_compress", "label",
                      "label_info")  # read by the infer tasks beside their options (:meth:`config`)


BATCH_REQUEST_KEYS = ("image", "model", "images", "multi_gpu", "gpus", "logging", "save_label", "label_tag",
                      "max_workers", "max_batch_size")  # MONAI Label's batch infer's own (which each case's request
# carries), beside each case's infer options; ``image`` and ``model`` so that neither reads as a typo of the others


def check_batch_infer_request(request: dict, infers: Mapping[str, InferTask]) -> None:
    """A batch infer request checked before MONAI Label queues it (it answered 200 "SUBMITTED" to any, and each
    case then failed in the background process with the request's error): 404 for an unknown model, 422 for a
    number that is NaN / Infinity, a key that nearly is one of the model's options, or an option the model's
    ``check_request`` refuses (a bad ``device``, ``mirror_axes``, ...)."""
    model = request.get("model")
    if model not in set(infers):
        raise not_served("model", model, infers)
    refuse_non_finite(request, "batch infer request")
    if typo := near_miss(request, [*infers[model].config(), *INFER_REQUEST_KEYS, *BATCH_REQUEST_KEYS]):
        raise HTTPException(status_code=422, detail=f"batch infer request: {typo[0]} is not an option of model "
                                                    f"{model!r}; did you mean {typo[1]}?")
    check = getattr(infers[model], "check_request", None)
    if check is not None:
        check(request, prefix="batch infer request: ")


def check_infer_request(request: dict, infers: Mapping[str, InferTask], datastore: Datastore) -> None:
    """404 for an unknown model, or an image id that is neither a file (an upload) nor a case of a local datastore
    (MONAI Label would hand the network an empty path; a PACS datastore answers 404 itself); 422 for a key that is
    not one of the model's options but nearly is (``mirror_axis``: it was ignored, the case segmented unmirrored)."""
    model = request.get("model")
    if model not in set(infers):
        raise not_served("model", model, infers)
    options = [*infers[model].config(), *INFER_REQUEST_KEYS, *BATCH_REQUEST_KEYS]  # a batch's case carries those:
    # MONAI Label's default batch request (max_batch_size, "did you mean sw_batch_size?") failed every case
    if typo := near_miss(request, options):
        raise HTTPException(status_code=422, detail=f"image {request.get('image')!r}: infer request: {typo[0]} is not "
                                                    f"an option of model {model!r}; did you mean {typo[1]}?")
    image = request.get("image")
    if image == "":  # what MONAI Label leaves for a session id it does not know (an expired session, say)
        raise HTTPException(status_code=404, detail="no image to segment: name a case (image=<id>), send a file, or "
                                                    "give a session_id that exists (sessions expire; PUT /session/ "
                                                    "makes one)")
    local = type(datastore) is CrossModalDatastore  # not PacsDatastore: get_image_uri would fetch the series
    if isinstance(image, str) and local and not os.path.exists(image) and not datastore.get_image_uri(image):
        raise no_such_case(image)


def scoring_cache_dir(root: str, studies: str) -> str:
    """``<root>/<name>-<digest>``: the scoring cache of the datastore at ``studies`` (a folder, by its real path, or
    a DICOMweb URL), ``name`` its last part for people to read. Inputs cached by an earlier version directly in
    ``root`` move into the first such folder made (each is checked against its case's files before use, and the
    datastore's scoring removes those of cases it does not hold).

    Example:
        >>> import tempfile; root = tempfile.mkdtemp()
        >>> a = scoring_cache_dir(root, "http://pacs:8042/dicom-web/")
        >>> Path(a).name.startswith("dicom-web-"), a == scoring_cache_dir(root, "http://pacs:8042/dicom-web")
        (True, True)
    """
    where = studies.rstrip("/")
    key = where if where.startswith(("http://", "https://")) else os.path.realpath(where)
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in os.path.basename(key))[:40] or "studies"
    path = Path(root) / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if not path.is_dir():
        old = sorted(Path(root).glob("*.pt")) if Path(root).is_dir() else []
        path.mkdir(parents=True, exist_ok=True)
        for file in old:
            with contextlib.suppress(OSError):  # another server moved it first
                os.replace(file, path / file.name)
    return str(path)


@dataclass
class ModelParts:
    """One registered model: its config (``cfg.model.name`` set), published and pretrained weight paths."""

    cfg: CrossModalConfig
    published: str
    pretrained: str | None

    @property
    def name(self) -> str:
        return self.cfg.model.name


def warn_unfit_preset(studies: Path, cfg: CrossModalConfig, preset: str, configs_dir: str | None = None) -> bool:
    """Log a warning where the secondary modality files under ``studies`` are not all ``cfg``'s (a preset given
    with ``--conf preset`` that the cases do not fit), naming the files, what the preset takes and the preset they
    fit where one does; True where it warned."""
    seen = folder_modalities(studies, cfg.data.sidecar_dir)
    other = sorted(seen - {m.lower() for m in cfg.modality_names[1:]})
    if not other:
        return False
    try:
        fit, _ = guess_preset(studies, preset, configs_dir)
        hint = f"; they fit preset {fit!r} (--conf preset {fit})" if fit != preset else ""
    except ConfigError:
        hint = ""
    lacking = [m for m in cfg.modality_names[1:] if m.lower() not in seen]
    effect = (f"and no file of {', '.join(lacking)}: each such case is a 422 at infer ('modality ... is missing') and "
              "stops a training (unless missing_modality zero_fill)" if lacking else "which are not read")
    logger.warning(f"--conf preset {preset}: the cases under {studies} have modality files of {', '.join(other)}, "
                   f"which it does not take ({modalities(cfg)}), {effect}{hint}")
    return True


TASK_PROCESS = "monailabel.interfaces.utils.app"  # MONAI Label's train / scoring / batch infer processes run this


def stop_when_orphaned(interval_s: float = 2.0, main_module: str | None = None) -> threading.Thread | None:
    """In a task process of MONAI Label (``python -m monailabel.interfaces.utils.app -m train``, ``scoring``,
    ``batch_infer``): a daemon thread that ends the process, and the processes it started (data-parallel trainers,
    loader workers), once the server that started it is gone. A server stopped by SIGTERM (``docker stop``, systemd,
    ``kill``) left its training running, unseen, with no server to stop it, still publishing models into the model
    folder, beside the training the next server starts. Returns the thread; None in any other process (a command
    line training run under ``nohup`` outlives its shell on purpose). ``main_module``: the ``__main__`` module's
    name, read from ``sys.modules`` when not given."""
    if main_module is None:
        main_module = getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", None)
    if main_module != TASK_PROCESS:
        return None
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        logger.warning(f"the MONAI Label server (pid {parent}) that started this task is gone: stopping it")
        import psutil

        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
        os.kill(os.getpid(), signal.SIGKILL)  # as the server's own stop does (DELETE /train/): files are atomic

    thread = threading.Thread(target=watch, name="stop-when-orphaned", daemon=True)
    thread.start()
    return thread


@dataclass
class AppParts:
    """The resolved config and the app's models; the first model is the preset's ``model.name``."""

    cfg: CrossModalConfig
    preset: str
    model_dir: str
    models: list[ModelParts]

    @classmethod
    def from_conf(cls, app_dir: str, conf: dict[str, str], pacs: bool = False, studies: str | None = None
                  ) -> AppParts:
        """The app's parts from the server's ``--conf``; without ``preset``, a local ``studies`` folder's cases pick
        the preset that names their modalities (:func:`crossmodal.data.studies.guess_preset`; ``brain`` where they
        are its own or the folder is empty), a PACS's studies the one whose series they have
        (:func:`crossmodal.dicom.guess_dicom_preset`; ``brain`` where it fits, none does or the PACS does not
        answer). An nnU-Net dataset as ``studies`` stops the server here:
        MONAI Label served it as a folder of no case, its images being under ``imagesTr``."""
        preset = conf.get("preset", "brain")
        local = Path(studies) if studies and not pacs else None
        if local and (local / "dataset.json").is_file() and (local / "imagesTr").is_dir():
            raise ConfigError(f"--studies {studies}: an nnU-Net dataset (dataset.json, imagesTr); the server takes a "
                              f"studies folder: `crossmodal data import-nnunet --dataset {studies} --out <studies>`, "
                              "then start it on <studies>")
        if local:
            try:
                check_not_dicom(local)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        why = None
        if "preset" not in conf and local:
            preset, why = guess_preset(local, preset, conf.get("configs_dir"))
        elif "preset" not in conf and pacs and studies:  # the PACS's series (its CT + PET studies listed no case
            # under the brain's default, a warning the only sign)
            from crossmodal.dicom import guess_dicom_preset
            from crossmodal.serving.dicomweb import PacsUnavailable, pacs_series

            try:
                series = pacs_series(studies, conf_number(conf, "pacs_timeout", float, 30.0))
            except PacsUnavailable as e:
                logger.warning(f"{e.detail}: --conf preset not given, and the PACS cannot say which fits; serving "
                               f"{preset!r}")
                series = []
            preset, why = guess_dicom_preset(series, preset, studies, conf.get("configs_dir"), "--conf preset")
        if why:
            logger.info(why.replace("--config not given", "--conf preset not given"))
        epochs = conf_number(conf, "max_epochs")
        overrides: dict = {"train": {"max_epochs": epochs}} if epochs else {}
        missing = conf.get("missing_modality") or ("zero_fill" if pacs else None)
        if missing:
            overrides["infer"] = {"missing_modality": missing}
        if conf.get("mirror_axes") is not None:
            overrides.setdefault("infer", {})["mirror_axes"] = parse_mirror_axes(conf["mirror_axes"],
                                                                                 "--conf mirror_axes")
        if conf.get("overlap") is not None:
            overrides.setdefault("infer", {})["overlap"] = parse_overlap(conf["overlap"], "--conf overlap")
        if conf.get("largest_component") is not None:
            overrides.setdefault("infer", {})["largest_component"] = conf["largest_component"]  # checked by the config
        cfg = load_config(preset, conf.get("configs_dir"), overrides or None)
        if local and "preset" in conf:  # a preset given that the folder's cases do not fit: every request a 422
            # naming a missing modality, with nothing at start to say why
            warn_unfit_preset(local, cfg, preset, conf.get("configs_dir"))
        model_dir = conf.get("model_dir") or os.path.join(app_dir, "model")
        os.makedirs(model_dir, exist_ok=True)
        names = [n.strip() for n in conf.get("models", "").split(",") if n.strip()] or \
            list(dict.fromkeys([cfg.model.name, "baseline_unet"]))
        check_conf_keys(conf, names)
        models = []
        for i, name in enumerate(names):
            mcfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=name))
            build_network(mcfg)  # an unknown name fails here, with the valid names
            file = f"{cfg.name}_{name}.pt"
            default_pre = Path(app_dir) / "pretrained" / file
            pre = conf.get(f"pretrained_{name}") or (conf.get("pretrained") if i == 0 else None) or \
                (str(default_pre) if default_pre.is_file() else None)
            if pre and not os.path.isfile(pre):
                raise FileNotFoundError(f"conf pretrained for {name}: {pre}: no such weights file")
            published = os.path.join(model_dir, file)
            for weights in (pre, published):  # a broken or foreign file says so now, not as a 500 on each request
                if weights and os.path.isfile(weights):
                    try:
                        check_weights(mcfg, weights)
                    except ModelFileError as e:
                        if weights != str(default_pre) or pre != str(default_pre) or \
                                resolve_preset(preset, conf.get("configs_dir")).stem == cfg.name:
                            raise
                        raise ModelFileError(  # a user's YAML extending a preset inherits its name and weights
                            f"{e}. Your config {preset} is named {cfg.name!r} (from the preset it extends), so the "
                            f"weights shipped for {cfg.name!r} were picked; give it its own `name:` to start "
                            "untrained, or name weights that fit with --conf pretrained_<model>") from e
            models.append(ModelParts(mcfg, published, pre))
        return cls(cfg, preset, model_dir, models)

    @property
    def model_name(self) -> str:
        return self.models[0].name

    @property
    def published(self) -> str:
        return self.models[0].published

    def replace_weights(self, model: str, path: str) -> str:
        """``PUT /model/<model>``: the weights file ``path`` (the upload) replaces the model in service, atomically,
        if it loads into that model's network; returns the published path. 404 for a model that is not served, 422
        naming the problem for weights that do not load (upstream copied any file over the model in place: a
        truncated or foreign one turned every infer into a 500, and the model it replaced was gone)."""
        served = {m.name: m for m in self.models}
        if model not in served:
            raise not_served("model with weights", model, served)
        try:
            check_weights(served[model].cfg, path)
        except ModelFileError as e:
            detail = str(e).replace(f"model {path}:", f"model {model!r}: the uploaded file")
            raise HTTPException(status_code=422, detail=f"{detail}; the model in service stays") from e
        atomic_copy(path, served[model].published)
        return served[model].published

    def delete_weights(self, model: str) -> dict[str, str | None]:
        """``DELETE /model/<model>``: the trained (published) weights go out of service, moved aside as
        ``<file>.<time>.deleted``; the model's shipped weights (``pretrained``) serve again. Upstream moved whichever
        file was in service, the app's committed weights too when nothing had been trained. 404 for a model that is
        not served or has no trained weights. Returns the backup's and the weights' now in service file names."""
        served = {m.name: m for m in self.models}
        if model not in served:
            raise not_served("model with weights", model, served)
        m = served[model]
        shipped = f"the shipped weights {Path(m.pretrained).name} serve" if m.pretrained else "no weights serve"
        if not os.path.isfile(m.published):
            raise HTTPException(status_code=404, detail=f"model {model!r}: no trained weights to delete ({shipped}; "
                                                        "they are never deleted)")
        backup = f"{m.published}.{time.strftime('%Y%m%d_%H%M%S')}.deleted"
        os.replace(m.published, backup)
        return {"deleted": Path(backup).name, "in_service": Path(m.pretrained).name if m.pretrained else None}

    def datastore(self, studies: str, conf: dict[str, str] | None = None) -> Datastore:
        """The local studies folder, or a PACS when ``studies`` is a DICOMweb URL."""
        conf = conf or {}
        if studies.startswith(("http://", "https://")):
            from crossmodal.serving.dicomweb import PacsDatastore
            from monailabel.config import settings

            cache = conf.get("pacs_cache") or (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip() or None
            ttl = conf_number(conf, "pacs_list_ttl", float, 30.0, zero=True)
            return PacsDatastore(studies, self.cfg, cache, list_ttl=ttl,
                                 timeout=conf_number(conf, "pacs_timeout", float, 30.0))
        return CrossModalDatastore(studies, self.cfg.labels, self.cfg.modality_names, self.cfg.data.sidecar_dir)

    def describe(self) -> str:
        """What the server serves, for its log at start: the preset, its modalities and classes, and the weights each
        model segments with (the published ones where a training run left them, else the pretrained ones)."""
        served = []
        for m in self.models:
            if os.path.isfile(m.published):
                weights = f"{m.published} (trained here)"
            elif m.pretrained and os.path.isfile(m.pretrained):
                weights = f"{m.pretrained} (pretrained)"
            else:
                weights = "no weights yet: it segments nothing useful until a training run publishes some"
            served.append(f"{m.name}: {weights}")
        return (f"serving preset {self.preset!r}: modalities {', '.join(self.cfg.modality_names)} (the first the "
                f"primary), classes {', '.join(self.cfg.labels.foreground)}; {'; '.join(served)}")

    def infer(self, model: ModelParts | None = None, epistemic: bool = False) -> CrossModalInfer:
        """The infer task of ``model`` (default the first); ``epistemic``: dropout on, probabilities out, no writer
        (what MONAI Label's Epistemic scoring samples)."""
        m = model or self.models[0]
        paths = [p for p in (m.pretrained, m.published) if p]
        return CrossModalInfer(m.cfg, build_network(m.cfg), paths,
                               f"{m.name} on {self.cfg.modality_names} ({self.preset})", train_mode=epistemic,
                               probabilities=epistemic)

    def grow(self) -> CrossModalGrow:
        """The scribbles task: an annotator's strokes grown along the images' edges (no network)."""
        return CrossModalGrow(self.cfg, f"strokes grown over {self.cfg.modality_names} by the random walker "
                                        f"({self.preset}); draw classes and {self.cfg.labels.marked_background_name}")

    def trainer(self, model: ModelParts | None = None) -> CrossModalTrain:
        m = model or self.models[0]
        return CrossModalTrain(m.cfg, self.model_dir, m.published, m.pretrained,
                               f"Train {m.name} from dense and sparse labels (partial loss)")

    def strategy(self, scoring: Callable[[], CrossModalScoring | None] | None = None) -> CrossModalStrategy:
        """The cross-modal strategy; ``scoring`` gives the scoring it runs where nothing is scored yet."""
        return CrossModalStrategy(self.cfg, scoring=scoring)

    def scoring(self, infer: CrossModalInfer, studies: str | None = None) -> CrossModalScoring:
        """The cross-modal scoring, its cached inputs in ``<model_dir>/scoring_cache`` or, given the server's
        ``studies`` (a folder or a DICOMweb URL), in a folder of that datastore's there (:func:`scoring_cache_dir`):
        servers of different studies that share a model dir then keep apart the inputs that each prunes to its
        own cases."""
        root = os.path.join(self.model_dir, "scoring_cache")
        return CrossModalScoring(self.cfg, infer, scoring_cache_dir(root, studies) if studies else root)

    def epistemic(self) -> tuple:
        """MONAI Label's Epistemic scoring (5 dropout samples through the full infer task) and strategy."""
        from monailabel.tasks.activelearning.epistemic import Epistemic
        from monailabel.tasks.scoring.epistemic_v2 import EpistemicScoring

        return EpistemicScoring(self.infer(epistemic=True), simulation_size=5), Epistemic()
