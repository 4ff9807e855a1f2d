"""``crossmodal`` command line: data sets, annotation simulation, offline training.

Examples::

    crossmodal data phantom --out data/phantom --cases 8 --dense 2 --sparse 2 --misregistration-mm 4
    crossmodal data fetch-spm --out data/spm12
    crossmodal data brain --templates data/spm12 --out data/brain --cases 12 --dense 3 --sparse 3
    crossmodal data brain --templates data/spm12 --out data/mixed --cases 24 --variants typical,typical,typical,t2_flair
    crossmodal data sparsify --label data/brain/truth/brain000.nii.gz --out s.nii.gz --mode scribbles
    crossmodal data export-nnunet --studies data/brain --out data/Dataset001_Brain --test brain011
    crossmodal data to-dicom --studies data/brain --config brain --upload http://127.0.0.1:8042/dicom-web
    crossmodal data import-nnunet --dataset data/Dataset001_Brain --out data/brain2 --config brain
    crossmodal data from-dicom --dicom /media/cd/DICOM --out data/petct --config phantom
    crossmodal train --studies data/brain --config brain --model-dir apps/crossmodal/model
    crossmodal models --model-dir apps/crossmodal/model --publish train_03
    crossmodal propagate --studies data/phantom --config phantom --out grown/
    crossmodal predict --studies data/Dataset001_Brain --config brain --model brain_crossmodal.pt --out preds/
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import itertools
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from crossmodal.config import (
    IMAGE_EXTENSIONS,
    ConfigError,
    CrossModalConfig,
    load_config,
    parse_mirror_axes,
    parse_overlap,
)
from crossmodal.errors import CaseError, user_error_in  # not crossmodal.io: --help without torch and MONAI


def _config(args: argparse.Namespace, default: str) -> CrossModalConfig:
    return load_config(args.config or default)


GUESSED_CONFIG = ("preset name or YAML path; default: the preset whose modalities the folder's cases have (brain where "
                  "they are its own or the folder does not say)")


def _preset(args: argparse.Namespace, default: str, folder: str) -> str:
    """``--config``, or where it is not given the preset that names ``folder``'s modalities (``default`` where it
    does or the folder does not say), said on stderr when it is not ``default``: the brain's default on a CT + PET
    folder failed on each case's missing T2."""
    from crossmodal.data.studies import guess_preset

    if args.config:
        return args.config
    preset, why = guess_preset(folder, default)
    if why:
        print(f"crossmodal: {why}", file=sys.stderr)
    return preset


def _variant_cycle(args: argparse.Namespace, choices: Sequence[str]) -> Iterator[str]:
    """``--variants`` as an endless cycle (generate() makes the cases in index order: case i gets variants[i % n])."""
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(choices))
    if unknown or not variants:
        raise SystemExit(f"crossmodal data {args.what}: --variants {args.variants!r}: unknown {unknown}; "
                         f"give a comma-separated cycle of {sorted(choices)}")
    return itertools.cycle(variants)


def cmd_phantom(args: argparse.Namespace) -> int:
    """`crossmodal data phantom`: a synthetic CT + PET + MR studies folder."""
    from crossmodal.data.phantom import VARIANTS, make_phantom
    from crossmodal.data.studies import check_new_cases, generate

    cfg = _config(args, "phantom")
    check_new_cases(args.out, [f"{args.prefix}{i:03d}" for i in range(args.cases)], sidecar_dir=cfg.data.sidecar_dir)
    cycle = _variant_cycle(args, list(VARIANTS))
    recs = generate(args.out, cfg, lambda rng: make_phantom(cfg, rng, size=args.size,
                                                            misregistration_mm=args.misregistration_mm,
                                                            variant=next(cycle)),
                    args.cases, args.seed, args.prefix, args.dense, args.sparse, args.sparse_mode, args.ext)
    _report(recs)
    return 0


def cmd_fetch_spm(args: argparse.Namespace) -> int:
    """`crossmodal data fetch-spm`: the SPM12 tissue templates the brain cases are made from."""
    from crossmodal.data.brain import SPM_REQUIREMENT, SPM_WHEEL, extract_templates

    out = Path(args.out)
    wheel = Path(args.wheel) if args.wheel else out / SPM_WHEEL
    if not wheel.is_file():
        print(f"downloading {SPM_REQUIREMENT} from the package registry ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SPM_REQUIREMENT,
                        "-d", str(wheel.parent)], check=True)
    paths = extract_templates(wheel, out)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0


def cmd_brain(args: argparse.Namespace) -> int:
    """`crossmodal data brain`: T1 / T2 / PD brain cases from the SPM12 templates."""
    from crossmodal.data.brain import VARIANTS, load_templates, make_brain_case
    from crossmodal.data.studies import check_new_cases, generate

    cfg = _config(args, "brain")
    check_new_cases(args.out, [f"{args.prefix}{i:03d}" for i in range(args.cases)], sidecar_dir=cfg.data.sidecar_dir)
    cycle = _variant_cycle(args, VARIANTS)
    templates = load_templates(args.templates)
    recs = generate(args.out, cfg, lambda rng: make_brain_case(cfg, templates, rng,
                                                               misregistration_mm=args.misregistration_mm,
                                                               variant=next(cycle)),
                    args.cases, args.seed, args.prefix, args.dense, args.sparse, args.sparse_mode, args.ext)
    _report(recs)
    return 0


def cmd_sparsify(args: argparse.Namespace) -> int:
    """`crossmodal data sparsify`: scribbles or a few painted slices from a dense label."""
    from crossmodal.data.sparse import annotated_fraction, sparsify
    from crossmodal.io import case_id_of, load_volume, save_volume

    cfg = _config(args, "brain")
    vol = load_volume(args.label)
    if vol.shape[0] != 1:
        raise CaseError(case_id_of(args.label), args.label, f"a label must be one 3D label map, got {vol.shape[0]} "
                                                             "channels")
    dense = np.rint(vol[0].numpy()).astype(np.int64)
    values = {int(v) for v in np.unique(dense)} - {0}
    if cfg.labels.marked_background in values:  # its strokes were thinned again as if a class
        raise CaseError(case_id_of(args.label), args.label, f"holds {cfg.labels.marked_background_name} "
                                                             f"({cfg.labels.marked_background}): a sparse label "
                                                             "already; sparsify takes a dense label map")
    unknown = sorted(values - set(cfg.labels.classes.values()))
    if unknown or not np.allclose(vol[0].numpy(), dense, atol=1e-3):  # left out of the strokes without a word
        raise CaseError(case_id_of(args.label), args.label,
                        f"values {unknown or 'that are not whole numbers'} are not classes of the config "
                        f"{cfg.name!r} ({cfg.labels.foreground}); give --config with the preset whose labels these are")
    sp = sparsify(dense, cfg.labels, args.mode, np.random.default_rng(args.seed), axis=args.axis, step=args.step)
    save_volume(args.out, sp, vol.affine.numpy())
    fg = float((dense != 0).mean())
    print(json.dumps({"label": args.label, "out": args.out, "mode": args.mode,
                      "annotated_fraction": round(annotated_fraction(sp), 5),
                      "dense_foreground_fraction": round(fg, 5)}))
    return 0


def cmd_propagate(args: argparse.Namespace) -> int:
    """Grow the sparse final labels of a studies folder as training would, write them as viewer label maps."""
    import torch
    from tqdm import tqdm

    from crossmodal.data.studies import FINAL_LABELS, files_by_case, primary_images
    from crossmodal.io import OutputFolder, load_volume, save_volume
    from crossmodal.labels import IGNORE_INDEX, SPARSE, classify, from_training
    from crossmodal.propagate import grow_checked, heldout_accuracy
    from crossmodal.transforms import LoadCased, from_canonical

    preset = _preset(args, "brain", studies_folder(args.studies))
    given = {k: v for k, v in {"beta": args.beta, "threshold": args.threshold,
                               "min_heldout_accuracy": args.min_heldout_accuracy}.items() if v is not None}
    cfg = load_config(preset, overrides={"train": {"propagate": given}} if given else None)
    p = cfg.train.propagate
    studies = Path(as_studies(args.studies, preset, scratch=args.scratch))
    found, images = files_by_case(studies / FINAL_LABELS, "final label"), primary_images(studies)
    for case in args.cases or []:
        if case not in found:
            labelled = f"cases with a final label: {', '.join(found) or 'none'}"
            if case not in images:  # a typo read as a case without a label
                close = difflib.get_close_matches(case, list(images), n=1)
                raise ValueError(f"--cases {case}: not a case of {args.studies}"
                                 f"{f' (did you mean {close[0]}?)' if close else ''}; {labelled}")
            raise CaseError(case, studies / FINAL_LABELS, f"has no final label to propagate; {labelled}")
    load, out = LoadCased(cfg), OutputFolder(args.out, "propagated.json")
    out.check([f"{case}.nii.gz" for case in args.cases or found])  # on <studies>/labels/final: the labels replaced
    summary: dict[str, list[str]] = {"grown": [], "kept_as_drawn": [], "dense": []}
    for case in tqdm(args.cases or sorted(found), desc="propagate", unit="case"):
        label_file = found[case]
        image_file = images.get(case)
        if image_file is None:
            raise CaseError(case, studies, "has a final label but no primary image")
        if classify(np.rint(load_volume(label_file, case)[0].numpy()), cfg.labels) != SPARSE:
            summary["dense"].append(case)
            print(json.dumps({"case": case, "label": str(label_file), "kind": "dense", "propagated": False}))
            continue
        item = load({"image": str(image_file), "label": str(label_file), "label_kind": SPARSE})
        image, target = item["image"].as_tensor(), item["label"].as_tensor()
        grown, accuracy = grow_checked(image, target, p.beta, p.threshold, p.max_voxels, p.min_heldout_accuracy, case)
        if p.min_heldout_accuracy == 0:  # not checked: measured for the report only
            accuracy = heldout_accuracy(image, target, p.beta, p.threshold, p.max_voxels)
        kept = p.min_heldout_accuracy > 0 and accuracy is not None and accuracy < p.min_heldout_accuracy
        summary["kept_as_drawn" if kept else "grown"].append(case)
        path = out.writing(f"{case}.nii.gz")
        # in the series' own axis order (the working grid is in RAS order: to_canonical)
        values, affine = from_canonical(torch.from_numpy(from_training(grown[0].long().numpy(), cfg.labels))[None],
                                        item["image"])
        save_volume(path, values[0].contiguous().numpy(), affine.double().numpy())
        out.save(**summary)
        print(json.dumps({"case": case, "label": str(label_file), "kind": SPARSE, "propagated": not kept,
                          "heldout_accuracy": None if accuracy is None else round(accuracy, 4),
                          "drawn_fraction": round(float((target != IGNORE_INDEX).float().mean()), 4),
                          "labelled_fraction": round(float((grown != IGNORE_INDEX).float().mean()), 4),
                          "out": str(path)}))
    out.save(**summary)
    print(json.dumps(summary))
    if summary["kept_as_drawn"]:
        print(f"{len(summary['kept_as_drawn'])} case(s) failed the held-out stroke check "
              f"(min_heldout_accuracy {p.min_heldout_accuracy}) and train on their drawn voxels only; a preset with "
              f"train.propagate.method: none skips the walk", file=sys.stderr)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """`crossmodal data import-nnunet`: an nnU-Net v2 (or Decathlon / v1) dataset as a studies folder."""
    from crossmodal.data.nnunet import import_nnunet, list_cases
    from crossmodal.data.studies import check_new_cases

    cfg = load_config(_preset(args, "brain", args.dataset))
    check_new_cases(args.out, [c.case_id for c in list_cases(args.dataset, cfg)], instead="give a new folder",
                    sidecar_dir=cfg.data.sidecar_dir)
    _report(import_nnunet(args.dataset, args.out, cfg))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """`crossmodal data export-nnunet`: a studies folder as an nnU-Net v2 dataset."""
    from crossmodal.data.nnunet import export_nnunet

    studies = studies_folder(args.studies)
    meta = export_nnunet(studies, args.out, load_config(_preset(args, "brain", studies)), tuple(args.test))
    print(json.dumps(meta, indent=2))
    return 0


def cmd_to_dicom(args: argparse.Namespace) -> int:
    """`crossmodal data to-dicom`: a studies folder as DICOM series, optionally stored to a DICOMweb server."""
    import requests
    from tqdm import tqdm

    from crossmodal.data.studies import primary_images
    from crossmodal.dicom import case_to_dicom, upload
    from crossmodal.io import find_case, load_volume
    from crossmodal.labels import classify

    cfg = load_config(_preset(args, "brain", studies_folder(args.studies)))
    studies = Path(args.studies)
    images = list(primary_images(studies).values())
    if not images:
        raise FileNotFoundError(f"{studies}: no primary images (*.nii.gz, *.nii, *.nrrd, *.mha) in this studies folder")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="crossmodal-dicom-"))
    stored = 0
    try:
        for img in tqdm(images, desc="cases -> DICOM", unit="case"):
            case = find_case(img, cfg.modality_names, cfg.data.sidecar_dir)
            label = next((str(p) for e in IMAGE_EXTENSIONS
                          if (p := studies / "labels" / "final" / f"{case.case_id}{e}").is_file()), None)
            label = label if args.labels else None
            kind = classify(np.rint(load_volume(label, case.case_id)[0].numpy()), cfg.labels) if label else None
            files = {cfg.modality_names[0]: case.primary, **case.modalities}
            written = case_to_dicom(case.case_id, files, cfg, out, label, kind or "dense")
            if args.upload:
                try:
                    stored += upload([f for d in written.values() for f in ([d] if d.is_file() else d.glob("*.dcm"))],
                                     args.upload)
                except requests.RequestException as e:
                    raise ConnectionError(f"case {case.case_id!r}: storing to {args.upload} failed "
                                          f"({str(e).splitlines()[0][:200]}); is the DICOMweb server running?") from e
            print(json.dumps({"case": case.case_id, "series": sorted(k for k in written if k != "seg"),
                              "label": kind, "folder": str(out / case.case_id) if args.out else None}))
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    if args.upload:
        print(f"stored {stored} DICOM instances of {len(images)} cases in {args.upload}", file=sys.stderr)
    return 0


def cmd_from_dicom(args: argparse.Namespace) -> int:
    """`crossmodal data from-dicom`: DICOM series (a CD, a folder) as a studies folder."""
    from crossmodal.dicom import guess_dicom_preset, import_dicom, scan_series

    scanned, preset = None, args.config
    if not preset:  # the brain's default refused a CT + PET + MR folder: "no study with a MR series ... for 't1'"
        scanned = scan_series(args.dicom)
        preset, why = guess_dicom_preset(scanned[3], "brain", args.dicom)
        if why:
            print(f"crossmodal: {why}", file=sys.stderr)
    records = import_dicom(args.dicom, args.out, load_config(preset), skip_existing=args.skip_existing,
                           scanned=scanned)
    _report(records)
    failed = [r["case"] for r in records if "error" in r]
    existing = [r["case"] for r in records if r.get("existing")]
    left = f"; {len(existing)} already there, left as they are ({', '.join(existing[:5])}" \
        f"{' ...' if len(existing) > 5 else ''})" if existing else ""
    print(f"{len(records) - len(existing) - len(failed)} of {len(records) - len(existing)} cases -> {args.out}{left}",
          file=sys.stderr)
    if failed:
        print(f"crossmodal: error: {len(failed)} of {len(records) - len(existing)} cases not imported ({failed}; why: "
              "in their records above); the others were written (once those are fixed, the same command with "
              "--skip-existing imports them)", file=sys.stderr)
        return 2
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    """`crossmodal simulate`: the annotate-retrain loop without people; JSON + learning-curve PNG."""
    from crossmodal.simulate import (
        SimSpec,
        plot,
        resume_state,
        simulate_dataset,
        simulation_identity,
        summarize,
        write_json,
    )

    if len(set(args.seeds)) < len(args.seeds):  # a seed twice trained its curves twice, weighing them double
        twice = sorted({s for s in args.seeds if args.seeds.count(s) > 1})
        raise ValueError(f"--seeds {' '.join(map(str, args.seeds))}: {twice} given more than once; each seed once")
    preset = _preset(args, "brain", studies_folder(args.studies))
    studies = Path(as_studies(args.studies, preset, oracle=True, scratch=args.scratch))
    dataset = args.name or Path(args.studies).name
    from crossmodal.data.studies import primary_images, truth_files

    left = sorted(set(primary_images(studies)) - set(truth_files(studies)))
    if left:  # the annotator draws from the truth: said, not left out without a word
        print(f"crossmodal: {len(left)} of {len(primary_images(studies))} cases have no dense ground truth and are "
              f"left out of the simulation ({', '.join(left[:8])}{' ...' if len(left) > 8 else ''}): the simulated "
              "annotator labels a case from its truth (a studies folder: truth/<case>; an nnU-Net dataset: a label "
              "in labelsTr or labelsTs without the ignore label)", file=sys.stderr)
    spec = SimSpec(preset, args.test, args.initial, args.k, args.rounds, args.steps, args.patch, args.annotation)
    out = Path(args.out or os.environ.get("RESULTS_DIR", "bench/results"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="simulate-", dir=args.scratch))
    json_path = out / f"simulate_{dataset}.json"
    found: dict[str, list[dict]] = {"record": [], "reference": [], "cost": []}
    identity = simulation_identity(studies, spec)
    done: set[tuple[str, int]] = set()
    if args.resume:  # a run killed after hours, or seeds added: its finished curves stand (seeded training)
        try:
            earlier = json.loads(json_path.read_text())
        except FileNotFoundError:
            raise ValueError(f"--resume: {json_path}: no earlier run of this simulation there to resume (its --out "
                             "and --name give the file)") from None
        except ValueError as e:
            raise ValueError(f"--resume: {json_path}: does not read as JSON ({e}); run without --resume to "
                             "start again") from None
        kept, done, dropped = resume_state(earlier, spec, identity, str(json_path))
        found.update(kept)
        curves = sorted(k for k in done if k[0] != "full")
        print(f"crossmodal: resuming {json_path}: kept {len(kept['reference'])} full-annotation reference(s) and "
              f"{len(curves)} finished curve(s) ({', '.join(f'{s} seed {n}' for s, n in curves) or 'none'}); "
              f"training again: {', '.join(f'{s} seed {n}' for s, n in dropped) or 'none'} unfinished, and what "
              "was not run yet", file=sys.stderr)
    earlier = None if args.resume or not json_path.is_file() else json_path.with_suffix(".previous.json")
    if earlier:
        print(f"crossmodal: replacing {json_path} (--resume keeps its finished curves); it is kept as {earlier} once "
              "this run has a result to write", file=sys.stderr)

    def save() -> None:
        nonlocal earlier
        if earlier and json_path.is_file():  # a run stopped before its first result leaves the earlier one as it was
            os.replace(json_path, earlier)
            if (out / f"simulate_{dataset}.png").is_file():  # its curves' plot with it
                os.replace(out / f"simulate_{dataset}.png", earlier.with_suffix(".png"))
            earlier = None
        summary = summarize(found["record"], found["reference"])
        write_json(json_path, {"spec": vars(spec), "identity": identity, "records": found["record"],
                               "full_annotation": found["reference"], "scoring_cost": (found["cost"] or [{}])[0],
                               "summary": summary})
        if found["record"]:
            plot(summary, out / f"simulate_{dataset}.png")

    def emit(kind: str, item: dict) -> None:
        found[kind].append(item)
        print(json.dumps({k: v for k, v in item.items() if k not in ("cases", "dice_per_case")}), flush=True)
        save()

    simulate_dataset(studies, work, dataset, spec, args.seeds, args.strategies, emit, cost=not found["cost"],
                     done=done)
    save()
    print(f"-> {json_path}, {out / f'simulate_{dataset}.png'}")
    return 0


def studies_folder(path: str) -> str:
    """``path`` if it is a folder, else the error naming ``--studies`` (was ``[Errno 2] No such file or directory``
    for to-dicom and export-nnunet)."""
    if not Path(path).is_dir():  # MONAI Label's datastore would create it, empty, at a mistyped path
        raise FileNotFoundError(f"--studies {path}: no such folder (a studies folder or an nnU-Net v2 raw dataset)")
    from crossmodal.data.studies import check_not_dicom

    check_not_dicom(path)
    return path


def as_studies(path: str, preset: str, oracle: bool = False, scratch: str | None = None,
               training: bool = False) -> str:
    """A studies folder as is; an nnU-Net v2 raw dataset (it has a dataset.json) imported into a temp one (under
    ``scratch``: the command's temp folder, removed when it ends). ``training``: without its ``imagesTs`` cases that
    have no ``labelsTs`` label (a Decathlon's test set): test images, not training ones (they were unlabeled cases)."""
    studies_folder(path)
    if not (Path(path) / "dataset.json").is_file():
        return path
    from crossmodal.data.nnunet import import_nnunet, list_cases

    cfg = load_config(preset)
    left = [c.case_id for c in list_cases(path, cfg) if training and c.split == "test" and c.label is None]
    out = tempfile.mkdtemp(prefix="nnunet-", dir=scratch)
    records = import_nnunet(path, out, cfg, leave_out=left)
    if oracle:  # the simulator's annotator: every dense label becomes ground truth, no case starts labelled; a
        # sparse one is no truth (it was moved there too, and the first evaluation an IndexError on its 255)
        labels, truth = Path(out) / "labels" / "final", Path(out) / "truth"
        truth.mkdir(exist_ok=True)
        for r in records:
            if r["label"] is not None:
                label = labels / f"{r['case']}.nii.gz"
                if r["label"] == "dense":
                    label.replace(truth / label.name)
                else:
                    label.unlink()
    print(f"imported nnU-Net dataset {path} -> {out} (for this command only)", file=sys.stderr)
    if left:
        print(f"crossmodal: {len(left)} imagesTs case(s) without a labelsTs label ({', '.join(left[:8])}"
              f"{' ...' if len(left) > 8 else ''}) left out of training: test images, as nnU-Net has them (an "
              "unlabeled training case goes in imagesTr without a labelsTr label)", file=sys.stderr)
    return out


def _method_preset(preset: str, method: str | None, model_dir: str) -> str:
    """The preset as is, or with ``method`` applied, saved as ``<model_dir>/method_config.yaml`` (its path)."""
    if not method:
        return preset
    from crossmodal.config import save_config
    from crossmodal.serving.offline import method_config

    path = Path(model_dir) / "method_config.yaml"
    save_config(method_config(preset, method), path)
    return str(path)


def _device(name: str) -> str:
    """``--device``: auto, cpu, cuda or cuda:N, and a CUDA device only where one is visible."""
    import torch

    if name not in ("auto", "cpu") and not (name == "cuda" or name.startswith("cuda:")):
        raise ValueError(f"--device {name!r}: use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is visible here; use --device cpu (or auto)")
    return name


@contextlib.contextmanager
def training_log() -> Iterator[None]:
    """The train task's own log lines (cases without a modality, stroke transfer, atlas pseudo-labels, fine-tuning
    decisions) on stderr while a command trains, as the server's log shows them."""
    log = logging.getLogger("crossmodal")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s - crossmodal - %(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(min(level or logging.INFO, logging.INFO))
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


@contextlib.contextmanager
def quiet_engine_interrupts() -> Iterator[None]:
    """Leave out ignite's "Engine run is terminating due to exception: " with nothing after it: Ctrl-C's or
    SIGTERM's (an exception without a message) while a command trains; its own line says it."""
    engines = [logging.getLogger(f"ignite.engine.engine.{e}") for e in ("SupervisedTrainer", "SupervisedEvaluator")]
    for engine in engines:
        engine.addFilter(_not_an_empty_termination)
    try:
        yield
    finally:
        for engine in engines:
            engine.removeFilter(_not_an_empty_termination)


def _not_an_empty_termination(record: logging.LogRecord) -> bool:
    return record.getMessage() != "Engine run is terminating due to exception: "


def cmd_train(args: argparse.Namespace) -> int:
    """`crossmodal train`: the app's train task on a studies folder or nnU-Net dataset, then evaluation."""
    from crossmodal.io import case_id_of
    from crossmodal.serving.offline import check_held_out, evaluate, evaluation_table, held_out_cases, train_offline

    if args.epochs is not None and args.epochs < 1:
        raise ValueError(f"--epochs {args.epochs}: must be at least 1 (leave it out for the preset's max_epochs)")
    _device(args.device)

    preset = _preset(args, "brain", studies_folder(args.studies))
    studies = as_studies(args.studies, preset, scratch=args.scratch, training=True)
    resolved = _method_preset(preset, args.method, args.model_dir)
    network = args.network or (load_config(resolved).model.name if args.method else None)
    check_held_out(studies, load_config(resolved).labels.num_classes)  # the evaluation after it: before training
    # the cases that evaluation scores are not trained on, not even as unlabelled cases (unless asked)
    cases = held_out_cases(studies)
    tests = [] if args.train_on_test_images else [case_id_of(p) for p in cases]
    try:
        with training_log():
            stats = train_offline(studies, resolved, args.model_dir, args.epochs, args.device, publish=args.publish,
                                  pretrained=args.pretrained, network=network, use_unlabeled=not args.no_unlabeled,
                                  processes=args.processes, dataset=args.dataset, publish_mode=args.publish_mode,
                                  missing_modality=args.missing_modality, from_scratch=args.from_scratch,
                                  early_stop_patience=args.early_stop_patience, seed=args.seed, held_out=tests)
    except KeyboardInterrupt as e:  # Ctrl-C / SIGTERM: say what is in service (main prints it), not a traceback
        from crossmodal.serving.runs import interrupted_note

        args.interrupted = interrupted_note(args.model_dir, "terminated" if isinstance(e, Terminated) else
                                            "interrupted")
        raise
    print(json.dumps(stats, indent=2, default=str))
    if stats.get("start_metric") is not None:  # a model in service and held-out labels (--publish-mode if_better)
        outcome = (f"no epoch beat it, so that model stays (published: {stats['published']})"
                   if not stats["best_metric"] > stats["start_metric"] else f"published {stats['published']}")
        what = "trained from scratch beside" if args.from_scratch else "fine-tuned"
        print(f"{what} {stats['start_model']}: held-out Dice {stats['start_metric']:.4f} before, this run's "
              f"best {stats['best_metric']:.4f}: {outcome}")
    if fit := stats.get("training_fit"):  # no label held out, a model in service (--publish-mode if_better)
        outcome = f"published {stats['published']}" if fit["published"] else \
            f"more than train.fit_tolerance worse, so that model stays (published: {stats['published']}); train " \
            "again with a lower learning rate or more epochs"
        what, before, after = ("trained from scratch beside", "by the model in service", "by this run's") \
            if fit["from_scratch"] else ("fine-tuned", "before", "after")
        print(f"{what} {stats['start_model']} with no label held out: Dice on its own labelled cases "
              f"{fit['start']:.4f} {before}, {fit['end']:.4f} {after}: {outcome}")
    if cases:  # held-out test cases (truth, no final label): Dice and HD95 per case
        out = str(Path(args.model_dir) / "evaluation.json")
        summary = evaluate(studies, resolved, stats["published"], args.device, out, network,
                           missing_modality=args.missing_modality)
        print(f"test cases: {summary['cases']}, mean Dice {summary['dice_mean']:.4f}, "
              f"mean HD95 {summary['hd95_mean']:.2f} mm -> {out}"
              + (" (their images trained as unlabelled cases: --train-on-test-images)" * args.train_on_test_images))
        print(evaluation_table(summary), file=sys.stderr)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """`crossmodal models`: the training runs of a model folder and which is in service; ``--publish`` puts an
    earlier run's model back in service."""
    from crossmodal.serving.runs import format_runs, list_runs, publish_run

    if args.publish:
        run = publish_run(args.model_dir, args.publish)
        score = f" ({run.metric} {run.best:.4f})" if run.best is not None and run.metric else ""
        print(f"published {run.model}{score} as {run.published}; a running server segments with it from its next "
              "infer request")
    runs = list_runs(args.model_dir)
    if not runs:
        print(f"no training runs under {args.model_dir}")
        return 0
    print(format_runs(runs))
    return 0


def _weights_file(path: str) -> None:
    """``--model`` checked before the data set is read (was ``conf pretrained for crossmodal: ...`` after it)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--model {path}: no such weights file")


def _segmenting(args: argparse.Namespace, preset: str
                ) -> tuple[str, str | None, tuple[int, ...] | None, float | None]:
    """(the preset, with ``--method`` applied in the command's temp folder; the network; the mirror axes; the
    sliding window's overlap) of a command that segments cases (:func:`segmenting_args`), checked before any case
    is read."""
    resolved = preset
    if args.method:
        resolved = _method_preset(preset, args.method, tempfile.mkdtemp(prefix="method-", dir=args.scratch))
    network = args.network or (load_config(resolved).model.name if args.method else None)
    mirror = None if args.mirror_axes is None else parse_mirror_axes(args.mirror_axes, "--mirror-axes")
    overlap = None if args.overlap is None else parse_overlap(args.overlap, "--overlap")
    return resolved, network, mirror, overlap


def cmd_evaluate(args: argparse.Namespace) -> int:
    """`crossmodal evaluate`: Dice / HD95 of a model (or of given predictions) on the held-out cases: JSON on stdout
    (per case, then the summary), a table on stderr."""
    from crossmodal.serving.offline import evaluate, evaluation_table

    _device(args.device)

    if (args.model is None) == (args.predictions is None):
        raise ValueError("give --model (segment the held-out cases with it) or --predictions (score label maps "
                         "made before), one of them")
    if args.model:
        _weights_file(args.model)
    if args.predictions and not Path(args.predictions).is_dir():
        raise FileNotFoundError(f"--predictions {args.predictions}: no such folder")
    preset = _preset(args, "brain", studies_folder(args.studies))
    if (Path(args.studies) / "dataset.json").is_file():  # said of the dataset, not of its temp import
        from crossmodal.data.nnunet import check_test_labels

        check_test_labels(args.studies, load_config(preset))
    studies = as_studies(args.studies, preset, scratch=args.scratch)
    resolved, network, mirror, overlap = _segmenting(args, preset)
    classes = None
    if args.predictions:  # nnUNetv2_predict's maps on an nnU-Net dataset, in its values
        classes = _dataset_classes(args.studies, load_config(resolved))
    summary = evaluate(studies, resolved, args.model, args.device, args.out, network, tuple(args.drop), mirror,
                       args.missing_modality, args.predictions, overlap, classes)
    for r in summary["per_case"]:
        print(json.dumps(r))
    print(json.dumps({k: v for k, v in summary.items() if k != "per_case"}, indent=2))
    print(evaluation_table(summary), file=sys.stderr)
    return 0


def _dataset_classes(studies: str, cfg: CrossModalConfig) -> dict[int, int] | None:
    """{an nnU-Net dataset's class value: the preset's} (:func:`crossmodal.data.nnunet.class_map`); None for a
    studies folder."""
    if not (Path(studies) / "dataset.json").is_file():
        return None
    from crossmodal.data.nnunet import class_map, read_dataset_json

    return class_map(studies, read_dataset_json(studies), cfg)


def cmd_predict(args: argparse.Namespace) -> int:
    """Segment the cases of a studies folder (an nnU-Net dataset: its imagesTs cases) into ``--out``; exit 2 naming
    the cases that could not be segmented, after segmenting the others."""
    from crossmodal.io import format_mm
    from crossmodal.serving.offline import PREDICTIONS_JSON, predict

    _device(args.device)
    _weights_file(args.model)
    preset = _preset(args, "brain", studies_folder(args.studies))
    cases = args.cases
    if not cases and (Path(args.studies) / "dataset.json").is_file():  # nnU-Net: its test images, as nnU-Net predicts
        from crossmodal.data.nnunet import list_cases

        cases = [c.case_id for c in list_cases(args.studies, load_config(preset)) if c.split == "test"] or None
    studies = as_studies(args.studies, preset, scratch=args.scratch)
    resolved, network, mirror, overlap = _segmenting(args, preset)
    classes = None
    cfg = load_config(resolved)
    if theirs := _dataset_classes(args.studies, cfg):  # maps in the dataset's values, as its labelsTs
        if sorted(theirs.values()) == sorted(cfg.labels.classes.values()):
            classes = {ours: value for value, ours in theirs.items()}
        else:  # a class the dataset has no value for: the maps keep the preset's
            print(f"crossmodal: {args.studies}/dataset.json names {len(theirs)} of the preset's "
                  f"{len(cfg.labels.classes)} classes; the maps hold the preset's values {cfg.labels.classes}",
                  file=sys.stderr)
    summary = predict(studies, resolved, args.model, args.out, cases, args.device, network, tuple(args.drop), mirror,
                      args.missing_modality, args.extension, overlap, classes)
    for r in summary["per_case"]:
        if "error" in r:
            print(f"{r['case']}: not segmented: {r['error']}")
        else:
            volumes = ", ".join(f"{n} {v:.1f} ml" for n, v in r["volume_ml"].items())
            partial = "".join(f"; {m} on {c:.0%} of the grid: used where it has data" for m, c in r["coverage"].items()
                              if c < cfg.data.fov_coverage and m in r["modalities_used"])
            own, seen = r["voxel_mm"].get("case"), r["voxel_mm"].get("network")
            if own and seen and not np.allclose(own, seen, atol=1e-2):  # resampled for the network
                partial += f"; {format_mm(own)} mm voxels, segmented at {format_mm(seen)} mm"
            print(f"{r['case']}: {volumes} ({r['seconds']:.1f} s, uncertainty {r['uncertainty']:.3f}{partial}) -> "
                  f"{r['file']}")
    report = Path(args.out) / PREDICTIONS_JSON
    failed = summary["failed"]
    if failed:
        written = "the others were written" if len(failed) < len(summary["per_case"]) else "none was written"
        print(f"crossmodal: error: {len(failed)} of {len(summary['per_case'])} cases not segmented ({failed}; why: "
              f"above and in {report}); {written}", file=sys.stderr)
        return 2
    print(f"{summary['segmented']} cases segmented -> {args.out} ({report}); most uncertain first: "
          f"{', '.join(summary['review_order'][:5])}")
    return 0


def _report(records: Sequence[dict]) -> None:
    for r in records:
        print(json.dumps(r))


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low`` (``--cases 0`` made an empty folder and exited 0).

    Example:
        >>> at_least(1)("3")
        3
        >>> at_least(1)("0")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: must be at least 1, got 0
    """
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def finite_at_least(low: float) -> Callable[[str], float]:
    """argparse type: a finite float >= ``low`` (``--misregistration-mm -4`` or ``nan`` made cases whose records
    said so).

    Example:
        >>> finite_at_least(0.0)("2.5")
        2.5
        >>> finite_at_least(0.0)("-4")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: must be a finite number of at least 0.0, got '-4'
    """
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"must be a finite number of at least {low}, got {text!r}")
        return value

    return parse


def segmenting_args(q: argparse.ArgumentParser, missing_error: str) -> None:
    """The options of the commands that segment cases with a model (``evaluate``, ``predict``); ``missing_error``:
    what becomes of a case without a secondary modality's file under the preset's ``error`` policy."""
    q.add_argument("--device", default="auto")
    q.add_argument("--network", help="network name (default: the preset's model.name)")
    q.add_argument("--method", help="ours | baseline_unet | single_<modality>, as the model was trained")
    q.add_argument("--drop", nargs="*", default=[], help="modalities to segment without (missing at test time)")
    q.add_argument("--missing-modality", choices=("error", "zero_fill"),
                   help=f"a case without a secondary modality's file: {missing_error}, or segment it with what it "
                        "has (zero_fill)")
    q.add_argument("--mirror-axes", help="test-time mirroring along these spatial axes, e.g. 0,1,2 (8 passes); "
                                         "none: one pass (default: the preset's infer.mirror_axes)")
    q.add_argument("--overlap", help="the sliding window's overlap for a case larger than one window, in [0, 1) "
                                     "(default: the preset's infer.overlap); more: more windows, slower")


def versions() -> str:
    """This package's version and those of the stack it runs on (what a bug report needs), from the installed
    packages' metadata: nothing is imported.

    Example:
        >>> versions().startswith("crossmodal 0.1.0 (MONAI ")
        True
    """
    from importlib.metadata import PackageNotFoundError, version

    from crossmodal import __version__

    def of(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    stack = ", ".join(f"{name} {of(dist)}" for name, dist in (("MONAI", "monai"), ("MONAI Label", "monailabel"),
                                                               ("torch", "torch")))
    return f"crossmodal {__version__} ({stack}; Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    """The ``crossmodal`` argument parser, every subcommand with its options."""
    p = argparse.ArgumentParser(prog="crossmodal", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--version", action="version", version=versions())
    sub = p.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="make, convert and sparsify data sets")
    data_sub = data.add_subparsers(dest="what", required=True)

    def gen_args(q: argparse.ArgumentParser, prefix: str) -> None:
        q.add_argument("--out", required=True, help="studies folder to write")
        q.add_argument("--cases", type=at_least(1), default=8)
        q.add_argument("--seed", type=at_least(0), default=0)
        q.add_argument("--prefix", default=prefix, help="case id prefix")
        q.add_argument("--dense", type=at_least(0), default=0, help="cases given a dense final label")
        q.add_argument("--sparse", type=at_least(0), default=0, help="cases given a sparse final label")
        q.add_argument("--sparse-mode", default="scribbles", choices=("scribbles", "slices"))
        q.add_argument("--misregistration-mm", type=finite_at_least(0.0), default=0.0,
                       help="shift of the secondary modalities against the primary, in mm")
        q.add_argument("--ext", default=".nii.gz", choices=(".nii.gz", ".nii", ".nrrd", ".mha"))
        q.add_argument("--config", help="preset name or YAML path")
        q.add_argument("--variants", default="typical",
                       help="comma-separated cycle of case variants by case index; phantom: typical, cold_lesion (no"
                            " tracer uptake in the lesion), other_mr_weighting; brain: typical, t2_flair")

    q = data_sub.add_parser("phantom", help="synthetic CT/PET/MR phantoms")
    gen_args(q, "phantom")
    q.add_argument("--size", type=at_least(16), default=48, help="primary grid size per axis (at least 16)")
    q.set_defaults(func=cmd_phantom)

    q = data_sub.add_parser("fetch-spm", help="download the SPM12 wheel (set-up time), check sha256, extract templates")
    q.add_argument("--out", required=True)
    q.add_argument("--wheel", help="an already downloaded wheel")
    q.set_defaults(func=cmd_fetch_spm)

    q = data_sub.add_parser("brain", help="real SPM12 T1/T2/PD brain cases")
    gen_args(q, "brain")
    q.add_argument("--templates", required=True, help="folder written by fetch-spm")
    q.set_defaults(func=cmd_brain)

    q = data_sub.add_parser("sparsify", help="simulate scribbles or painted slices from a dense label")
    q.add_argument("--label", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--mode", default="scribbles", choices=("scribbles", "slices"))
    q.add_argument("--axis", type=int, default=2, choices=(0, 1, 2))
    q.add_argument("--step", type=at_least(1), default=None, help="scribbles: every step-th slice (default 1); "
                   "slices: every step-th slice painted (default 5)")
    q.add_argument("--seed", type=at_least(0), default=0)
    q.add_argument("--config")
    q.set_defaults(func=cmd_sparsify)

    q = data_sub.add_parser("import-nnunet", help="nnU-Net v2 (or Decathlon, v1) dataset -> studies folder")
    q.add_argument("--dataset", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--config", help=GUESSED_CONFIG)
    q.set_defaults(func=cmd_import)

    q = data_sub.add_parser("export-nnunet", help="studies folder -> nnU-Net v2 raw dataset")
    q.add_argument("--studies", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--test", nargs="*", default=[], help="case ids for imagesTs/labelsTs")
    q.add_argument("--config", help=GUESSED_CONFIG)
    q.set_defaults(func=cmd_export)

    q = data_sub.add_parser("to-dicom", help="studies folder -> DICOM: one study per case, one series per modality, "
                                         "labels as SEG; optionally stored in a DICOMweb server")
    q.add_argument("--studies", required=True)
    q.add_argument("--out", help="folder for <case>/<modality>/*.dcm and <case>/seg.dcm (default: temp, removed)")
    q.add_argument("--upload", metavar="URL", help="DICOMweb root to store into, e.g. http://127.0.0.1:8042/dicom-web")
    q.add_argument("--no-labels", dest="labels", action="store_false", help="leave the final labels out")
    q.add_argument("--config", help=GUESSED_CONFIG)
    q.set_defaults(func=cmd_to_dicom)

    q = data_sub.add_parser("from-dicom", help="DICOM files (a PACS export, any layout) -> studies folder: a case per "
                                           "study, its series matched to the config's modalities, SEG as labels")
    q.add_argument("--dicom", required=True, help="folder searched for DICOM files (subfolders too)")
    q.add_argument("--out", required=True)
    q.add_argument("--config", help="preset name or YAML path; default: the preset whose modalities' series (DICOM "
                                    "Modality, SeriesDescription) the most studies have all of (brain where it is "
                                    "one of them or none fits)")
    q.add_argument("--skip-existing", action="store_true",
                   help="leave the cases --out already holds as they are and import the others (after fixing the "
                        "cases an earlier import named); without it such cases are refused")
    q.set_defaults(func=cmd_from_dicom)

    q = sub.add_parser("train", help="train the app's model on a studies folder (same code as the server)")
    q.add_argument("--studies", required=True, help="studies folder or nnU-Net v2 raw dataset")
    q.add_argument("--config", help=GUESSED_CONFIG)
    q.add_argument("--model-dir", required=True)
    q.add_argument("--epochs", type=int, default=None)
    q.add_argument("--device", default="auto")
    q.add_argument("--publish", help="also copy the published model here (the best by validation; the last one "
                                     "when no label is held out; fine-tuning --pretrained with held-out labels: "
                                     "that model when no epoch beats it)")
    q.add_argument("--pretrained", help="weights to start from")
    q.add_argument("--publish-mode", default="if_better", choices=("if_better", "best_of_run"),
                   help="fine-tuning with held-out labels: publish an epoch only when it validates better than the "
                        "model it started from (if_better), or the run's best whatever it scores (best_of_run)")
    q.add_argument("--from-scratch", action="store_true",
                   help="start from random weights even where a model is published in --model-dir (or "
                        "--pretrained): with held-out labels it replaces that model only by beating it")
    q.add_argument("--network", help="network name (default: the preset's model.name)")
    q.add_argument("--method", help="ours | baseline_unet | single_<modality> (applied to the preset)")
    q.add_argument("--no-unlabeled", action="store_true", help="leave the unlabelled cases out")
    q.add_argument("--train-on-test-images", action="store_true",
                   help="take the held-out test cases (truth, no final label: those the evaluation after training "
                        "scores) into the unlabelled cases too (transductive; by default they take no part in "
                        "training)")
    q.add_argument("--missing-modality", choices=("error", "zero_fill"),
                   help="a case without a secondary modality's file: stop with an error naming it (the preset's "
                        "default), or train on it (and evaluate it) with that modality left out (zero_fill)")
    q.add_argument("--processes", type=at_least(1), default=1,
                   help="data-parallel processes (gloo on CPU, NCCL on GPUs)")
    q.add_argument("--dataset", default="CacheDataset", choices=("CacheDataset", "Dataset"),
                   help="CacheDataset keeps every preprocessed labelled case in memory (faster epochs); Dataset "
                        "reads each case as it comes (memory for many large cases)")
    q.add_argument("--early-stop-patience", type=int, default=-1, metavar="N",
                   help="stop after N validations without a better held-out score (default -1: train every epoch)")
    q.add_argument("--seed", type=at_least(0), default=None,
                   help="the run's random seed: initial weights, dropout, augmentation, patch sampling (default: the "
                        "preset's train.seed; the same seed, data and settings train the same model)")
    q.set_defaults(func=cmd_train)

    q = sub.add_parser("models", help="list the training runs of a model folder (scores, the one in service) and put "
                                      "an earlier run's model back in service")
    q.add_argument("--model-dir", required=True, help="the server's <app>/model (or --conf model_dir), or crossmodal "
                                                      "train's --model-dir")
    q.add_argument("--publish", metavar="RUN", help="put this run's model (train_NN) in service, with its train stats")
    q.set_defaults(func=cmd_models)

    q = sub.add_parser("simulate", help="annotate-retrain loop without people: strategies x seeds x rounds -> "
                                        "learning curves (JSON + PNG)")
    q.add_argument("--studies", required=True, help="studies folder with truth/ for every case, or nnU-Net dataset")
    q.add_argument("--config", help=GUESSED_CONFIG)
    q.add_argument("--name", help="dataset name in the results (default: the folder name)")
    q.add_argument("--strategies", nargs="+", default=["ours", "random", "epistemic"],
                   choices=["ours", "random", "epistemic"])
    q.add_argument("--seeds", nargs="+", type=at_least(0), default=[0, 1, 2])
    q.add_argument("--test", type=int, default=4, help="held-out test cases (the last ones, sorted)")
    q.add_argument("--initial", type=int, default=2, help="seed set size (the same for every strategy)")
    q.add_argument("--k", type=int, default=2, help="cases picked per round")
    q.add_argument("--rounds", type=int, default=5)
    q.add_argument("--steps", type=int, default=120, help="optimiser steps per round (fine-tuning)")
    q.add_argument("--patch", type=int, default=32)
    q.add_argument("--annotation", default="scribbles", choices=["scribbles", "dense"])
    q.add_argument("--out", help="results folder (default RESULTS_DIR or bench/results)")
    q.add_argument("--work", help="working folder, kept (default: a temp one, removed at the end)")
    q.add_argument("--resume", action="store_true",
                   help="keep the finished curves and references of --out's simulate_<name>.json (the same "
                        "simulation, killed, or given more seeds or strategies) and train only the rest")
    q.set_defaults(func=cmd_simulate)

    q = sub.add_parser("propagate", help="grow the sparse final labels as training would (random walker over every "
                       "modality, held-out stroke check) and write them as label maps to look at in a viewer")
    q.add_argument("--studies", required=True, help="studies folder or nnU-Net v2 raw dataset")
    q.add_argument("--config", help=f"{GUESSED_CONFIG}; its train.propagate settings apply (it walks even with "
                   "method: none, to show what propagation would give)")
    q.add_argument("--cases", nargs="*", help="case ids (default: every case with a final label)")
    q.add_argument("--out", required=True, help="folder for <case>.nii.gz (0 = still unannotated)")
    q.add_argument("--threshold", type=float, help="override train.propagate.threshold")
    q.add_argument("--beta", type=float, help="override train.propagate.beta")
    q.add_argument("--min-heldout-accuracy", type=float, help="override train.propagate.min_heldout_accuracy")
    q.set_defaults(func=cmd_propagate)

    q = sub.add_parser("evaluate", help="Dice of a model on the held-out cases of a studies folder (truth, no label)")
    q.add_argument("--studies", required=True, help="studies folder or nnU-Net v2 raw dataset (its imagesTs/labelsTs)")
    q.add_argument("--config", help=GUESSED_CONFIG)
    q.add_argument("--model", help="weights to segment the held-out cases with")
    q.add_argument("--predictions", help="instead of --model: a folder of label maps <case>.nii.gz made before "
                                         "(crossmodal predict, nnUNetv2_predict, ...) on each case's grid")
    q.add_argument("--out", help="write the JSON summary here")
    segmenting_args(q, "an error naming it (the preset's default)")
    q.set_defaults(func=cmd_evaluate)

    q = sub.add_parser("predict", help="segment cases with a model, as the server's infer does: one label map per "
                                       "case on its primary image's grid, and predictions.json (volumes, timings)")
    q.add_argument("--studies", required=True,
                   help="studies folder (every case) or nnU-Net v2 raw dataset (its imagesTs cases)")
    q.add_argument("--config", help=GUESSED_CONFIG)
    q.add_argument("--model", required=True)
    q.add_argument("--out", required=True, help="folder for <case><extension> and predictions.json")
    q.add_argument("--cases", nargs="+", help="only these case ids")
    q.add_argument("--extension", default=".nii.gz", choices=IMAGE_EXTENSIONS)
    segmenting_args(q, "recorded as not segmented, naming it (the preset's default)")
    q.set_defaults(func=cmd_predict)
    return p


USER_ERRORS = (CaseError, ConfigError, FileNotFoundError, ValueError, ConnectionError)


FILE_OUTPUTS = {("evaluate", "out"), ("sparsify", "out"), ("train", "publish")}  # the rest: folders


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse, before any work, an output path that cannot be written: a folder option naming a file, a file option
    naming a folder, or a path under a file or an unwritable folder (``--model-dir`` on a file was a
    ``FileExistsError`` traceback; ``evaluate --out`` under a file one after the whole evaluation).

    Raises:
        ValueError: naming the option, the path and what is wrong.
    """
    command = args.what if args.command == "data" else args.command
    for attr in ("out", "model_dir", "work", "publish"):
        value = getattr(args, attr, None)
        if not value:
            continue
        option, path = f"--{attr.replace('_', '-')} {value}", Path(value)
        is_file = (command, attr) in FILE_OUTPUTS
        if is_file and path.is_dir():
            raise ValueError(f"{option}: is a folder; give a file name")
        if not is_file and path.exists() and not path.is_dir():
            raise ValueError(f"{option}: is a file; give a folder")
        above = path.parent if is_file or not path.exists() else path
        while not above.exists():
            above = above.parent
        if not above.is_dir():
            raise ValueError(f"{option}: {above} is a file, not a folder")
        if not os.access(above, os.W_OK | os.X_OK):
            raise ValueError(f"{option}: {above} is not writable")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit, ``timeout``, ``docker stop``, ``kill``) raised in the main thread as Ctrl-C
    is, so that what a command made for itself goes (the scratch folder: a whole nnU-Net dataset's copy) and a
    training run says what serves."""


def _raise_terminated(signum: int, frame: object) -> None:
    import multiprocessing

    for child in multiprocessing.active_children():  # data-parallel trainers and loader workers: they would outlive it
        child.terminate()
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the subcommand; a user error prints its message and exits 2; Ctrl-C exits 130 and SIGTERM
    143, each with one line (and the temp files gone)."""
    args = build_parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        check_outputs(args)
        # what a command makes for itself (an nnU-Net dataset imported, simulate's rounds without --work) goes when it
        # ends: each run left a copy of the dataset in the temp folder
        with tempfile.TemporaryDirectory(prefix="crossmodal-") as scratch, quiet_engine_interrupts():
            args.scratch = scratch
            return int(args.func(args))
    except Exception as e:  # a case / config error, also one MONAI or ignite wrapped, is a message; the rest a bug
        shown = user_error_in(e) or (e if isinstance(e, USER_ERRORS) else None)
        if shown is None:
            raise
        print(f"crossmodal: error: {shown}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: one line (what a training run leaves in service), the exit
        note = getattr(args, "interrupted", None)  # status of a shell's job killed by that signal
        command = " ".join(c for c in (args.command, getattr(args, "what", None)) if c)
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"\ncrossmodal {command}: {what}" + (f": {note}" if note else ""), file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, before if before is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())

