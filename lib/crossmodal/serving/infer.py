"""The app's infer task: all modalities of a case in, a label map on the primary grid out."""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from crossmodal.active import predictive_entropy
from crossmodal.config import (
    FOREGROUND,
    ConfigError,
    CrossModalConfig,
    InferConfig,
    as_number,
    other_windows,
    parse_largest_component,
    parse_mirror_axes,
    parse_overlap,
    parse_sw_batch_size,
    served_config,
    written_temp,
)
from crossmodal.errors import CaseError, cause_of_type
from crossmodal.inference import NetworkInferer
from crossmodal.io import IMAGE_EXTENSIONS, case_id_of, format_mm, save_volume, voxel_mm
from crossmodal.nets import CrossModalNet, is_record_key, unwrap, weights_voxel_mm, weights_windows
from crossmodal.serving.datastore import http_error, request_device
from crossmodal.transforms import preprocessing, to_primary_grid, to_primary_labels
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import KeepLargestConnectedComponent
from monailabel.interfaces.tasks.batch_infer import BatchInferTask
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from torch import nn

logger = logging.getLogger(__name__)

_TOLD: set[tuple[str | None, tuple]] = set()  # (model, its size or its CT windows) said once
MAX_MC_SAMPLES = 64  # Monte-Carlo dropout passes one uncertainty request may ask for


class RecordsOnly(logging.Filter):
    """Drops MONAI Label's two warnings on loading weights whose keys differ from the network's by our records alone
    (:data:`~crossmodal.nets.VOXEL_KEY`, ``inputs.*``, ``classes.*``), as weights saved before a record existed (the
    committed ones) do: "Checkpoint keys don't match network.state_dict()! ..." and "The run will now continue unless
    load_strict is set to True ... please check the loaded weights", at every model load of the server, ``predict``
    and ``evaluate``. Such weights load with the record as not known; the task loads strictly, so any other key
    stops the load with torch's error, and its warnings pass."""

    MISMATCH = "Checkpoint keys don't match network.state_dict()!"
    CONTINUE = "The run will now continue unless load_strict"

    def __init__(self) -> None:
        super().__init__()
        self.dropped = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if text.startswith(self.MISMATCH):
            self.dropped.last = all(map(is_record_key, re.findall(r"'([^']*)'", text.partition(": ")[2])))
            return not self.dropped.last
        if text.startswith(self.CONTINUE) and getattr(self.dropped, "last", False):
            self.dropped.last = False
            return False
        return True


logging.getLogger(BasicInferTask.__module__).addFilter(RecordsOnly())


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.as_tensor() if isinstance(t, MetaTensor) else t


def keep_largest_components(foreground: dict[str, int], names: Sequence[str]
                            ) -> list[KeepLargestConnectedComponent]:
    """MONAI's ``KeepLargestConnectedComponent`` (26-connected) for ``infer.largest_component`` ``names``: each
    named class kept to its largest component, then, with ``foreground``, every foreground class as one; each takes
    and gives a (1, H, W, D) class map, what it drops set to background (0)."""
    named = [foreground[n] for n in names if n != FOREGROUND]
    steps = [KeepLargestConnectedComponent(applied_labels=named, is_onehot=False, independent=True)] if named else []
    if FOREGROUND in names:
        steps.append(KeepLargestConnectedComponent(applied_labels=sorted(foreground.values()), is_onehot=False,
                                                   independent=False))
    return steps


class ArgmaxLabel:
    """``data["pred"]`` {name: logits (C, H, W, D)} -> uint8 map (H, W, D) on the primary grid + result JSON.

    ``data["prediction"]``: ``fused`` (default), a modality name (that modality's own head), or ``uncertainty``
    (normalised entropy of the fused softmax, averaged over ``data["mc_probs"]`` samples when present, in percent).
    ``largest``: a class map's clean-up (:func:`keep_largest_components`; ``infer.largest_component``).
    """

    def __init__(self, largest: Sequence[KeepLargestConnectedComponent] = ()) -> None:
        self.largest = list(largest)

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        outputs = data["pred"]
        which = data.get("prediction") or "fused"
        fused = outputs["fused"]
        if data.get("keep_probs"):
            data["logits"] = fused.as_tensor() if isinstance(fused, MetaTensor) else fused
        image = data["image"]
        if which == "uncertainty":
            probs = to_primary_grid(data.get("mc_probs", torch.softmax(_plain(fused).float(), 0)), image)
            ent = predictive_entropy(probs[None])
            out = torch.round(ent * 100).clamp(0, 100).to(torch.uint8)
        else:
            if which not in outputs:
                raise http_error(ValueError(f"case {data.get('case_id')!r}: prediction {which!r} is not available; "
                                            f"choose one of {[*outputs, 'uncertainty']}"))
            out = to_primary_labels(_plain(outputs[which]), image)
            for keep in self.largest:
                out = torch.as_tensor(keep(out[None]))[0]
        # computed where the network ran (a GPU too); the map comes back to the CPU for the writer (numpy)
        data["pred"] = MetaTensor(out.cpu(), affine=image.meta.get("primary_affine", image.affine))
        data["result"] = {"case": data.get("case_id"), "modalities_used": data.get("modalities_used", []),
                          "registered_mm": dict(image.meta.get("registered_mm", {})),
                          "coverage": dict(image.meta.get("coverage", {})), "prediction": which,
                          "voxel_mm": {"case": voxel_mm(image.meta.get("primary_affine", image.affine)),
                                       "network": voxel_mm(image.affine)}}
        return data


class FusedProbabilities:
    """``data["pred"]`` {name: logits (C, H, W, D)} -> softmax of the fused logits (C, H, W, D)."""

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        # a MetaTensor (MONAI Label's Epistemic logs np.sum(pred), which a plain tensor rejects), on the CPU, where
        # Epistemic reduces the samples with numpy anyway
        data["pred"] = MetaTensor(torch.softmax(_plain(data["pred"]["fused"]).float(), 0).cpu())
        return data


class CrossModalInfer(BasicInferTask):
    """Segmentation from every modality of a case; returns which modalities were used.

    Request params: ``missing_modality`` (``error`` / ``zero_fill``: segment with the modalities present),
    ``prediction`` (``fused``, a modality name for that modality's own head, or ``uncertainty``, a 0-100 map),
    ``mc_samples`` (Monte-Carlo dropout samples for ``uncertainty``), ``drop_modalities`` (names, or a comma-
    separated string, to segment without although present), ``mirror_axes`` (test-time mirroring: spatial axes as
    a list or ``"0,1,2"``, ``"none"``; default ``infer.mirror_axes``), ``overlap`` / ``sw_batch_size`` (the sliding
    window's, for a case larger than one window; default ``infer.*``), ``largest_component`` (classes kept to their
    largest connected component, e.g. ``"grey_matter,white_matter"``, ``"none"``; default
    ``infer.largest_component``), ``device``, ``result_extension``
    (``.nii.gz`` / ``.nii`` / ``.seg.nrrd`` / ``.nrrd``; anything else is a 422), and the usual MONAI Label ones.
    The result's params name the case, the modalities used, the motion (mm) by which each secondary modality was
    co-registered, and the prediction.
    """

    uploaded = "uploaded label"  # a request's `label` upload in messages (its temp path means nothing to the user)

    def __init__(self, cfg: CrossModalConfig, network: nn.Module, path: Sequence[str], description: str,
                 train_mode: bool = False, probabilities: bool = False) -> None:
        """``train_mode`` + ``probabilities``: the task MONAI Label's Epistemic scoring samples (dropout on, no
        writer, ``data["pred"]`` = fused class probabilities (C, H, W, D) on the working grid)."""
        super().__init__(
            path=list(path), network=network, type=InferType.SEGMENTATION, labels=cfg.labels.viewer_labels,
            dimension=3, description=description, roi_size=cfg.infer.roi_size, load_strict=True,
            config={"missing_modality": cfg.infer.missing_modality, "prediction": "fused",
                    "mirror_axes": ",".join(map(str, cfg.infer.mirror_axes)) or "none",
                    "overlap": cfg.infer.overlap, "sw_batch_size": cfg.infer.sw_batch_size,
                    "largest_component": ",".join(cfg.infer.largest_component) or "none"}, train_mode=train_mode,
            skip_writer=probabilities,
        )
        self.cfg = cfg
        self.probabilities = probabilities

    def heads(self) -> list[str]:
        """The modalities whose own head this model has (``prediction=<modality>``): every one for the cross-modal
        network, none for the early-fusion baseline."""
        return list(self.cfg.modality_names) if isinstance(unwrap(self.network), CrossModalNet) else []

    def pre_transforms(self, data: dict[str, Any] | None = None) -> Sequence[Callable]:
        missing = (data or {}).get("missing_modality") or self.cfg.infer.missing_modality
        if missing not in ("error", "zero_fill"):
            raise http_error(ValueError(f"missing_modality {missing!r} is not one of ('error', 'zero_fill')"))
        drop = (data or {}).get("drop_modalities") or []
        drop = [d.strip() for d in drop.split(",") if d.strip()] if isinstance(drop, str) else list(drop)
        return list(preprocessing(self.working_config(), "infer", missing=missing, drop=drop).transforms)

    def working_config(self) -> CrossModalConfig:
        """The preset as the model in service reads cases (:func:`~crossmodal.config.served_config`): at the voxel
        size its weights record having been trained at, where the preset's ``data.spacing`` is null or far from it,
        and at the CT windows they record (each said once per model file: a preset edited after its model was trained
        segmented every case at the new size or window, silently)."""
        path = self.get_path()
        trained, recorded = weights_voxel_mm(path), weights_windows(path)
        cfg = served_config(self.cfg, trained, recorded)
        if trained and self.cfg.data.spacing and cfg.data.spacing != self.cfg.data.spacing \
                and (path, trained) not in _TOLD:
            _TOLD.add((path, trained))
            logger.warning(f"the preset's data.spacing is {format_mm(self.cfg.data.spacing)} mm and the model "
                           f"{path} was trained at {format_mm(trained)} mm: cases are segmented at "
                           f"{format_mm(trained)} mm, its own; a training run trains at data.spacing (set it to "
                           f"{list(trained)} to keep the model's)")
        windows = other_windows(self.cfg, recorded)
        if windows and (path, tuple(windows.items())) not in _TOLD:
            _TOLD.add((path, tuple(windows.items())))
            preset = {m.name: m.window for m in self.cfg.modalities}
            said = "; ".join(f"{n} window {preset[n][0]:g}..{preset[n][1]:g} in the preset, {w[0]:g}..{w[1]:g} in "
                             "the model" for n, w in windows.items())
            logger.warning(f"the model {path} was trained at other CT windows than the preset's ({said}): cases are "
                           "segmented at the model's; a training run trains at the preset's (set them to the model's "
                           "to keep them)")
        return cfg

    def inferer(self, data: dict[str, Any] | None = None) -> Inferer:
        data = data or {}
        used = set(data.get("modalities_used") or self.cfg.modality_names)
        heads = data.get("prediction", "fused") in self.cfg.modality_names  # a modality's own head was asked for
        # MONAI Label's Epistemic samples (``probabilities``) stay one pass each, as upstream
        mirror = () if self.probabilities else parse_mirror_axes(data.get("mirror_axes", self.cfg.infer.mirror_axes))
        # two passes for a partial field of view where the network can leave a modality out (not early fusion)
        fov = data.get("fov") if self.heads() else None
        return NetworkInferer(self.window_config(data), present=[m in used for m in self.cfg.modality_names],
                              heads=heads, mirror_axes=mirror, fov=fov)

    def window_config(self, data: dict[str, Any]) -> InferConfig:
        """The preset's ``infer`` settings with the request's ``overlap`` / ``sw_batch_size``, when it has them
        (:class:`InferConfig` checks them again; :meth:`__call__` did, naming the case)."""
        asked = {k: data[k] for k in ("overlap", "sw_batch_size") if data.get(k) is not None}
        return dataclasses.replace(self.cfg.infer, **asked) if asked else self.cfg.infer

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda") -> dict[str, Any]:
        """The usual sliding window, or for ``prediction=uncertainty`` only the Monte-Carlo dropout passes."""
        samples = int(data.get("mc_samples", 8))
        network = self._get_network(device, data)
        if data.get("prediction") != "uncertainty" or not isinstance(unwrap(network), CrossModalNet) or samples < 1:
            return super().run_inferer(data, convert_to_batch, device)
        inputs = data["image"].as_tensor()[None].to(torch.device(device))
        used = set(data.get("modalities_used") or self.cfg.modality_names)
        inferer = NetworkInferer(self.window_config(data), present=[m in used for m in self.cfg.modality_names],
                                 fused_only=True, mc_dropout=True, fov=data.get("fov"))
        with torch.no_grad():
            probs = torch.softmax(inferer(inputs, network)[0].float(), 0)
            for _ in range(samples - 1):
                probs += torch.softmax(inferer(inputs, network)[0].float(), 0)
        data["mc_probs"] = (probs / samples).cpu()
        data[self.output_label_key] = {"fused": data["mc_probs"].clamp_min(1e-8).log()}
        return data

    def inverse_transforms(self, data: dict[str, Any] | None = None) -> None:
        return None

    def post_transforms(self, data: dict[str, Any] | None = None) -> Sequence[Callable]:
        if self.probabilities:
            return [FusedProbabilities()]
        asked = (data or {}).get("largest_component")
        names = self.cfg.infer.largest_component if asked is None else \
            parse_largest_component(asked, self.cfg.labels.foreground)
        return [ArgmaxLabel(keep_largest_components(self.cfg.labels.foreground, names))]

    def writer(self, data: dict[str, Any], extension: str | None = None, dtype: str | None = None) -> tuple[Any, Any]:
        """Write the label map with :func:`crossmodal.io.save_volume` (NIfTI through ISA-L gzip, or NRRD, in RAS
        as every reader here expects); other outputs go to MONAI Label's writer."""
        ext = extension or data.get("result_extension") or ".nii.gz"
        pred = data[self.output_label_key]
        if ext not in IMAGE_EXTENSIONS or not data.get("result_write_to_file", True) \
                or not isinstance(pred, MetaTensor) or pred.ndim != 3:
            return super().writer(data, extension, dtype)
        array = pred.numpy()
        out_dtype = dtype or data.get("result_dtype")
        if out_dtype:
            array = array.astype(np.dtype(out_dtype), copy=False)
        # a class map names its classes in a .seg.nrrd (Slicer shows them by name); the uncertainty map is no classes
        classes = None if data.get("prediction") == "uncertainty" else self.cfg.labels.foreground
        path = written_temp(ext, lambda p: save_volume(p, array, pred.affine.double().numpy(), segments=classes))
        return path, data.get(self.output_json_key, {})

    def check_request(self, request: dict[str, Any], prefix: str | None = None) -> dict[str, Any]:
        """The request's own options checked and parsed before anything is read (result extension and dtype,
        ``mc_samples``, ``prediction``, ``device``, ``mirror_axes``, ``overlap``, ``sw_batch_size``,
        ``largest_component``): a 422 that starts with ``prefix`` (default: the request's case) and names the option.
        A batch infer is checked so before it is queued (the app's ``check_batch_infer``)."""
        req = dict(request)
        if not req.get("result_extension"):
            req.pop("result_extension", None)
        req.setdefault("result_dtype", "uint8")
        ext = req.get("result_extension", ".nii.gz")
        case = f"case {case_id_of(str(req.get('image', '')))!r}: " if prefix is None else prefix
        if ext not in IMAGE_EXTENSIONS:  # MONAI Label's writer would fail after inference (500) or, for .png, write
            # one 2D slice: only the 3D formats the datastore takes back as a label
            raise http_error(ValueError(f"result_extension {ext!r} must be one of {list(IMAGE_EXTENSIONS)}"),
                             prefix=case)
        try:  # MONAI Label's numpy cast came after the inference: 'foo' was a 500 ("data type 'foo' not understood")
            kind = np.dtype(req["result_dtype"]).kind
        except (TypeError, ValueError):
            kind = ""
        if kind not in ("u", "i", "f"):
            raise http_error(ValueError(f"result_dtype {req['result_dtype']!r} must be a numpy integer or float type "
                                        "name, e.g. uint8 (the default), int16 or float32"), prefix=case)
        samples = as_number(req.get("mc_samples", 8), int)
        if samples is None or not 1 <= samples <= MAX_MC_SAMPLES:  # 5000 held the server for minutes
            raise http_error(ValueError(f"mc_samples={req.get('mc_samples')!r} must be an integer from 1 to "
                                        f"{MAX_MC_SAMPLES}"), prefix=case)
        req["mc_samples"] = samples
        choices = ["fused", "uncertainty", *self.heads()]
        if (req.get("prediction") or "fused") not in choices:  # it was refused after the inference, naming only
            # what that inference had made (fused): the heads the model has went unsaid
            raise http_error(ValueError(f"prediction {req['prediction']!r} must be one of {choices}"), prefix=case)
        try:
            request_device(req.get("device"))  # a GPU's name from /info too, as MONAI Label maps it
            if "mirror_axes" in req:  # checked (and parsed) before anything is read
                req["mirror_axes"] = parse_mirror_axes(req["mirror_axes"])
            # ignored until 2026-12-04: the preset's were used whatever the request said
            if req.get("overlap") is not None:
                req["overlap"] = parse_overlap(req["overlap"])
            if req.get("sw_batch_size") is not None:
                req["sw_batch_size"] = parse_sw_batch_size(req["sw_batch_size"])
            if req.get("largest_component") is not None:
                req["largest_component"] = list(parse_largest_component(req["largest_component"],
                                                                            self.cfg.labels.foreground))
        except ConfigError as e:
            raise http_error(e, prefix=case) from None
        return req

    def __call__(self, request: dict[str, Any], callbacks: Any = None) -> tuple[Any, dict]:
        req = self.check_request(request)
        try:
            return super().__call__(req, callbacks)
        except Exception as e:  # a CaseError, or one that MONAI's transforms wrapped: 422 naming case and file
            found = cause_of_type(e, (CaseError,))
            if found is None:
                raise
            if isinstance(found, CaseError) and found.path is not None \
                    and found.path in {str(req.get(k)) for k in ("label", "label_path")}:
                found = CaseError(found.case_id, None, f"{self.uploaded}: {found.problem}")  # not its temp name
            raise http_error(found) from e


class CrossModalBatchInfer(BatchInferTask):
    """``POST /batch/infer/<model>``: MONAI Label's batch task, made to run where there is no GPU and to go on past a
    case it cannot segment.

    Upstream spread the cases over ``range(torch.cuda.device_count())``, so without CUDA every batch stopped at once
    (``ZeroDivisionError: integer modulo by zero``); and, one case at a time, the first case that failed (a missing
    modality, say) stopped the rest. Each case's outcome is logged by name; the result maps each failed case to
    ``{"error": <why>}``.
    """

    def __call__(self, request: dict, datastore: Any, infer: Callable) -> dict:
        req = dict(request)
        if not torch.cuda.is_available():
            req["multi_gpu"] = False  # one device: MONAI Label's name_to_device turns "cuda" into "cpu"
        failed: dict[str, str] = {}

        def infer_one(r: dict, store: Any) -> dict:
            try:
                return infer(r, store)
            except Exception as e:
                found = cause_of_type(e, (CaseError,))
                why = str(getattr(e, "detail", None) or found or e)
                failed[str(r.get("image"))] = why
                logger.warning(f"batch infer: {why}")
                return {}

        result = super().__call__(req, datastore, infer_one)
        for image_id, why in failed.items():
            result[image_id] = {"error": why}
        logger.info(f"batch infer: {len(result) - len(failed)} of {len(result)} cases segmented"
                    + (f"; failed: {sorted(failed)}" if failed else ""))
        return result
