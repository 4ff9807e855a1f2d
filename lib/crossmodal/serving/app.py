"""Everything the MONAI Label app registers, built from a config preset; ``apps/crossmodal/main.py`` adapts it.

Server ``--conf`` keys (all optional): ``preset`` (a name in ``configs/``, default ``brain``), ``configs_dir``,
``model_dir`` (default ``<app>/model``), ``pretrained`` (weights used until a model is trained; default
``<app>/pretrained/<preset>_<model>.pt`` when present), ``max_epochs`` (overrides the preset).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from crossmodal.config import CrossModalConfig, load_config
from crossmodal.nets import build_network
from crossmodal.serving.activelearning import EntropyScoring, TopScoreStrategy
from crossmodal.serving.datastore import CrossModalDatastore
from crossmodal.serving.infer import CrossModalInfer
from crossmodal.serving.train import CrossModalTrain
from monailabel.interfaces.datastore import Datastore


@dataclass
class AppParts:
    """The resolved config and the paths of the app's model files."""

    cfg: CrossModalConfig
    preset: str
    model_dir: str
    published: str
    pretrained: str | None

    @classmethod
    def from_conf(cls, app_dir: str, conf: dict[str, str]) -> AppParts:
        preset = conf.get("preset", "brain")
        overrides = {"train": {"max_epochs": int(conf["max_epochs"])}} if conf.get("max_epochs") else None
        cfg = load_config(preset, conf.get("configs_dir"), overrides)
        model_dir = conf.get("model_dir") or os.path.join(app_dir, "model")
        os.makedirs(model_dir, exist_ok=True)
        name = f"{cfg.name}_{cfg.model.name}.pt"
        default_pre = Path(app_dir) / "pretrained" / name
        pretrained = conf.get("pretrained") or (str(default_pre) if default_pre.is_file() else None)
        if pretrained and not os.path.isfile(pretrained):
            raise FileNotFoundError(f"conf pretrained={pretrained}: no such weights file")
        return cls(cfg, preset, model_dir, os.path.join(model_dir, name), pretrained)

    @property
    def model_name(self) -> str:
        return self.cfg.model.name

    def datastore(self, studies: str) -> Datastore:
        return CrossModalDatastore(studies, self.cfg.labels)

    def infer(self) -> CrossModalInfer:
        paths = [p for p in (self.pretrained, self.published) if p]
        return CrossModalInfer(self.cfg, build_network(self.cfg), paths,
                               f"{self.model_name} on {self.cfg.modality_names} ({self.preset})")

    def trainer(self) -> CrossModalTrain:
        return CrossModalTrain(self.cfg, self.model_dir, self.published, self.pretrained,
                               f"Train {self.model_name} from dense and sparse labels (partial loss)")

    def strategy(self) -> TopScoreStrategy:
        return TopScoreStrategy()

    def scoring(self, infer: CrossModalInfer) -> EntropyScoring:
        return EntropyScoring(infer)
