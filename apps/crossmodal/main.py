"""MONAI Label app: multimodal segmentation from all modalities of a case (thin adapter over `crossmodal`)."""

from __future__ import annotations

import logging
import os
from typing import Any

import crossmodal
from crossmodal.config import near_miss
from crossmodal.errors import CaseError, user_error_in
from crossmodal.inference import configure_threads
from crossmodal.serving.activelearning import CrossModalScoring, RandomStrategy
from crossmodal.serving.app import (
    AppParts,
    check_batch_infer_request,
    check_infer_request,
    conf_flag,
    not_served,
    refuse_non_finite,
    stop_when_orphaned,
)
from crossmodal.serving.datastore import http_error
from crossmodal.serving.dicomweb import labels_onto_grid
from crossmodal.serving.infer import CrossModalBatchInfer
from crossmodal.serving.uploads import check_requests
from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

logger = logging.getLogger(__name__)


class MyApp(MONAILabelApp):
    """The app MONAI Label serves: every task built by :class:`crossmodal.serving.app.AppParts` from the ``--conf``."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        configure_threads()
        stop_when_orphaned()  # a task process (train, scoring, batch infer) ends with the server that started it
        check_requests()  # refused uploads left in the temp folder, malformed params a 500, .bin scribbles kept
        self.parts = AppParts.from_conf(app_dir, conf, pacs=studies.startswith(("http://", "https://")),
                                        studies=studies)
        logger.info(self.parts.describe())
        self._infer_tasks = {m.name: self.parts.infer(m) for m in self.parts.models}
        self._epistemic = self.parts.epistemic() if conf_flag(conf, "epistemic") else None
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="crossmodal",
                         description="Label-efficient multimodal segmentation", version=crossmodal.__version__)

    def init_batch_infer(self) -> CrossModalBatchInfer:
        return CrossModalBatchInfer()

    def init_datastore(self) -> Datastore:
        return self.parts.datastore(self.studies.rstrip("/"), self.conf)

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """As upstream; on a PACS, a request for a secondary series (OHIF's active viewport showing PET, say) gets
        the label on that series' grid, and strokes sent with it (``grow_scribbles``), drawn on that grid, are moved
        onto the primary's before the task reads them."""
        image_id = request.get("image")
        case = str(image_id)  # a case id wherever a viewer grid is looked up (it is one then)
        store = datastore or self.datastore()
        check_infer_request(request, self._infers, store)  # 404 naming an unknown model or case, not a 500 / 422
        refuse_non_finite(request, f"image {image_id!r}: infer request")
        grid = store.viewer_grid(image_id) if isinstance(image_id, str) and hasattr(store, "viewer_grid") else None
        strokes = request.get("label")
        if grid is not None and isinstance(strokes, str) and os.path.isfile(strokes):  # drawn on that series' grid
            try:
                primary = store.get_image_uri(image_id)
            except CaseError as e:  # the case's own series do not read
                raise http_error(e) from e
            try:
                moved = labels_onto_grid(strokes, grid[1], primary, case)
            except CaseError as e:
                raise http_error(CaseError(case, None, f"uploaded strokes: {e.problem}")) from e
            request = {**request, "label": moved}
        try:
            result = super().infer(request, datastore)
        except HTTPException:
            raise
        except Exception as e:
            found = user_error_in(e)  # a case whose files (a PACS's series) do not read: 422 naming it, not a 500
            if found is None:
                raise
            raise http_error(found) from e
        finally:
            if grid is not None and isinstance(strokes, str) and request["label"] != strokes:
                os.remove(request["label"])
        if grid is not None and result.get("file"):
            on_primary = result["file"]
            result["file"] = result["label"] = labels_onto_grid(on_primary, store.get_image_uri(image_id), grid[1],
                                                                case, keep_ext=True)
            if result["file"] != on_primary:  # MONAI Label removes the file it sends, not the one it replaced
                os.remove(on_primary)
            result["params"] = {**(result.get("params") or {}), "grid": grid[0]}
        return result

    def train(self, request: dict[str, Any]) -> Any:
        """As upstream; a case that cannot be read stops the run with a 422 naming the case and the file (the
        viewers' synchronous train) instead of a bare 500."""
        refuse_non_finite(request, "train request")
        try:
            return super().train(request)
        except Exception as e:
            found = user_error_in(e)
            if found is None:
                raise
            raise http_error(found, prefix="training stopped: " if isinstance(found, CaseError) else "") from e

    def check_train(self, request: dict[str, Any]) -> None:
        """A train request checked as its run will read it (a 422 naming the option), before MONAI Label queues
        the background process that runs it: it answered 200 "SUBMITTED" to any request, and the error came only
        in the task's status."""
        refuse_non_finite(request, "train request")
        task = self._trainers.get(str(request.get("model")))
        if task is not None and hasattr(task, "check_request"):
            try:
                task.check_request(request)
            except Exception as e:
                found = user_error_in(e)
                if found is None:
                    raise
                raise http_error(found) from e

    def bundle_path(self, model: str | None) -> str | None:
        """As upstream; MONAI Label asks this of every train / batch-infer request before it queues the background
        process that runs it, so an unknown model is a 404 here, not a task that fails out of sight."""
        if model is not None and model not in self._trainers and model not in self._infers:
            raise not_served("model", model, {*self._trainers, *self._infers})
        return super().bundle_path(model)

    def replace_weights(self, model: str, path: str) -> str:
        """``PUT /model/<model>`` (see :func:`crossmodal.serving.uploads.checked_update_model`): checked, atomic."""
        return self.parts.replace_weights(model, path)

    def delete_weights(self, model: str) -> dict:
        """``DELETE /model/<model>`` (see :func:`crossmodal.serving.uploads.checked_delete_model`): the trained
        weights aside, the shipped ones back in service."""
        return self.parts.delete_weights(model)

    def next_sample(self, request: dict[str, Any]) -> dict[str, Any]:
        """As upstream; an unknown strategy is a 404 listing the served ones (upstream: a bare 500)."""
        strategy = request.get("strategy") or "random"
        if strategy not in self._strategies:
            raise not_served("strategy", strategy, self._strategies)
        refuse_non_finite(request, "next-sample request")  # MONAI Label records its client_id in the case's info
        if typo := near_miss(request, ("refine_sparse", "client_id", "strategy")):  # ignored, without a word
            raise HTTPException(status_code=422, detail=f"next-sample request: {typo[0]} is not an option; did you "
                                                        f"mean {typo[1]}?")
        return super().next_sample(request)

    def scoring(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """As upstream; an unknown method is a 404 listing the served ones (upstream: a bare 500 for a synchronous
        request; an asynchronous one is queued and fails in its background process, which MONAI Label starts before
        the app sees the request)."""
        self.check_scoring(request)
        return super().scoring(request, datastore)

    def check_scoring(self, request: dict[str, Any]) -> None:
        """404 for an unknown method, 422 for NaN / Infinity or a key that nearly is an option (it was ignored
        without a word); asked before an asynchronous request is queued too."""
        method = request.get("method")
        if method not in self._scoring_methods:
            raise not_served("scoring method", method, self._scoring_methods)
        refuse_non_finite(request, "scoring request")
        if typo := near_miss(request, ("device", "method")):
            raise HTTPException(status_code=422, detail=f"scoring request: {typo[0]} is not an option; did you mean "
                                                        f"{typo[1]}?")

    def check_batch_infer(self, request: dict[str, Any]) -> None:
        """A batch infer request checked before MONAI Label queues it
        (:func:`crossmodal.serving.app.check_batch_infer_request`)."""
        check_batch_infer_request(request, self._infers)

    def init_infers(self) -> dict[str, InferTask]:
        infers = {**self._infer_tasks, "grow_scribbles": self.parts.grow()}
        if conf_flag(self.conf, "benchmark_pipelines"):
            from crossmodal.serving.radiology import RadiologyInfer

            infers["radiology_unet"] = RadiologyInfer(self.parts.cfg)
        return infers

    def init_trainers(self) -> dict[str, TrainTask]:
        return {m.name: self.parts.trainer(m) for m in self.parts.models}

    def init_strategies(self) -> dict[str, Strategy]:
        strategies = {"crossmodal": self.parts.strategy(self._crossmodal_scoring), "random": RandomStrategy()}
        if self._epistemic:
            strategies["epistemic"] = self._epistemic[1]
        return strategies

    def _crossmodal_scoring(self) -> CrossModalScoring | None:
        """The app's cross-modal scoring (made after the strategies), which the strategy runs on a fresh datastore."""
        scoring = getattr(self, "_scoring_methods", {}).get("crossmodal")
        return scoring if isinstance(scoring, CrossModalScoring) else None

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        scoring = self.parts.scoring(self._infer_tasks[self.parts.model_name], self.studies)
        if isinstance(hooks := getattr(self.datastore(), "on_remove", None), list):
            hooks.append(scoring.forget)  # a deleted case's cached input (its images, downsampled) goes with it
        methods = {"crossmodal": scoring}
        if self._epistemic:
            methods["epistemic"] = self._epistemic[0]
        return methods
