"""The full demo training as a viewer starts it: time, peak memory, and what it buys on the demo's unlabelled cases.

On a copy of the demo data set (`make data`: 12 brain cases, 2 dense labels, 2 scribbled, 8 unlabelled) it
starts `monailabel start_server` with the app as `make run` does, asks for a training of `crossmodal` with the
app's defaults (what 3D Slicer's "Train" button sends), polls `/train/` until done, records the peak RSS of the
server and of the training process MONAI Label starts under it (sampled every second), and scores the published
model against the truth of the 8 unlabelled cases before (committed weights) and after training. Writes
`demo_training.json` to RESULTS_DIR (default bench/results), with the run's learning curve, and copies the run's
`learning_curve.png` to docs/demo_learning_curve.png (the README's).

`--from-scratch` sends the Train button's `pretrained` unticked: a run from the network's initial weights, with
the atlas pseudo-labels and stroke transfer that only such a run makes; it writes `demo_training_scratch.json` and
leaves the README's curve as it is.

    python bench/demo_training.py [--from-scratch]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from benchutil import results_dir  # noqa: E402
from conftest import start_server, stop_server  # noqa: E402
from crossmodal.serving.offline import evaluate  # noqa: E402
from monailabel.client import MONAILabelClient  # noqa: E402

PRETRAINED = REPO / "apps" / "crossmodal" / "pretrained" / "brain_crossmodal.pt"


def peak_rss_gb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2
    except OSError:  # gone
        pass
    return 0.0


def descendants(pid: int) -> list[int]:
    """The process tree under ``pid`` (MONAI Label trains in a child process of the server)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from-scratch", action="store_true", help="train from the network's initial weights "
                                                                 "(the Train button's `pretrained` unticked)")
    args = ap.parse_args()
    demo = REPO / "data" / "brain"
    if not (demo / "truth").is_dir():
        print(f"{demo} is missing: run `make data` first", file=sys.stderr)
        return 2
    results = results_dir()
    with tempfile.TemporaryDirectory(prefix="bench-demo-train-") as tmp:
        studies = Path(tmp) / "brain"
        shutil.copytree(demo, studies, ignore=shutil.ignore_patterns("datastore_v2.json", ".lock"))
        before = evaluate(str(studies), "brain", str(PRETRAINED), "cpu", network="crossmodal")
        server = start_server(studies, Path(tmp) / "model", Path(tmp) / "server.log",
                              {"preset": "brain", "models": "crossmodal"})
        try:
            client = MONAILabelClient(server.url, tmpdir=tmp)
            defaults = client.info()["trainers"]["crossmodal"]["config"]
            Path(f"/proc/{server.proc.pid}/clear_refs").write_text("5")
            t = time.perf_counter()
            # the app's defaults, as the viewers' Train button
            client.train_start("crossmodal", {"pretrained": False} if args.from_scratch else {})
            time.sleep(2)
            peaks: dict[int, float] = {}  # peak RSS of the server and of every process under it, sampled
            while client.train_status(check_if_running=True):
                for pid in [server.proc.pid, *descendants(server.proc.pid)]:
                    peaks[pid] = max(peaks.get(pid, 0.0), peak_rss_gb(pid))
                time.sleep(1)
            seconds = time.perf_counter() - t
            rss = max(peaks.values())
            stats = client.info()["train_stats"]["crossmodal"]
        finally:
            stop_server(server)
        published = Path(tmp) / "model" / "brain_crossmodal.pt"
        was_published = published.is_file()  # False: no epoch beat the committed model, which stays
        after = evaluate(str(studies), "brain", str(published if was_published else PRETRAINED), "cpu",
                         network="crossmodal")
        run = max((Path(tmp) / "model").glob("train_*"), key=lambda p: p.stat().st_mtime)
        curve = json.loads((run / "learning_curve.json").read_text())
        if not args.from_scratch:
            shutil.copyfile(run / "learning_curve.png", REPO / "docs" / "demo_learning_curve.png")
    record = {
        "from_scratch": args.from_scratch, "train_seconds": round(seconds, 1), "peak_rss_gb": round(rss, 3),
        "epochs": stats.get("epoch"),
        "iterations_per_epoch": stats.get("total_iterations"), "max_epochs": defaults.get("max_epochs"),
        "train_metrics": stats.get("train", {}).get("metrics"), "best_val_metric": stats.get("best_metric"),
        "start_val_metric": stats.get("start_metric"), "published": was_published,
        "unlabeled_cases_scored": after["cases"], "dice_before": round(before["dice_mean"], 4),
        "dice_after": round(after["dice_mean"], 4), "dice_per_class_before": before["dice_per_class"],
        "dice_per_class_after": after["dice_per_class"], "hd95_before": round(before["hd95_mean"], 2),
        "hd95_after": round(after["hd95_mean"], 2), "learning_curve": curve,
    }
    (results / f"demo_training{'_scratch' if args.from_scratch else ''}.json").write_text(json.dumps(record, indent=2))
    print(json.dumps({k: v for k, v in record.items() if k != "learning_curve"}, indent=2))
    print(f"\ndemo training{' from scratch' if args.from_scratch else ''}: {seconds / 60:.1f} min ({record['epochs']} "
          f"epochs x {record['iterations_per_epoch']} "
          f"steps), peak RSS {rss:.2f} GB; Dice on the {after['cases']} unlabelled cases "
          f"{record['dice_before']:.3f} -> {record['dice_after']:.3f}; held-out validation "
          f"{record['start_val_metric'] or float('nan'):.3f} (committed model) -> {record['best_val_metric']:.3f} "
          f"(this run's best: {'published' if record['published'] else 'not published, the committed model stays'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
