"""Offline training and evaluation on a studies folder, through the same tasks the server runs."""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from crossmodal.active import predictive_entropy
from crossmodal.config import ConsistencyConfig, CrossModalConfig, atomic_write_text, load_config, merge_dicts
from crossmodal.data.nnunet import relabel
from crossmodal.data.studies import FINAL_LABELS, TRUTH_DIR, files_by_case, primary_images, truth_files
from crossmodal.errors import CaseError, user_error_in
from crossmodal.io import OutputFolder, atomic_copy, case_id_of, load_volume, read_label, save_volume
from crossmodal.serving.app import AppParts
from monai.data import MetaTensor
from monai.metrics import compute_dice, compute_hausdorff_distance
from tqdm import tqdm


def pick_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is present, else ``cpu``."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


METHODS = ("ours", "baseline_unet", "single_<modality>")


def method_config(preset: str, method: str, overrides: dict[str, Any] | None = None) -> CrossModalConfig:
    """The config of a method on a preset's data: ``ours`` (CrossModalNet, hybrid losses), ``baseline_unet``
    (early-fusion UNet, partial loss on the drawn voxels: nnU-Net's ignore-label recipe, no label propagation or
    stroke transfer) or
    ``single_<modality>`` (that UNet on one modality). ``overrides`` are merged last."""
    cfg = load_config(preset, overrides=overrides)
    if method == "ours":
        model: dict[str, Any] = {"name": "crossmodal"}
    elif method == "baseline_unet":
        model = {"name": "baseline_unet"}
    elif method.startswith("single_") and method[len("single_"):] in cfg.modality_names:
        model = {"name": "baseline_unet", "inputs": [method[len("single_"):]]}
    else:
        raise ValueError(f"method {method!r} is not one of ours, baseline_unet, "
                         f"{', '.join('single_' + m for m in cfg.modality_names)}")
    # the baselines train on the drawn voxels only (nnU-Net's ignore label) unless the overrides say otherwise
    defaults = {} if method == "ours" else {"train": {"propagate": {"method": "none"},
                                                      "consistency": {"atlas_sparse": 0}}}
    return load_config(preset, overrides=merge_dicts(merge_dicts(defaults, overrides or {}), {"model": model}))


def train_offline(studies: str, preset: str, model_dir: str, epochs: int | None = None, device: str = "auto",
                  publish: str | None = None, pretrained: str | None = None, network: str | None = None,
                  use_unlabeled: bool = True, processes: int = 1, dataset: str = "CacheDataset",
                  publish_mode: str = "if_better", missing_modality: str | None = None,
                  from_scratch: bool = False, early_stop_patience: int = -1, seed: int | None = None,
                  held_out: Sequence[str] = ()) -> dict[str, Any]:
    """Train on every final label of ``studies`` (and its unlabelled cases, for a cross-modal network unless
    ``use_unlabeled`` is false; never the case ids ``held_out`` names: test cases, :func:`held_out_cases`); the best
    model is published to ``<model_dir>/…`` (and copied to ``publish``); a fine-tuning (of ``pretrained`` or of the
    model already published there) with held-out labels publishes only an epoch that validates better than the model
    it started from (``publish_mode="best_of_run"``: its best epoch whatever it scores; ``stats["published"]``: the
    model to use).

    ``preset`` is a preset name or a YAML path; ``processes`` > 1 trains data-parallel (torch.distributed);
    ``dataset``: ``CacheDataset`` (every preprocessed case in memory) or ``Dataset`` (read as it comes);
    ``missing_modality``: ``zero_fill`` trains on a case without a secondary modality's file with that modality
    left out of its fusion (default: the preset's ``infer.missing_modality``, ``error``); ``from_scratch``: random
    weights even where a model is published (or ``pretrained``), which it must beat on held-out labels to replace;
    ``early_stop_patience``: stop after that many validations without a better held-out score (-1: never);
    ``seed``: the run's generator (default the preset's ``train.seed``; :func:`~crossmodal.serving.train.seed_run`):
    two runs of the same data, settings and seed train alike."""
    conf = {"preset": preset, "model_dir": model_dir, **({"max_epochs": str(epochs)} if epochs else {})}
    if missing_modality:
        conf["missing_modality"] = missing_modality
    if pretrained:
        conf["pretrained"] = pretrained
    if network:
        conf["models"] = network
    with tempfile.TemporaryDirectory(prefix="crossmodal-app-") as app_dir:  # model_dir is given: nothing is kept there
        parts = AppParts.from_conf(app_dir, conf)
    stats = parts.trainer()({"device": pick_device(device), "tracking": "None", "dataset": dataset,
                             "dataloader": "DataLoader", "use_unlabeled": use_unlabeled, "processes": processes,
                             "held_out": held_out,  # the train task reads one case id or several
                             "publish": publish_mode, "pretrained": not from_scratch,
                             "early_stop_patience": early_stop_patience,
                             **({} if seed is None else {"seed": seed})},
                            parts.datastore(studies))
    # a fine-tuning of ``pretrained`` that no epoch improved on held-out labels publishes nothing: that model stays
    published = parts.published if os.path.exists(parts.published) or not pretrained else pretrained
    if publish:
        atomic_copy(published, publish)
    curve = Path(model_dir) / str(stats.get("run")) / "learning_curve.png"  # this run's, not a run's before
    return {**stats, "published": published, "learning_curve": str(curve) if curve.is_file() else None}


def epoch_length(counts: dict[str, int], unlabeled: bool, batch: int, unlabeled_batch: int,
                 max_unlabeled: int = ConsistencyConfig.max_unlabeled_per_epoch) -> int:
    """Steps per epoch of the train task's multi-source loader for label counts {dense, sparse, unlabeled}
    (``max_unlabeled``: ``train.consistency.max_unlabeled_per_epoch``).

    Example:
        >>> epoch_length({"dense": 1, "sparse": 6, "unlabeled": 9}, True, 2, 1)  # 9 unlabelled, 1 per step
        9
        >>> epoch_length({"dense": 1, "sparse": 6, "unlabeled": 800}, True, 2, 1)  # 32 of them an epoch
        32
    """
    sources = [c for c in (counts["dense"], counts["sparse"]) if c]
    per = max(1, batch // max(1, len(sources)))
    lengths = [math.ceil(c / per) for c in sources]
    if unlabeled and counts["unlabeled"]:
        lengths.append(math.ceil(min(counts["unlabeled"], max_unlabeled) / unlabeled_batch))
    return max(lengths)


def _onehot(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    return torch.eye(num_classes)[torch.from_numpy(labels.astype(np.int64))].movedim(-1, 0)[None]


def dice_per_class(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> list[float]:
    """Dice of classes 1..N-1 between two label maps (H, W, D); NaN where a class is absent from both.

    Example:
        >>> t = np.zeros((4, 4, 1), int); t[:2] = 1; p = np.zeros_like(t); p[:1] = 1
        >>> [round(v, 4) for v in dice_per_class(p, t, 2)]  # 2 * 4 / (4 + 8)
        [0.6667]
    """
    p, t = _onehot(pred, num_classes), _onehot(truth, num_classes)
    return [float(v) for v in compute_dice(p, t, include_background=False, ignore_empty=True)[0]]


def hd95_per_class(pred: np.ndarray, truth: np.ndarray, num_classes: int, spacing: tuple[float, ...]) -> list[float]:
    """95th-percentile Hausdorff distance (mm) of classes 1..N-1; NaN where a class is absent from both; where
    only one map has it, the image diagonal (the worst possible distance).

    Example:
        >>> t = np.zeros((6, 1, 1), int); t[0] = 1; p = np.zeros_like(t); p[2] = 1
        >>> [round(v, 3) for v in hd95_per_class(p, t, 2, (2.0, 1.0, 1.0))]  # two 2 mm voxels apart
        [4.0]
    """
    diagonal = float(np.linalg.norm(np.asarray(truth.shape) * np.asarray(spacing)))
    out = []
    p, t = _onehot(pred, num_classes), _onehot(truth, num_classes)
    for c in range(1, num_classes):
        has_p, has_t = bool(p[0, c].any()), bool(t[0, c].any())
        if not has_p and not has_t:
            out.append(float("nan"))
        elif has_p != has_t:
            out.append(diagonal)
        else:
            with warnings.catch_warnings():  # MONAI 1.5 passes its own deprecated argument to get_mask_edges
                warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
                d = compute_hausdorff_distance(p[:, [0, c]], t[:, [0, c]], include_background=False,
                                               percentile=95, spacing=list(spacing))
            out.append(float(d[0, 0]))
    return out


def dice_per_case(evaluation: dict[str, Any]) -> dict[str, float]:
    """{case id: mean foreground Dice, 4 places} from :func:`evaluate`'s ``per_case`` records.

    Example:
        >>> dice_per_case({"per_case": [{"case": "a", "dice_mean": 0.912345}, {"case": "b", "dice_mean": 0.5}]})
        {'a': 0.9123, 'b': 0.5}
    """
    return {c["case"]: round(c["dice_mean"], 4) for c in evaluation["per_case"]}


def held_out_cases(studies: str) -> list[Path]:
    """The truth files (``<studies>/truth``) of the cases without a final label: the held-out test cases."""
    root = Path(studies)
    labeled = {case_id_of(p) for p in (root / FINAL_LABELS).glob("*")} if (root / FINAL_LABELS).is_dir() else set()
    return [p for cid, p in truth_files(root).items() if cid not in labeled]


def infer_request(image: str | os.PathLike[str], device: str = "auto", drop: Sequence[str] = (),
                  mirror_axes: Sequence[int] | None = None, missing_modality: str | None = None,
                  overlap: float | None = None) -> dict[str, Any]:
    """The infer task's request for one case of a studies folder, its label map returned, not written (as
    :func:`evaluate` and :func:`predict` read it); ``overlap``: the sliding window's (None: the preset's)."""
    request: dict[str, Any] = {"image": str(image), "skip_writer": True, "device": pick_device(device),
                               "drop_modalities": list(drop)}
    if mirror_axes is not None:
        request["mirror_axes"] = list(mirror_axes)
    if missing_modality:
        request["missing_modality"] = missing_modality
    if overlap is not None:
        request["overlap"] = overlap
    return request


def evaluate(studies: str, preset: str, model: str | None, device: str = "auto", out: str | None = None,
             network: str | None = None, drop: tuple[str, ...] = (),
             mirror_axes: Sequence[int] | None = None, missing_modality: str | None = None,
             predictions: str | None = None, overlap: float | None = None,
             prediction_classes: dict[int, int] | None = None) -> dict[str, Any]:
    """Segment every case that has truth (``<studies>/truth``) but no final label; Dice and HD95 (mm) per class
    and their means. ``drop``: modalities to segment without (a missing modality at test time); ``mirror_axes``:
    test-time mirroring (None: the preset's ``infer.mirror_axes``); ``missing_modality``: ``zero_fill`` segments a
    case without a secondary modality's file with what it has (None: the preset's, ``error``); ``overlap``: the
    sliding window's for a case larger than one window (None: the preset's ``infer.overlap``).

    ``predictions`` instead of ``model``: a folder of label maps, ``<case>.nii.gz`` (or ``.nii`` / ``.nrrd``) of
    class indices on each case's grid (``crossmodal predict``'s, or another tool's, e.g. ``nnUNetv2_predict``), scored
    with the same metrics; every held-out case must have one (checked, with its grid and values, before scoring).
    ``prediction_classes``: {their value: the preset's} where they hold another tool's values (an nnU-Net dataset's,
    whose classes import moved to the preset's values: :func:`crossmodal.data.nnunet.class_map`).
    """
    if (model is None) == (predictions is None):
        raise ValueError("evaluate: give a model or a folder of predictions (one of them)")
    root = Path(studies)
    cases = held_out_cases(studies)
    if not cases:  # the summary would be NaN, exit status 0
        raise ValueError(f"{root}: no held-out case to evaluate: {root / TRUTH_DIR} holds no truth (NIfTI / NRRD) "
                         f"of a case without a final label (an nnU-Net dataset: labelsTs of the imagesTs cases)")
    cfg = load_config(preset)
    images = primary_images(root) if model else {}
    given = files_by_case(Path(predictions), "prediction") if predictions else {}
    if model:  # before any case is segmented (were tracebacks after the others)
        check_held_out(studies, cfg.labels.num_classes)
    for truth_path in cases if predictions else []:
        cid = case_id_of(truth_path)
        check_truth(truth_path, cid, cfg.labels.num_classes)
        if cid not in given:
            raise CaseError(cid, predictions, f"no prediction of this held-out case ({cid}.nii.gz, .nii or .nrrd; "
                                              f"the folder has {len(given)})")
    names = list(cfg.labels.foreground)
    records: list[dict[str, Any]] = []
    network_name = None
    with contextlib.ExitStack() as stack:
        task = None
        if model:
            app_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="crossmodal-app-"))  # the model folder
            parts = AppParts.from_conf(app_dir, {"preset": preset, "pretrained": model,
                                                 **({"models": network} if network else {})})
            task, network_name = parts.infer(), parts.model_name
        for truth_path in tqdm(cases, desc="evaluate", unit="case"):
            cid = case_id_of(truth_path)
            truth_img = load_volume(truth_path, cid)
            truth = np.rint(truth_img[0].numpy())
            seconds: float | None = None
            if task is not None:
                t0 = time.perf_counter()
                _, data = task(infer_request(images[cid], device, drop, mirror_axes, missing_modality, overlap))
                seconds = round(time.perf_counter() - t0, 3)
                pred = data["pred"].numpy()
            else:
                pred = read_prediction(given[cid], cid, truth_img, cfg.labels.num_classes)
                if prediction_classes:
                    pred = relabel(pred, prediction_classes)
            spacing = tuple(float(v) for v in np.sqrt((truth_img.affine[:3, :3].numpy() ** 2).sum(0)))
            dice = dice_per_class(pred, truth, cfg.labels.num_classes)
            hd = hd95_per_class(pred, truth, cfg.labels.num_classes, spacing)
            records.append({"case": cid, "seconds": seconds, "dice": dict(zip(names, dice, strict=True)),
                            "dice_mean": float(np.nanmean(dice)),
                            "hd95": dict(zip(names, hd, strict=True)), "hd95_mean": float(np.nanmean(hd))})

    def mean_of(key: str) -> float | None:
        values = [r[key] for r in records if r[key] is not None]
        return float(np.mean(values)) if values else None

    def per_class(key: str) -> dict[str, float]:
        return {n: float(np.nanmean([r[key][n] for r in records])) for n in names} if records else {}

    summary = {
        "model": model, "network": network_name, "preset": preset, "cases": len(records),
        **({"predictions": str(predictions)} if predictions else {}),
        "dropped_modalities": list(drop),
        "mirror_axes": list(cfg.infer.mirror_axes if mirror_axes is None else mirror_axes) if model else [],
        "overlap": (cfg.infer.overlap if overlap is None else overlap) if model else None,
        "dice_mean": mean_of("dice_mean"), "hd95_mean": mean_of("hd95_mean"), "seconds_mean": mean_of("seconds"),
        "dice_per_class": per_class("dice"), "hd95_per_class": per_class("hd95"), "per_case": records,
    }
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        atomic_write_text(Path(out), json.dumps(summary, indent=2))
    return summary


def evaluation_table(summary: Mapping[str, Any]) -> str:
    """:func:`evaluate`'s summary as a table to read: per class the mean +- sd Dice over the cases, the worst case
    and the mean HD95; a last row for the cases' mean over the classes. A class a case has in neither map (NaN)
    leaves that case out of the class's row.

    Example:
        >>> a = {"case": "a", "dice": {"gm": 0.8, "wm": 0.9}, "dice_mean": 0.85, "hd95": {"gm": 2.0, "wm": 4.0},
        ...      "hd95_mean": 3.0}
        >>> b = {"case": "b", "dice": {"gm": 0.6, "wm": float("nan")}, "dice_mean": 0.6,
        ...      "hd95": {"gm": 6.0, "wm": float("nan")}, "hd95_mean": 6.0}
        >>> print(evaluation_table({"per_case": [a, b]}))
        class  cases  Dice mean +- sd  worst (case)  HD95 mm
        gm         2  0.700 +- 0.141   0.600 (b)        4.00
        wm         1  0.900            0.900 (a)        4.00
        mean       2  0.725 +- 0.177   0.600 (b)        4.50
    """
    records = list(summary["per_case"])
    names = list(records[0]["dice"]) if records else []

    def row(name: str, dice: dict[str, float], hd: list[float]) -> list[str]:
        kept = {c: v for c, v in dice.items() if v == v}
        if not kept:
            return [name, "0", "-", "-", "-"]
        values = list(kept.values())
        spread = f" +- {statistics.stdev(values):.3f}" if len(values) > 1 else ""
        worst = min(kept, key=lambda c: kept[c])
        hds = [h for h in hd if h == h]
        return [name, str(len(values)), f"{statistics.mean(values):.3f}{spread}", f"{kept[worst]:.3f} ({worst})",
                f"{statistics.mean(hds):.2f}" if hds else "-"]

    rows = [["class", "cases", "Dice mean +- sd", "worst (case)", "HD95 mm"]]
    rows += [row(n, {r["case"]: r["dice"][n] for r in records}, [r["hd95"][n] for r in records]) for n in names]
    rows.append(row("mean", {r["case"]: r["dice_mean"] for r in records}, [r["hd95_mean"] for r in records]))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    right = (1, 4)  # numbers that line up on their last digit
    return "\n".join("  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(
        zip(r, widths, strict=True))).rstrip() for r in rows)


def check_held_out(studies: str | os.PathLike[str], num_classes: int, cases: Sequence[str] | None = None) -> None:
    """Check every held-out case of ``studies`` (:func:`held_out_cases`; ``cases``: those cases' truth files
    instead) before a model segments them: a primary image to segment, and a truth :func:`check_truth` takes
    (``crossmodal train`` asks it before training, where a truth without its image stopped the command once the
    model was published; ``crossmodal simulate`` of every case it draws from)."""
    images = primary_images(studies)
    truths = held_out_cases(str(studies)) if cases is None else [truth_files(studies)[c] for c in cases]
    for truth_path in truths:
        cid = case_id_of(truth_path)
        if cid not in images:
            raise CaseError(cid, truth_path, f"has truth but no primary image in {studies}; remove the truth file, or "
                                             "put the case's image back")
        check_truth(truth_path, cid, num_classes, images[cid])


def check_truth(path: Path, case_id: str, num_classes: int, image: str | os.PathLike[str] | None = None) -> None:
    """Check that a truth file is a dense label map: every value a class index 0..``num_classes - 1``, on the grid
    of the case's primary ``image`` where given (the grid a prediction is made on).

    Raises:
        CaseError: naming the case and the file: another grid than the image's, or the values that are not class
            indices (255, the ``marked_background`` of a sparse label, says so).
    """
    values = np.unique(read_label(path, load_volume(image, case_id), case_id) if image is not None
                       else load_volume(path, case_id)[0].numpy())
    bad = [float(v) for v in values if v != np.rint(v) or not 0 <= v < num_classes]
    if bad:
        sparse = " (255 marks background in a sparse label: truth must be a dense label)" if 255 in bad else ""
        raise CaseError(case_id, path, f"truth values {bad[:5]} are not class indices 0..{num_classes - 1}{sparse}; "
                                       "give the case a dense label map as its truth, or remove its truth file")


def read_prediction(path: Path, case_id: str, truth: MetaTensor, num_classes: int) -> np.ndarray:
    """A label map of class indices (H, W, D) from ``path``, checked against the truth's grid (shape and affine,
    to 0.01 mm) and the classes.

    Raises:
        CaseError: naming the case and the file: another grid, or values that are not class indices.
    """
    img = load_volume(path, case_id)
    if tuple(img.shape[1:]) != tuple(truth.shape[1:]) or not np.allclose(img.affine.numpy(), truth.affine.numpy(),
                                                                        atol=1e-2):
        raise CaseError(case_id, path, f"the prediction's grid {tuple(img.shape[1:])} (affine "
                                       f"{np.round(img.affine.numpy()[:3], 3).tolist()}) is not the truth's "
                                       f"{tuple(truth.shape[1:])} ({np.round(truth.affine.numpy()[:3], 3).tolist()}); "
                                       f"predict on the case's primary grid (crossmodal predict writes it so)")
    pred = img[0].numpy()
    values = np.unique(pred)
    bad = [float(v) for v in values if v != np.rint(v) or not 0 <= v < num_classes]
    if bad:
        raise CaseError(case_id, path, f"values {bad[:5]} are not class indices 0..{num_classes - 1}")
    return np.rint(pred)


PREDICTIONS_JSON = "predictions.json"


def predict(studies: str, preset: str, model: str, out_dir: str, cases: Sequence[str] | None = None,
            device: str = "auto", network: str | None = None, drop: tuple[str, ...] = (),
            mirror_axes: Sequence[int] | None = None, missing_modality: str | None = None,
            extension: str = ".nii.gz", overlap: float | None = None,
            output_classes: dict[int, int] | None = None) -> dict[str, Any]:
    """Segment ``cases`` of ``studies`` (default: every case) with ``model``, as the server's infer task does:
    one label map per case, ``<out_dir>/<case><extension>`` (uint8 class indices, (H, W, D) on the primary image's
    grid and affine), each written atomically; and ``<out_dir>/predictions.json``: per case the seconds, the
    modalities used, the co-registration shifts (mm), each class's volume (ml) and the foreground's uncertainty
    (:func:`foreground_uncertainty`), or the error that stopped it; ``review_order``: the segmented cases, most
    uncertain first; ``files``: every map predict wrote there, this run's and earlier ones' (another run may write
    over those only).

    A case that cannot be segmented (a modality missing under the ``error`` policy, a file that does not read) is
    recorded with its error and the others go on; a bug (no case or config error in the chain) stops the run.
    ``drop`` / ``mirror_axes`` / ``missing_modality`` / ``overlap`` as in :func:`evaluate`. ``output_classes``: {the
    preset's value: the one written} (an nnU-Net dataset whose class values differ from the preset's: its own, as
    its labelsTs and nnU-Net's tools have them).

    Raises:
        ValueError: a case of ``cases`` that ``studies`` does not hold, or an ``out_dir`` where a map would replace
            a file no earlier run wrote (:class:`crossmodal.io.OutputFolder`), before anything is segmented.
    """
    root, out = Path(studies), Path(out_dir)
    images = primary_images(root)
    for cid in cases or ():
        if cid not in images:
            raise ValueError(f"case {cid!r}: no primary image in {root} (its cases: {list(images)})")
    if not images:
        raise ValueError(f"{root}: no primary image (NIfTI / NRRD / MetaImage) to segment in this studies folder")
    folder = OutputFolder(out, PREDICTIONS_JSON)
    folder.check([f"{cid}{extension}" for cid in cases or images])
    cfg = load_config(preset)
    names = ["background", *cfg.labels.foreground]
    records: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"model": model, "preset": preset, "dropped_modalities": list(drop),
                               "mirror_axes": list(cfg.infer.mirror_axes if mirror_axes is None else mirror_axes),
                               "overlap": cfg.infer.overlap if overlap is None else overlap}

    def report() -> None:  # after each case: a killed run's manifest holds its cases, and their review order
        done = sorted((r for r in records if "error" not in r), key=lambda r: (-r["uncertainty"], r["case"]))
        summary.update(segmented=len(done), failed=[r["case"] for r in records if "error" in r], per_case=records,
                       review_order=[r["case"] for r in done])
        folder.save(**summary)

    with tempfile.TemporaryDirectory(prefix="crossmodal-app-") as app_dir:
        parts = AppParts.from_conf(app_dir, {"preset": preset, "pretrained": model,
                                             **({"models": network} if network else {})})
        summary["network"] = parts.model_name
        task = parts.infer()
        for cid in tqdm(list(cases or images), desc="predict", unit="case"):
            t0 = time.perf_counter()
            try:
                _, data = task({**infer_request(images[cid], device, drop, mirror_axes, missing_modality, overlap),
                                "keep_probs": True})
            except Exception as e:  # noqa: BLE001 - a case error is recorded, the rest segmented; a bug stops the run
                shown = user_error_in(e)
                if shown is None:
                    raise
                records.append({"case": cid, "error": str(shown)})
                report()
                continue
            pred = data["pred"]
            labels, affine = pred.numpy().astype(np.uint8), pred.affine.double().numpy()
            path = folder.writing(f"{cid}{extension}")
            save_volume(path, relabel(labels, output_classes) if output_classes else labels, affine)
            ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
            counts = np.bincount(labels.ravel(), minlength=len(names))
            result = data.get("result", {})
            records.append({"case": cid, "file": str(path), "seconds": round(time.perf_counter() - t0, 3),
                            "modalities_used": list(result.get("modalities_used", [])),
                            "registered_mm": result.get("registered_mm", {}),
                            "coverage": result.get("coverage", {}), "voxel_mm": result.get("voxel_mm", {}),
                            "volume_ml": {n: round(float(counts[i]) * ml, 3) for i, n in enumerate(names) if i},
                            "uncertainty": round(foreground_uncertainty(data["logits"]), 4)})
            report()
    return {**summary, "files": sorted(folder.files)}


def foreground_uncertainty(logits: torch.Tensor) -> float:
    """Mean normalised entropy (0..1) of the softmax of ``logits`` (C, H, W, D) over the voxels whose argmax is a
    foreground class (0 where there is none): a case's figure for ordering review (``make bench-uncertainty``: on
    the brain's 12 demo cases segmented whole and without T2 or PD, Spearman -0.81 against their Dice).

    Example:
        >>> logits = torch.tensor([[0.0, 0.0], [9.0, -9.0]])[:, :, None, None]  # 2 classes, 2 voxels: fg, bg
        >>> round(foreground_uncertainty(logits), 4)  # the fg voxel's p = (1.2e-4, 0.9999): 0.0018 bits
        0.0018
    """
    probs = torch.softmax(logits.float(), 0)
    entropy = predictive_entropy(probs[None])
    foreground = probs.argmax(0) > 0
    return float(entropy[foreground].mean()) if foreground.any() else 0.0
