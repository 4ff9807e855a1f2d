"""The app's train task on MONAI Label's ``BasicTrainTask`` (MONAI ``SupervisedTrainer`` / ignite engines).

Reads every case with a ``final`` label and its recorded kind; dense and sparse labels train through the
partial loss (annotated voxels only). Validation uses dense labels when there are any (Dice), held-out
sparse labels otherwise (partial Dice). The best model is published atomically: an infer request never reads
a half-written file, and a killed training leaves the previous model in service.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import torch
from crossmodal.config import CrossModalConfig, atomic_write_text, save_config
from crossmodal.inference import NetworkInferer
from crossmodal.io import atomic_copy
from crossmodal.labels import DENSE, IGNORE_INDEX
from crossmodal.losses import SupervisedLoss
from crossmodal.nets import CrossModalOutput, build_network
from crossmodal.transforms import preprocessing
from ignite.engine import Events
from monai.engines.utils import IterationEvents
from monai.handlers import TensorBoardStatsHandler
from monai.transforms import MapTransform
from monai.utils.enums import CommonKeys as Keys
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.basic_train import BasicTrainTask, Context
from monailabel.tasks.train.handler import PublishStatsAndModel, prepare_stats

logger = logging.getLogger(__name__)


class PartialOneHotd(MapTransform):
    """``pred`` logits (C, ...) and ``label`` (1, ...) with ``IGNORE_INDEX`` -> one-hot maps zeroed where unannotated.

    With these, MONAI's ``MeanDice`` computes Dice over annotated voxels only (partial Dice).
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__(["pred", "label"])
        self.num_classes = num_classes

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        label = d["label"][0].long()
        mask = (label != IGNORE_INDEX).unsqueeze(0)
        pred = torch.argmax(d["pred"], dim=0)
        eye = torch.eye(self.num_classes, device=pred.device)
        d["pred"] = eye[pred].movedim(-1, 0) * mask
        d["label"] = eye[label.clamp_min(0)].movedim(-1, 0) * mask
        return d


class AtomicPublish(PublishStatsAndModel):
    """MONAI Label's publisher, with stats and model replaced through temp files (``os.replace``)."""

    def iteration_completed(self) -> dict[str, Any]:
        stats = prepare_stats(self.start_ts, self.trainer, self.evaluator)
        text = json.dumps(stats, indent=2, default=str)
        atomic_write_text(Path(self.output_dir) / f"stats_{self.run_id}.json", text)
        if self._stats_path:
            atomic_write_text(Path(self._stats_path), text)
        best = os.path.join(self.output_dir, self._key_metric_filename)
        if self._publish_path and os.path.exists(best):
            if not os.path.exists(self._publish_path) or os.path.getmtime(best) > os.path.getmtime(self._publish_path):
                atomic_copy(best, self._publish_path)
                logger.info(f"New model published: {best} => {self._publish_path}")
        return stats


def coerce_tracking(request: dict[str, Any], model_dir: str) -> dict[str, Any]:
    """MLflow only on a ``sqlite:///`` URI (MLflow >= 3.13 rejects MONAI Label's ``file://`` default).

    Slicer asks for ``tracking=mlflow``; then the URI becomes ``sqlite:///<model_dir>/mlflow.db`` unless a sqlite
    URI was given. Any other tracking value turns tracking off.
    """
    req = dict(request)
    tracking = req.get("tracking")
    tracking = tracking[0] if isinstance(tracking, list) else tracking
    if str(tracking).lower() == "mlflow":
        uri = str(req.get("tracking_uri") or "")
        if not uri.startswith("sqlite:///"):
            req["tracking_uri"] = "sqlite:///" + os.path.abspath(os.path.join(model_dir, "mlflow.db"))
        req["tracking"] = "mlflow"
    else:
        req["tracking"] = None
    return req


class CrossModalTrain(BasicTrainTask):
    """Train ``cfg.model`` on all final labels of the datastore (dense and sparse) with the partial loss."""

    def __init__(self, cfg: CrossModalConfig, model_dir: str, publish_path: str, pretrained_path: str | None,
                 description: str) -> None:
        t = cfg.train
        super().__init__(
            model_dir=model_dir, description=description, amp=False, load_path=pretrained_path,
            publish_path=publish_path, labels=cfg.labels.classes, load_strict=True, tracking=None,
            config={"max_epochs": t.max_epochs, "train_batch_size": t.batch_size, "val_batch_size": 1,
                    "val_split": t.val_fraction, "learning_rate": t.lr_for(cfg.model.name), "multi_gpu": False,
                    "dataset": ["Dataset", "CacheDataset"], "dataloader": ["DataLoader", "ThreadDataLoader"],
                    "tracking": ["None", "mlflow"]},
        )
        self.cfg = cfg

    def network(self, context: Context) -> torch.nn.Module:
        return build_network(self.cfg)

    def optimizer(self, context: Context) -> torch.optim.Optimizer:
        lr = float(context.request.get("learning_rate", self.cfg.train.lr_for(self.cfg.model.name)))
        return torch.optim.AdamW(context.network.parameters(), lr=lr, weight_decay=self.cfg.train.weight_decay)

    def loss_function(self, context: Context) -> torch.nn.Module:
        t = self.cfg.train
        return SupervisedLoss(t.dice_weight, t.ce_weight, t.aux_weight)

    def train_iteration_update(self, context: Context):
        """One step on plain tensors; the loss sees the whole network output, metrics see the fused logits."""
        loss_fn = self.loss_function(context)

        def step(engine: Any, batch: dict[str, Any]) -> dict[str, Any]:
            x = batch["image"].as_tensor() if hasattr(batch["image"], "as_tensor") else batch["image"]
            y = batch["label"].as_tensor() if hasattr(batch["label"], "as_tensor") else batch["label"]
            x, y = x.to(engine.state.device), y.to(engine.state.device)
            engine.state.output = {Keys.IMAGE: x, Keys.LABEL: y}
            engine.network.train()
            engine.optimizer.zero_grad(set_to_none=True)
            out = engine.network(x)
            engine.state.output[Keys.PRED] = (out.fused if isinstance(out, CrossModalOutput) else out).detach()
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            loss = loss_fn(out, y)
            engine.state.output[Keys.LOSS] = loss.detach()
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
            engine.fire_event(IterationEvents.MODEL_COMPLETED)  # MONAI decollates and post-processes here
            return engine.state.output

        return step

    def train_pre_transforms(self, context: Context):
        return preprocessing(self.cfg, "train")

    def train_post_transforms(self, context: Context):
        return [PartialOneHotd(self.cfg.labels.num_classes)]

    def val_pre_transforms(self, context: Context):
        return preprocessing(self.cfg, "val")

    def val_post_transforms(self, context: Context):
        return [PartialOneHotd(self.cfg.labels.num_classes)]

    def val_inferer(self, context: Context):
        return NetworkInferer(self.cfg.infer, fused_only=True)

    def train_handlers(self, context: Context) -> list[Any]:
        handlers = super().train_handlers(context)
        return [h for h in handlers if not isinstance(h, TensorBoardStatsHandler)]

    def pre_process(self, request: dict[str, Any], datastore: Datastore) -> list[dict[str, Any]]:
        """Every case with a final label: image, label and the label's kind (dense / sparse)."""
        items = []
        for d in datastore.datalist():
            image_id = os.path.basename(d["image"]).split(".")[0]
            kind = datastore.label_kind(image_id) if hasattr(datastore, "label_kind") else DENSE
            items.append({"image": d["image"], "label": d["label"], "label_kind": kind})
        if not items:
            raise ValueError("no case has a final label yet: save at least one label before training")
        return items

    def partition_datalist(self, context: Context, shuffle: bool = False) -> tuple[list, list]:
        """Hold out ``val_split`` of the dense cases (sparse ones when none is dense); one case: no validation."""
        items = list(context.datalist)
        split = float(context.request.get("val_split", self.cfg.train.val_fraction))
        if len(items) < 2 or split <= 0:
            return items, []
        dense = [d for d in items if d["label_kind"] == DENSE]
        pool = dense if len(dense) >= 2 else [d for d in items if d["label_kind"] != DENSE] or items
        random.Random(self.cfg.train.seed).shuffle(pool := list(pool))
        n_val = max(1, round(split * len(pool))) if len(pool) >= 2 else 0
        val = pool[:n_val]
        train = [d for d in items if d not in val]
        return train, val

    def finalize(self, context: Context) -> None:
        if context.local_rank == 0:
            save_config(self.cfg, os.path.join(context.output_dir, "config.yaml"))
            publisher = AtomicPublish(self._stats_path, self._publish_path, self._key_metric_filename,
                                      context.start_ts, context.run_id, context.output_dir, context.trainer,
                                      context.evaluator)
            engine = context.evaluator or context.trainer
            engine.add_event_handler(Events.EPOCH_COMPLETED, publisher)

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        return super().__call__(coerce_tracking(request, self._model_dir), datastore)
