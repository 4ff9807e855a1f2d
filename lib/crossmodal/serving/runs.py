"""The training runs kept in a model folder, and putting an earlier run's model back in service.

Every training run (the viewers' Train, ``crossmodal train``) writes ``<model_dir>/train_NN/``: the run's model
(``model.pt``: its best epoch by held-out validation, or its last one when no label is held out), its resolved
``config.yaml``, ``stats_<run>.json`` and ``learning_curve.json``. The model in service is
``<model_dir>/<preset>_<network>.pt`` with its stats beside it. :func:`list_runs` reads the runs and which one is
in service; :func:`publish_run` puts a run's model back in service (a fine-tuning that made the cases the
annotators care about worse, with no held-out label to have stopped it), atomically, after checking that its
weights load into the network its config describes. A running server loads it at its next infer request (MONAI
Label reloads a model whose file changed) and re-scores the unlabelled cases for active learning (the scores are
kept per model file version).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from crossmodal.config import ConfigError, load_config
from crossmodal.io import atomic_copy, format_mm, process_alive
from crossmodal.nets import check_weights, weights_voxel_mm
from crossmodal.serving.train import mark_ended, run_folders, run_stats, same_bytes, stats_path_of


@dataclass
class TrainRun:
    """One ``train_NN`` folder: what it trained and how it scored.

    ``finished``: when its model (else its stats) was last written, the ``saved`` column (a running run's last save);
    ``epoch`` / ``total_epochs``: the last epoch it finished of those it was asked for (a killed or stopped run has
    fewer); ``metric``, ``best``: the held-out validation metric and the run's best value (the train Dice when no label
    was held out: then ``metric`` is ``train_mean_dice``); ``start``: the held-out score of the model it started from
    (fine-tuning, or training beside a model in service); ``model``: its weights (None: the run ended before its first
    epoch did); ``in_service``: its weights are the model in service, byte for byte; ``problem``: why its config does
    not load here (a config of another version of the app), which keeps it out of service; ``stopped``: how a run
    stopped before its last epoch (``interrupted``: Ctrl-C, ``terminated``: SIGTERM, to the command line; ``failed``: an
    error ended it (a case that does not read, a diverged loss); ``killed``: its process is gone without a word: the
    viewers' Stop Training, SIGKILL, out of memory; ``early stop``: ``early_stop_patience``), or ``running``: its
    process still trains (None: it trained every epoch, or a run of a version of the app that did not record its
    process); ``voxel_mm``: the voxel size its weights record having been trained at (None: no model, or a run from
    before the record).
    """

    name: str
    folder: Path
    preset: str
    network: str
    published: Path
    finished: datetime.datetime | None
    epoch: int | None
    total_epochs: int | None
    metric: str | None
    best: float | None
    start: float | None
    model: Path | None
    in_service: bool
    problem: str | None = None
    stopped: str | None = None
    voxel_mm: tuple[float, float, float] | None = None


def list_runs(model_dir: str | Path) -> list[TrainRun]:
    """The training runs under ``model_dir``, oldest first (by folder number); a folder without a ``config.yaml``
    (a run that stopped before it began) is left out.

    Raises:
        FileNotFoundError: ``model_dir`` is not a folder.
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"model folder {root}: no such folder (the server's is <app>/model, or its "
                                "--conf model_dir; crossmodal train's is its --model-dir)")
    runs = []
    for folder in run_folders(root):
        config = folder / "config.yaml"
        if not config.is_file():  # MONAI Label made the folder; the run stopped before it began
            continue
        try:
            cfg = load_config(str(config))
        except (ConfigError, OSError, ValueError) as e:
            runs.append(TrainRun(folder.name, folder, "?", "?", root / "?", None, None, None, None, None, None, None,
                                 False, problem=f"{config}: {e}"))
            continue
        published = root / f"{cfg.name}_{cfg.model.name}.pt"
        stats_file, stats = run_stats(folder)
        model = folder / "model.pt"
        model_ok = model.is_file()
        evals = stats.get("eval") or {}
        train = stats.get("train") or {}
        metric = evals.get("key_metric_name") or train.get("key_metric_name")
        best = stats.get("best_metric")
        when = (model if model_ok else stats_file) if (model_ok or stats_file) else None
        runs.append(TrainRun(
            name=folder.name, folder=folder, preset=cfg.name, network=cfg.model.name, published=published,
            finished=datetime.datetime.fromtimestamp(when.stat().st_mtime) if when else None,
            epoch=stats.get("epoch"), total_epochs=stats.get("total_epochs"), metric=metric,
            best=float(best) if isinstance(best, (int, float)) else None,
            start=float(stats["start_metric"]) if isinstance(stats.get("start_metric"), (int, float)) else None,
            model=model if model_ok else None,
            in_service=same_bytes(model, published),
            stopped=run_state(stats), voxel_mm=weights_voxel_mm(model) if model_ok else None))
    return runs


def run_state(stats: dict) -> str | None:
    """How the run whose stats are ``stats`` ended, or that it still trains (see :class:`TrainRun`'s ``stopped``).

        >>> from crossmodal.io import process_identity
        >>> run_state({"process": process_identity()}), run_state({"process": {**process_identity(), "started": 1.0}})
        ('running', 'killed')
        >>> run_state({"process": process_identity(), "ended": "early_stopped"}), run_state({"ended": "completed"})
        ('early stop', None)
        >>> run_state({"ended": "failed"}), run_state({"stopped": "terminated"})  # (the key before 2026-12-06's)
        ('failed', 'terminated')
    """
    ended = stats.get("ended") or stats.get("stopped")  # "stopped": a Ctrl-C / SIGTERM before the one key
    if ended:
        return None if ended == "completed" else "early stop" if ended == "early_stopped" else str(ended)
    alive = process_alive(stats["process"]) if isinstance(stats.get("process"), dict) else None
    return None if alive is None else "running" if alive else "killed"


def publish_run(model_dir: str | Path, name: str) -> TrainRun:
    """Put run ``name``'s model (``train_NN``) in service: its weights replace ``<preset>_<network>.pt`` and its
    stats the published ones, each through a temp file and ``os.replace``; returns the run.

    Raises:
        ValueError: no such run (the runs are listed), or it has no model (it ended before its first epoch did).
        ModelFileError: its weights do not load into the network its config describes (nothing is replaced).
    """
    runs = list_runs(model_dir)
    run = next((r for r in runs if r.name == name), None)
    if run is None:
        have = ", ".join(r.name for r in runs) or "none"
        raise ValueError(f"--publish {name}: no training run of that name under {model_dir} (runs: {have})")
    if run.problem is not None:
        raise ValueError(f"--publish {name}: its config does not load here, so neither does its model: {run.problem}")
    if run.model is None:
        raise ValueError(f"--publish {name}: {run.folder} has no model.pt: the run ended before its first epoch did, "
                         "so it has no model to publish")
    check_weights(load_config(str(run.folder / "config.yaml")), str(run.model))
    stats_file, _ = run_stats(run.folder)
    atomic_copy(run.model, run.published)
    if stats_file is not None:  # the viewers' train stats then describe the model in service
        atomic_copy(stats_file, stats_path_of(str(run.published)))
    run.in_service = True
    return run


def interrupted_note(model_dir: str | Path, how: str = "interrupted") -> str:
    """What a training run stopped by Ctrl-C or SIGTERM (the last ``train_NN`` under ``model_dir``) leaves in service,
    as the command line says it: its best epoch so far where that was published, else the model it started from,
    else nothing. The run's stats are marked ``ended``: ``how`` (``crossmodal models`` shows it)."""
    runs = list_runs(model_dir) if Path(model_dir).is_dir() else []
    if not runs:
        return f"no training run began under {model_dir}: nothing was written there"
    last = runs[-1]
    mark_ended(last.folder, how, stats_path_of(str(last.published)))
    done = f"after {last.epoch} of {last.total_epochs} epochs" if last.epoch is not None else "before its first epoch"
    if last.in_service and last.model is not None:
        score = f", {last.metric} {last.best:.4f}" if last.best is not None and last.metric else ""
        what = f"{last.name} stopped {done}; its best epoch so far{score} is in service: {last.published}"
    elif last.published.is_file() and last.published.stat().st_mtime > (last.folder / "config.yaml").stat().st_mtime:
        # stopped between saving a better epoch (model.pt) and publishing it
        what = (f"{last.name} stopped {done}; an earlier epoch of it is in service: {last.published} (its best so "
                f"far, {last.folder / 'model.pt'}, was not published yet: `crossmodal models --publish {last.name}`)")
    elif last.published.is_file():
        earlier = [r.name for r in runs[:-1] if r.in_service and r.published == last.published]
        was = f" ({earlier[-1]}'s)" if earlier else ""
        what = f"{last.name} stopped {done}; the model in service is the one it started from{was}: {last.published}"
    else:
        what = f"{last.name} stopped {done}; no model is in service ({last.published} was not written)"
    return f"{what}. `crossmodal models --model-dir {model_dir}` lists the runs; train again to go on"


def format_runs(runs: list[TrainRun]) -> str:
    """``runs`` as the table ``crossmodal models`` prints (one line a run; ``*`` marks the model in service)."""
    rows = [("run", "network", "preset", "voxel (mm)", "saved", "epochs", "metric", "best", "start", "in service")]
    for r in runs:
        epochs = (f"{r.epoch}/{r.total_epochs}" if r.epoch is not None else "-") + (f" ({r.stopped})" if r.stopped
                                                                                   else "")
        voxel = format_mm(r.voxel_mm) if r.voxel_mm else "-"
        rows.append((r.name, r.network, r.preset, voxel, r.finished.strftime("%Y-%m-%d %H:%M") if r.finished else "-",
                     epochs, r.metric or "-", f"{r.best:.4f}" if r.best is not None else "-",
                     f"{r.start:.4f}" if r.start is not None else "-",
                     "*" if r.in_service else ("config unreadable" if r.problem else
                                               "no model" if r.model is None else "")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)
