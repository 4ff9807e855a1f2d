"""Offline training and evaluation on a studies folder, through the same tasks the server runs."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from crossmodal.config import load_config
from crossmodal.data.studies import FINAL_LABELS, TRUTH_DIR
from crossmodal.io import atomic_copy, case_id_of, load_volume
from crossmodal.serving.app import AppParts
from monai.metrics import compute_dice
from tqdm import tqdm


def pick_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is present, else ``cpu``."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def train_offline(studies: str, preset: str, model_dir: str, epochs: int | None = None, device: str = "auto",
                  publish: str | None = None, pretrained: str | None = None,
                  network: str | None = None) -> dict[str, Any]:
    """Train on every final label of ``studies``; the best model is published to ``<model_dir>/…`` (and ``publish``)."""
    conf = {"preset": preset, "model_dir": model_dir, **({"max_epochs": str(epochs)} if epochs else {})}
    if pretrained:
        conf["pretrained"] = pretrained
    if network:
        conf["models"] = network
    parts = AppParts.from_conf(tempfile.mkdtemp(prefix="crossmodal-app-"), conf)
    stats = parts.trainer()({"device": pick_device(device), "tracking": "None", "dataset": "CacheDataset",
                             "dataloader": "DataLoader"}, parts.datastore(studies))
    if publish:
        atomic_copy(parts.published, publish)
    return stats


def dice_per_class(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> list[float]:
    """Dice of classes 1..N-1 between two label maps (H, W, D); NaN where a class is absent from both."""
    eye = torch.eye(num_classes)
    p = eye[torch.from_numpy(pred.astype(np.int64))].movedim(-1, 0)[None]
    t = eye[torch.from_numpy(truth.astype(np.int64))].movedim(-1, 0)[None]
    return [float(v) for v in compute_dice(p, t, include_background=False, ignore_empty=True)[0]]


def evaluate(studies: str, preset: str, model: str, device: str = "auto", out: str | None = None,
             network: str | None = None) -> dict[str, Any]:
    """Segment every case that has truth (``<studies>/truth``) but no final label; Dice per class and mean."""
    cfg = load_config(preset)
    conf = {"preset": preset, "pretrained": model, **({"models": network} if network else {})}
    parts = AppParts.from_conf(tempfile.mkdtemp(prefix="crossmodal-app-"), conf)
    task = parts.infer()
    root = Path(studies)
    labeled = {case_id_of(p) for p in (root / FINAL_LABELS).glob("*")} if (root / FINAL_LABELS).is_dir() else set()
    cases = [p for p in sorted((root / TRUTH_DIR).glob("*.nii.gz")) if case_id_of(p) not in labeled]
    names = list(cfg.labels.foreground)
    records = []
    for truth_path in tqdm(cases, desc="evaluate", unit="case"):
        cid = case_id_of(truth_path)
        image = next(p for p in root.iterdir() if p.is_file() and case_id_of(p) == cid)
        _, data = task({"image": str(image), "skip_writer": True, "device": pick_device(device)})
        pred = data["pred"].numpy()
        truth = np.rint(load_volume(truth_path, cid)[0].numpy())
        dice = dice_per_class(pred, truth, cfg.labels.num_classes)
        records.append({"case": cid, "dice": dict(zip(names, dice, strict=True)), "dice_mean": float(np.nanmean(dice))})
    summary = {
        "model": model, "network": parts.model_name, "preset": preset, "cases": len(records),
        "dice_mean": float(np.mean([r["dice_mean"] for r in records])) if records else float("nan"),
        "dice_per_class": {n: float(np.nanmean([r["dice"][n] for r in records])) for n in names} if records else {},
        "per_case": records,
    }
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        Path(out).write_text(json.dumps(summary, indent=2))
    return summary
