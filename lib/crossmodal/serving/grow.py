"""The scribbles infer task: an annotator's strokes grown over the case along every modality's edges, at once.

What training does to a sparse label (:func:`crossmodal.propagate.propagate_labels`), on request, so the annotator
sees it and corrects it before saving: the strokes come in as ``label`` (the viewers' convention: class values,
``marked_background`` for drawn background, 0 undrawn), the grown label map goes back on the primary grid.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from crossmodal.config import CrossModalConfig, as_number
from crossmodal.io import IMAGE_EXTENSIONS, CaseError, case_id_of, split_ext
from crossmodal.labels import IGNORE_INDEX, SPARSE, name_key
from crossmodal.propagate import heldout_accuracy, propagate_labels
from crossmodal.serving.datastore import http_error, slicer_label
from crossmodal.serving.infer import CrossModalInfer
from crossmodal.transforms import preprocessing, to_primary_labels
from monai.data import MetaTensor
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask


def walker_params(data: dict[str, Any], threshold: float, beta: float) -> tuple[float, float]:
    """The request's ``threshold`` (in [0.5, 1]) and ``beta`` (> 0), numbers or their text, else the defaults given;
    a 422 naming the case (``data["case_id"]``) and both values otherwise.

    Example:
        >>> walker_params({"threshold": "0.7"}, 0.5, 130.0)
        (0.7, 130.0)
    """
    t, b = (data.get(k) if data.get(k) is not None else float(d) for k, d in (("threshold", threshold), ("beta", beta)))
    nt, nb = as_number(t, float), as_number(b, float)
    if nt is None or nb is None or not 0.5 <= nt <= 1.0 or nb <= 0:
        raise http_error(ValueError(f"case {data.get('case_id')!r}: threshold {t!r} must be a number in [0.5, 1] and "
                                    f"beta {b!r} a number > 0"))
    return nt, nb


class CrossModalGrow(CrossModalInfer):
    """Grow drawn strokes with the multi-channel random walker (no network).

    Request: ``image``, ``label`` (the strokes' file; MONAI Label's ``/infer`` takes it as an upload) and optional
    ``threshold`` / ``beta`` (default ``train.propagate``'s). The result's params name the case, the share of voxels
    drawn and labelled, the held-out stroke accuracy (:func:`crossmodal.propagate.heldout_accuracy`: how right the
    walker is on this case's own strokes; None when it cannot be measured) and the seconds the walk took.
    Voxels the walker leaves below ``threshold`` come back as 0.
    """

    uploaded = "uploaded strokes"

    def __init__(self, cfg: CrossModalConfig, description: str) -> None:
        p = cfg.train.propagate
        BasicInferTask.__init__(  # no network: CrossModalInfer's writer and error mapping, not its model
            self, path=None, network=None, type=InferType.SCRIBBLES, labels=cfg.labels.viewer_labels, dimension=3,
            description=description, config={"threshold": p.threshold, "beta": p.beta})
        self.cfg, self.probabilities = cfg, False

    def pre_transforms(self, data: dict[str, Any] | None = None) -> Sequence[Callable]:
        # one case: it keeps modalities_used. A modality of a partial field of view stays in, its edge carried outward:
        # the phantom's scribbles grown with its MR on half the grid, mean Dice 0.830 (0.796 with zeros beyond it, 0.785
        # without it)
        return list(preprocessing(self.cfg, "infer").transforms)

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda") -> dict[str, Any]:
        """``data["label"]`` (1, H, W, D) training map of the strokes -> ``data["pred"]`` grown (1, H, W, D)."""
        p, case = self.cfg.train.propagate, data.get("case_id")
        threshold, beta = float(data["threshold"]), float(data["beta"])  # checked by __call__
        image, strokes = data["image"].as_tensor(), data["label"].as_tensor()
        classes = torch.unique(strokes[strokes != IGNORE_INDEX]).long().tolist()
        if len(classes) < 2:
            names = [n for n, v in self.cfg.labels.classes.items() if v in classes]
            raise http_error(ValueError(
                f"case {case!r}: strokes of {len(classes)} class(es) {names} in the {self.uploaded}; draw at "
                f"least two, e.g. a structure and '{self.cfg.labels.marked_background_name}' around it"))
        start = time.perf_counter()
        grown = propagate_labels(image, strokes, beta, threshold, p.max_voxels)
        seconds = time.perf_counter() - start
        accuracy = heldout_accuracy(image, strokes, beta, threshold, p.max_voxels)
        data["pred"] = grown
        data["grow"] = {"drawn": round(float((strokes != IGNORE_INDEX).float().mean()), 6),
                        "labelled": round(float((grown != IGNORE_INDEX).float().mean()), 6),
                        "heldout_accuracy": None if accuracy is None else round(accuracy, 4),
                        "threshold": threshold, "beta": beta, "seconds": round(seconds, 3)}
        return data

    def post_transforms(self, data: dict[str, Any] | None = None) -> Sequence[Callable]:
        return [self._to_viewer]

    def _to_viewer(self, data: dict[str, Any]) -> dict[str, Any]:
        """Grown classes (IGNORE_INDEX -> 0) as a uint8 map on the primary grid, and the result params; for Slicer's
        scribbles panel (``selected_label_name``), the class it asked for as 1, the rest 0 (the segment it fills)."""
        image, grown = data["image"], data["pred"][0].long()
        onehot = F.one_hot(grown.clamp_min(0), self.cfg.labels.num_classes).movedim(-1, 0).float()
        onehot[0] = torch.maximum(onehot[0], (grown == IGNORE_INDEX).float())  # unlabelled: shown as background
        out = to_primary_labels(onehot, image)
        if data.get("scribbled") is not None:
            out = (out == self.cfg.labels.classes[data["scribbled"]]).to(out.dtype)
        data["pred"] = MetaTensor(out, affine=image.meta.get("primary_affine", image.affine))
        data["result"] = {"case": data.get("case_id"), "modalities_used": data.get("modalities_used", []),
                          **data["grow"]}
        return data

    def __call__(self, request: dict[str, Any], callbacks: Any = None) -> tuple[Any, dict]:
        if not isinstance(request.get("label"), str):
            raise http_error(ValueError(f"case {request.get('image')!r}: no strokes: send the drawn label file as "
                                        "`label` (POST /infer/<model> with a `label` upload)"))
        p = self.cfg.train.propagate  # checked before the case is read (a text threshold was a 500 after it)
        image = request.get("image")  # MONAI Label's: the case's path
        case = case_id_of(image) if isinstance(image, str) else image
        threshold, beta = walker_params({**request, "case_id": case}, p.threshold, p.beta)
        strokes, scribbled = request["label"], None
        if isinstance(request.get("label_info"), list) and split_ext(strokes)[1] in IMAGE_EXTENSIONS:
            # Slicer's scribbles panel: every segment, numbered 1, 2, ... in its order, and the one it asks for
            selected = request.get("selected_label_name")
            by_key = {name_key(n): n for n in self.cfg.labels.foreground}
            scribbled = by_key.get(name_key(selected)) if isinstance(selected, str) else None
            if scribbled is None:
                raise http_error(ValueError(f"case {case!r}: selected_label_name {selected!r} is not a class of "
                                            f"this app: {list(by_key.values())}; pick the label to grow"))
            try:
                strokes = slicer_label(request["label"], request["label_info"], str(case), self.cfg.labels, scribbled)
            except CaseError as e:
                raise http_error(CaseError(str(case), None, f"strokes: {e.problem}")) from e
        try:
            return super().__call__({**request, "label": strokes, "threshold": threshold, "beta": beta,
                                     "label_kind": SPARSE, "label_path": request["label"], "scribbled": scribbled},
                                    callbacks)
        finally:
            if strokes != request["label"]:
                os.remove(strokes)
