"""Run folders: each training run keeps its own ``train_NN`` (the oldest pruned past ``train.keep_runs``), and
``crossmodal models`` lists them and puts an earlier run's model back in service."""

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_phantom_studies
from crossmodal.cli import main
from crossmodal.config import ConfigError, load_config, save_config
from crossmodal.data.nnunet import export_nnunet
from crossmodal.nets import ModelFileError, build_network
from crossmodal.serving.offline import method_config, train_offline
from crossmodal.serving.runs import interrupted_note, list_runs, publish_run
from crossmodal.serving.train import (
    check_train_request,
    claim_run_folder,
    prune_runs,
    quiet_on_interrupt,
    run_folders,
)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())


def test_each_run_keeps_its_folder_and_an_earlier_model_goes_back_in_service(tmp_path: Path, phantom_cfg, capsys):
    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=4, dense=1, sparse=1, seed=41)
    cfg = method_config("phantom", "ours", {"train": {"patch_size": [32, 32, 32], "patches_per_case": 1,
                                                      "batch_size": 2, "val_fraction": 0.0, "keep_runs": 2,
                                                      "propagate": {"method": "none"}}})
    save_config(cfg, tmp_path / "ours.yaml")
    model_dir = tmp_path / "m"
    stats = [train_offline(str(studies), str(tmp_path / "ours.yaml"), str(model_dir), epochs=1, device="cpu",
                           network="crossmodal") for _ in range(2)]
    published = Path(stats[-1]["published"])
    assert published == model_dir / "phantom_crossmodal.pt"
    assert [d.name for d in run_folders(model_dir)] == ["train_01", "train_02"]  # MONAI Label's: train_01 twice
    assert [s["run"] for s in stats] == ["train_01", "train_02"]  # the train request's answer names its folder
    assert stats[1]["learning_curve"] == str(model_dir / "train_02" / "learning_curve.png")
    first, second = (_weights(model_dir / f"train_0{i}" / "model.pt") for i in (1, 2))
    assert not _same(first, second) and _same(second, _weights(published))  # the second fine-tuned the first

    runs = list_runs(model_dir)
    assert [(r.name, r.network, r.preset, r.epoch, r.total_epochs, r.in_service, r.stopped) for r in runs] == [
        ("train_01", "crossmodal", "phantom", 1, 1, False, None),
        ("train_02", "crossmodal", "phantom", 1, 1, True, None)]
    assert runs[0].metric == "train_mean_dice" and 0 < runs[0].best <= 1  # no label held out: the train Dice
    stats_file = model_dir / "phantom_crossmodal_train_stats.json"
    run_stats = [next((model_dir / f"train_0{i}").glob("stats_*.json")).read_bytes() for i in (1, 2)]
    assert run_stats[0] != run_stats[1] and stats_file.read_bytes() == run_stats[1]  # the viewers' stats: run 2's

    assert main(["models", "--model-dir", str(model_dir), "--publish", "train_01"]) == 0
    out = capsys.readouterr().out
    assert f"published {model_dir / 'train_01' / 'model.pt'} (train_mean_dice " in out
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.startswith("train_")}
    assert rows["train_01"].endswith("*") and not rows["train_02"].endswith("*")
    # and the voxel size each run's weights record having been trained at (the phantom preset's 2 mm)
    assert "  voxel (mm)  " in out and all(" phantom  2 x 2 x 2  " in rows[r] for r in ("train_01", "train_02"))
    assert [r.voxel_mm for r in list_runs(model_dir)] == [(2.0, 2.0, 2.0)] * 2
    assert _same(_weights(published), first)  # byte for byte the first run's model, with its stats
    assert stats_file.read_bytes() == run_stats[0]
    assert [r.in_service for r in list_runs(model_dir)] == [True, False]

    # a third run fine-tunes train_01's model (in service) and replaces it; keep_runs 2 then removes train_01
    # (another seed: from train_01's model with the same seed it would train train_02's model again, byte for byte)
    third = train_offline(str(studies), str(tmp_path / "ours.yaml"), str(model_dir), epochs=1, device="cpu",
                          network="crossmodal", seed=1)
    assert third["current_iteration"] == 2
    assert [d.name for d in run_folders(model_dir)] == ["train_02", "train_03"]
    assert [r.in_service for r in list_runs(model_dir)] == [False, True]

    # put train_02 back, then prune to 1: the run in service survives beside the newest
    publish_run(model_dir, "train_02")
    (model_dir / "train_04").mkdir()
    assert prune_runs(model_dir, 1, keep="train_04") == ["train_03"]
    assert [d.name for d in run_folders(model_dir)] == ["train_02", "train_04"]


def test_publishing_a_run_refuses_what_cannot_serve_and_replaces_nothing(tmp_path: Path, phantom_cfg, capsys):
    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=3, dense=1, sparse=0, seed=42)
    cfg = method_config("phantom", "ours", {"train": {"patch_size": [32, 32, 32], "patches_per_case": 1,
                                                      "batch_size": 2, "val_fraction": 0.0}})
    save_config(cfg, tmp_path / "ours.yaml")
    model_dir = tmp_path / "m"
    stats = train_offline(str(studies), str(tmp_path / "ours.yaml"), str(model_dir), epochs=1, device="cpu",
                          network="crossmodal")
    before = Path(stats["published"]).read_bytes()
    stats_before = (model_dir / "phantom_crossmodal_train_stats.json").read_bytes()

    broken = model_dir / "train_02"  # a run whose model file was cut short
    broken.mkdir()
    (broken / "config.yaml").write_bytes((model_dir / "train_01" / "config.yaml").read_bytes())
    (broken / "model.pt").write_bytes(before[: len(before) // 2])
    with pytest.raises(ModelFileError, match="cannot be read as a PyTorch checkpoint"):
        publish_run(model_dir, "train_02")
    foreign = model_dir / "train_03"  # weights of another network (the phantom's early-fusion baseline)
    foreign.mkdir()
    (foreign / "config.yaml").write_bytes((model_dir / "train_01" / "config.yaml").read_bytes())
    torch.save(torch.nn.Conv3d(3, 4, 3).state_dict(), foreign / "model.pt")
    with pytest.raises(ModelFileError, match="does not fit crossmodal"):
        publish_run(model_dir, "train_03")
    killed = model_dir / "train_04"  # ended before its first epoch did: no model
    killed.mkdir()
    (killed / "config.yaml").write_bytes((model_dir / "train_01" / "config.yaml").read_bytes())
    assert main(["models", "--model-dir", str(model_dir), "--publish", "train_04"]) == 2
    assert "train_04 has no model.pt: the run ended before its first epoch did" in capsys.readouterr().err
    assert main(["models", "--model-dir", str(model_dir), "--publish", "train_09"]) == 2
    err = capsys.readouterr().err
    assert "--publish train_09: no training run of that name under" in err
    assert "(runs: train_01, train_02, train_03, train_04)" in err
    assert Path(stats["published"]).read_bytes() == before  # nothing replaced by the refused ones
    assert (model_dir / "phantom_crossmodal_train_stats.json").read_bytes() == stats_before

    other = model_dir / "train_05"  # a run of another version of the app, whose config names a key gone since
    other.mkdir()
    (other / "config.yaml").write_text((model_dir / "train_01" / "config.yaml").read_text()
                                       + "retired_option: 1\n")
    (other / "model.pt").write_bytes(before)
    assert main(["models", "--model-dir", str(model_dir)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["train_01"].endswith("*") and rows["train_04"].endswith("no model")
    assert rows["train_05"].endswith("config unreadable")  # listed; the others still are
    assert main(["models", "--model-dir", str(model_dir), "--publish", "train_05"]) == 2
    assert f"--publish train_05: its config does not load here, so neither does its model: {other / 'config.yaml'}: " \
        in capsys.readouterr().err
    assert main(["models", "--model-dir", str(tmp_path / "nowhere")]) == 2
    assert f"model folder {tmp_path / 'nowhere'}: no such folder" in capsys.readouterr().err


def test_run_folder_names():
    assert check_train_request({"name": ""})["name"] == ""  # empty: the next train_NN
    with pytest.raises(ConfigError, match="must be a folder name"):
        check_train_request({"name": "../x"})
    with pytest.raises(ConfigError, match="train.keep_runs: -1 must be >= 0"):
        load_config("phantom", overrides={"train": {"keep_runs": -1}})


def test_claim_run_folder_numbers_past_99(tmp_path: Path):
    (tmp_path / "train_99").mkdir()
    (tmp_path / "train_7").mkdir()
    (tmp_path / "train_x").mkdir()
    assert claim_run_folder(tmp_path) == "train_100"
    assert [d.name for d in run_folders(tmp_path)] == ["train_7", "train_99", "train_100"]


def test_a_diverged_run_names_its_better_validated_model(tmp_path: Path, phantom_cfg, monkeypatch):
    """A fine-tuning whose first epoch beat the model in service on held-out labels, then diverged (the loss NaN from
    its second epoch on): the model in service is put back as before, and the error names the run's validated best,
    which `crossmodal models --publish` puts in service."""
    from crossmodal.errors import TrainingDiverged
    from crossmodal.hybrid import HybridLoss
    from crossmodal.nets import build_network
    from crossmodal.serving.train import diverged_run_hint

    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=5, dense=4, sparse=0, seed=43)
    cfg = method_config("phantom", "baseline_unet", {"train": {"learning_rate": 2e-2, "patch_size": [32, 32, 32],
                                                               "patches_per_case": 1, "val_fraction": 0.25}})
    save_config(cfg, tmp_path / "b.yaml")
    blank = tmp_path / "blank.pt"  # a network that has learnt nothing: the first epoch beats it
    torch.manual_seed(0)
    torch.save(build_network(load_config(str(tmp_path / "b.yaml"))).state_dict(), blank)
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    published = model_dir / "phantom_baseline_unet.pt"
    published.write_bytes(blank.read_bytes())  # the model in service
    forward = HybridLoss.forward

    def nan_from_step_3(self, out, target, n_labeled, n_plain, aug, step, present=None):  # noqa: ANN001, ANN202
        loss, parts = forward(self, out, target, n_labeled, n_plain, aug, step, present)
        if step < 2:  # 3 training cases, batch 2: the second epoch's first step on
            return loss, parts
        return loss * float("nan"), {**parts, "supervised": float("nan")}

    monkeypatch.setattr(HybridLoss, "forward", nan_from_step_3)
    with pytest.raises(TrainingDiverged) as e:
        train_offline(str(studies), str(tmp_path / "b.yaml"), str(model_dir), epochs=3, device="cpu",
                      network="baseline_unet")
    message = str(e.value)
    assert message.startswith("training stopped: the loss is not finite (NaN / Inf) at epoch 2, step 3 (supervised "
                              "nan); that step was not applied"), message
    assert published.read_bytes() == blank.read_bytes()  # put back as it was
    (run,) = list_runs(model_dir)
    assert run.name == "train_01" and run.model is not None and run.best > run.start
    assert (run.epoch, run.stopped) == (1, "failed")  # not "running" (this process) nor "killed"
    assert message.endswith(
        f"and train again. This run's best epoch before it diverged validated {run.best:.4f} (the model in service: "
        f"{run.start:.4f}) and is kept in {model_dir / 'train_01' / 'model.pt'}: `crossmodal models --model-dir "
        f"{model_dir} --publish train_01` puts it in service."), message
    publish_run(model_dir, "train_01")
    assert published.read_bytes() == (model_dir / "train_01" / "model.pt").read_bytes()
    assert diverged_run_hint(model_dir, "train_09") == ""  # no such run: nothing to name


def test_ctrl_c_in_crossmodal_train_says_in_one_line_what_is_in_service(tmp_path: Path, phantom_cfg, capsys):
    """Ctrl-C in `crossmodal train` printed ignite's and MONAI's tracebacks (twice) and no word on the model; now one
    line names where the run stopped and what serves, exit 130, the published model whole."""
    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=3, dense=2, sparse=0, seed=43)
    model_dir = tmp_path / "m"
    published = model_dir / "phantom_crossmodal.pt"
    cmd = [sys.executable, "-m", "crossmodal.cli", "train", "--studies", str(studies), "--model-dir", str(model_dir),
           "--epochs", "500"]  # the preset as a user trains it (its validation, its logging)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's
    try:
        deadline = time.monotonic() + 240
        while not published.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert published.is_file(), proc.poll()
        assert [r.stopped for r in list_runs(model_dir)] == ["running"]  # `crossmodal models` while it trains
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "terminating" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    tail = (rf"\. `crossmodal models --model-dir {re.escape(str(model_dir))}` lists the runs; train again to go on")
    best = model_dir / "train_01" / "model.pt"
    served_best = published.read_bytes() == best.read_bytes()
    if served_best:
        assert re.fullmatch(rf"crossmodal train: interrupted: train_01 stopped after \d+ of 500 epochs; its best "
                            rf"epoch so far, val_mean_dice 0\.\d{{4}} is in service: {re.escape(str(published))}"
                            + tail, last), last
    else:  # the stop came between saving a better epoch and publishing it (it said "the one it started from")
        assert re.fullmatch(rf"crossmodal train: interrupted: train_01 stopped after \d+ of 500 epochs; an earlier "
                            rf"epoch of it is in service: {re.escape(str(published))} \(its best so far, "
                            rf"{re.escape(str(best))}, was not published yet: `crossmodal models --publish "
                            r"train_01`\)" + tail, last), last
    assert _weights(published).keys() == build_network(phantom_cfg).state_dict().keys()
    (run,) = list_runs(model_dir)  # `crossmodal models` tells the run stopped from one that ended
    assert run.stopped == "interrupted" and run.in_service == served_best and run.total_epochs == 500
    assert main(["models", "--model-dir", str(model_dir)]) == 0
    row = capsys.readouterr().out.splitlines()[1]
    assert re.search(rf"\b{run.epoch}/500 \(interrupted\)", row) and row.endswith("*") == served_best, row


def test_sigterm_in_crossmodal_train_removes_the_datasets_copy_and_says_what_is_in_service(tmp_path: Path,
                                                                                           phantom_cfg):
    """SIGTERM (a scheduler's time limit, ``timeout``, ``docker stop``) killed `crossmodal train` on the spot: the copy
    of the nnU-Net dataset it trains from stayed in the temp folder, and nothing said which model serves."""
    studies = make_phantom_studies(tmp_path / "s", phantom_cfg, cases=3, dense=2, sparse=0, seed=44)
    export_nnunet(studies, tmp_path / "Dataset010_Ph", phantom_cfg, test_cases=())
    model_dir, temp = tmp_path / "m", tmp_path / "tmp"
    temp.mkdir()
    published = model_dir / "phantom_crossmodal.pt"
    cmd = [sys.executable, "-m", "crossmodal.cli", "train", "--studies", str(tmp_path / "Dataset010_Ph"),
           "--model-dir", str(model_dir), "--epochs", "500"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(temp)})
    try:
        deadline = time.monotonic() + 240
        while not published.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert published.is_file(), proc.poll()
        copies = [p.name for p in temp.iterdir() if p.name.startswith("crossmodal-")]
        assert copies, "the dataset's copy the command trains from"
        proc.terminate()
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert re.search(r"\ncrossmodal train: terminated \(SIGTERM\): train_01 stopped after \d+ of 500 epochs; its best "
                     r"epoch so far, val_mean_dice 0\.\d{4} is in service: ", err), err[-2000:]
    assert [p.name for p in temp.iterdir() if p.name.startswith("crossmodal-")] == [], copies  # all gone
    assert published.read_bytes() == (model_dir / "train_01" / "model.pt").read_bytes()
    assert [r.stopped for r in list_runs(model_dir)] == ["terminated"]


def test_the_copy_of_the_model_in_service_a_killed_run_left_is_removed_by_the_next_run(tmp_path: Path, monkeypatch,
                                                                                       caplog):
    """A run keeps a copy of the published model and its stats in the temp folder, to put them back if it diverges;
    a run killed (the viewers' Stop Training SIGKILLs it) left that copy there, a model's worth at each stop, until
    2026-12-07. The next run removes it, and its own when it ends."""
    import tempfile

    from crossmodal.serving.train import restored_if_diverged

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    model = tmp_path / "model.pt"
    model.write_bytes(b"weights in service")
    killed = subprocess.Popen([sys.executable, "-c", "import os, signal, sys\n"
                               "from crossmodal.serving.train import restored_if_diverged\n"
                               "with restored_if_diverged(sys.argv[1]):\n    os.kill(os.getpid(), signal.SIGKILL)",
                               str(model)], env={**os.environ, "TMPDIR": str(temp)})
    assert killed.wait(timeout=120) == -signal.SIGKILL
    host = socket.gethostname()
    left = sorted(temp.iterdir())
    assert [p.name.startswith(f"crossmodal-before-run-{host}-{killed.pid}-") for p in left] == [True]
    assert (left[0] / "0").read_bytes() == b"weights in service"
    with caplog.at_level(logging.WARNING, logger="crossmodal.io"), restored_if_diverged(str(model)):
        mine = sorted(temp.iterdir())  # the next run's own copy, the killed run's gone
        assert len(mine) == 1 and mine[0].name.startswith(f"crossmodal-before-run-{host}-{os.getpid()}-")
        assert (mine[0] / "0").read_bytes() == b"weights in service"
    assert sorted(temp.iterdir()) == []
    assert [r.getMessage() for r in caplog.records] == [
        f"{left[0]}: removed, left by a process (pid {killed.pid}) killed before it was done with it"]


def test_an_interrupted_run_that_published_nothing_names_the_model_it_started_from(tmp_path: Path):
    model_dir = tmp_path / "m"
    assert interrupted_note(model_dir) == f"no training run began under {model_dir}: nothing was written there"
    for run in ("train_01", "train_02"):
        (model_dir / run).mkdir(parents=True)
        save_config(load_config("phantom"), model_dir / run / "config.yaml")
    (model_dir / "train_01" / "model.pt").write_bytes(b"weights of run 1")
    (model_dir / "train_01" / "stats_1.json").write_text('{"epoch": 3, "total_epochs": 3}')
    note = interrupted_note(model_dir)  # run 1 published nothing; run 2 stopped before its first epoch
    assert note.startswith(f"train_02 stopped before its first epoch; no model is in service "
                           f"({model_dir / 'phantom_crossmodal.pt'} was not written). ")
    (model_dir / "phantom_crossmodal.pt").write_bytes(b"weights of run 1")
    os.utime(model_dir / "phantom_crossmodal.pt", (time.time() - 120,) * 2)  # published before run 2 began
    (model_dir / "train_02" / "model.pt").write_bytes(b"weights of run 2, its best epoch: not better")
    (model_dir / "train_02" / "stats_2.json").write_text('{"epoch": 2, "total_epochs": 50}')
    assert interrupted_note(model_dir).startswith(
        f"train_02 stopped after 2 of 50 epochs; the model in service is the one it started from (train_01's): "
        f"{model_dir / 'phantom_crossmodal.pt'}. `crossmodal models --model-dir {model_dir}` lists the runs")
    # stopped between saving a better epoch and publishing it: the published model is an earlier epoch of the run
    os.utime(model_dir / "train_02" / "config.yaml", (time.time() - 60,) * 2)
    (model_dir / "phantom_crossmodal.pt").write_bytes(b"weights of run 2, epoch 1")
    assert interrupted_note(model_dir).startswith(
        f"train_02 stopped after 2 of 50 epochs; an earlier epoch of it is in service: "
        f"{model_dir / 'phantom_crossmodal.pt'} (its best so far, {model_dir / 'train_02' / 'model.pt'}, was not "
        "published yet: `crossmodal models --publish train_02`). `crossmodal models")


@pytest.mark.parametrize("error", [KeyboardInterrupt, ValueError])
def test_stats_handlers_pass_ctrl_c_on_without_a_traceback_and_log_other_errors(error):
    """The evaluator's StatsHandler (the first EXCEPTION_RAISED handler there) logged Ctrl-C's traceback."""
    from ignite.engine import Engine
    from monai.handlers import StatsHandler

    def step(engine, batch):
        raise error("stop")

    logged: list[str] = []
    collect = logging.Handler()
    collect.emit = lambda record: logged.append(record.getMessage())  # type: ignore[method-assign]
    engine = Engine(step)
    (handler,) = quiet_on_interrupt([StatsHandler(name="quiet_test", output_transform=lambda x: None)])
    handler.logger.addHandler(collect)  # pytest's caplog does not receive a record logged while Ctrl-C unwinds
    try:
        handler.attach(engine)
        with pytest.raises(error):
            engine.run([0, 1])
    finally:
        handler.logger.removeHandler(collect)
    assert not logged if error is KeyboardInterrupt else "Exception: stop" in logged  # others: logged as before


def test_a_run_whose_process_was_killed_is_not_running_while_its_parent_has_not_reaped_it(tmp_path: Path):
    """MONAI Label's Stop Training SIGKILLs the training process; until its parent reaps it (in a container whose
    init reaps nothing: never) it is a zombie, with its pid and start time, and it trains no more."""
    import psutil
    from crossmodal.io import process_alive
    from crossmodal.serving.runs import run_state

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        identity = {"host": socket.gethostname(), "pid": child.pid,
                    "started": round(psutil.Process(child.pid).create_time(), 2)}
        assert process_alive(identity) is True and run_state({"process": identity}) == "running"
        child.kill()
        deadline = time.monotonic() + 10
        while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.05)
        assert psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE  # not reaped: no wait() yet
        assert process_alive(identity) is False and run_state({"process": identity}) == "killed"
    finally:
        child.kill()
        child.wait()
    assert process_alive(identity) is False  # reaped: no such process
    assert process_alive({**identity, "host": f"{socket.gethostname()}-other"}) is None  # another host's: unknown
