# The README's two commands: `make run` (set up, demo data, server on 127.0.0.1:8000) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8000
HOST ?= 127.0.0.1
DEMO := data/brain
SPM := data/spm12/TPM.nii
PYTEST_ARGS ?=
TEST_WORKERS ?= 2
PRE := apps/crossmodal/pretrained
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

.PHONY: install install-system data run pacs test lint bench-infer bench-quality bench-mirror bench-cleanup bench-overlap bench-uncertainty bench-propagate bench-refine bench-pool bench-scoring bench-transfer bench-scribble-gap bench-incomplete bench-workers bench-demo-train bench-gpu bench-ohif simulate weights weights-phantom weights-brain clean

install: install-system $(STAMP)

# Debian packages: Orthanc + its DICOMweb plugin (the PACS of `make pacs` and the tests), Chromium + ChromeDriver
# (the OHIF browser test). Installed only when missing; as root, or through sudo.
SYSTEM_PKGS := orthanc orthanc-dicomweb chromium chromium-driver
install-system:
	@missing=""; for p in $(SYSTEM_PKGS); do dpkg -s $$p > /dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing > /dev/null; \
	fi

# torchvision arrives with monailabel/sam2 but is built for CUDA torch and fails to import beside the CPU
# build ("operator torchvision::nms does not exist"); nothing we run needs it, so it is removed.
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -m pip uninstall --yes --quiet torchvision || true
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# Real brain templates: the SPM12 wheel from PyPI, sha256-checked, unpacked (set-up time only).
$(SPM): | $(STAMP)
	$(BIN)/crossmodal data fetch-spm --out data/spm12

$(DEMO)/.done: $(SPM)
	rm -rf $(DEMO)
	$(BIN)/crossmodal data brain --templates data/spm12 --out $(DEMO) --cases 12 --dense 2 --sparse 2 --seed 1
	touch $@

data: $(DEMO)/.done

# The `monailabel` launcher runs `$$MONAILABEL_PYEXE -m monailabel.main` (default: whatever `python` is on PATH).
run: install data
	MONAILABEL_PYEXE=$(abspath $(BIN))/python PATH=$(abspath $(BIN)):$$PATH $(BIN)/monailabel start_server --app apps/crossmodal --studies $(DEMO) -i $(HOST) -p $(PORT) --conf preset brain

# The demo on a PACS: Orthanc on 127.0.0.1:$(ORTHANC_PORT) (storage data/orthanc), the brain demo stored in it as
# DICOM (once), and the server against it; OHIF at http://127.0.0.1:$(PORT)/ohif/. Ctrl-C stops both.
ORTHANC_PORT ?= 8042
DICOMWEB := http://127.0.0.1:$(ORTHANC_PORT)/dicom-web
pacs: install data
	$(BIN)/python -m crossmodal.orthanc --port $(ORTHANC_PORT) --storage data/orthanc & ORTHANC=$$!; \
	trap "kill $$ORTHANC 2> /dev/null" EXIT INT TERM; \
	$(BIN)/python -m crossmodal.orthanc --port $(ORTHANC_PORT) --wait; \
	test -f data/orthanc/.loaded || { $(BIN)/crossmodal data to-dicom --studies $(DEMO) --config brain --upload $(DICOMWEB) && touch data/orthanc/.loaded; }; \
	MONAILABEL_PYEXE=$(abspath $(BIN))/python PATH=$(abspath $(BIN)):$$PATH $(BIN)/monailabel start_server --app apps/crossmodal \
	  --studies $(DICOMWEB) -i $(HOST) -p $(PORT) --conf preset brain --conf pacs_cache data/pacs_cache

lint: install
	$(BIN)/ruff check lib apps tests bench
	$(BIN)/mypy

# The suite in $(TEST_WORKERS) pytest-xdist workers, a test file each at a time, each worker on its share of the cores
# (tests/conftest.py; TEST_WORKERS=0: in the pytest process itself, on the whole machine).
test: install $(SPM)
	$(BIN)/ruff check lib apps tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Benchmarks (bench/README.md) write to bench/results, QUICK=1 checks to bench/results/quick (the full runs' figures
# stay as they are), RESULTS_DIR=... elsewhere.

# Infer speed and memory, ours vs baseline_unet vs a radiology-style pipeline (RESULTS_DIR=... to redirect).
bench-infer: install $(SPM)
	$(BIN)/python bench/infer.py $(if $(QUICK),--quick,)

# Segmentation quality: methods x annotation regimes x misregistration x a missing modality, 5 seeds, phantom and
# brain (about 3 h on 2 cores); QUICK=1: phantom, one seed, a few minutes. RESULTS_DIR=... to redirect.
bench-quality: install $(SPM)
	$(BIN)/python bench/quality.py $(if $(QUICK),--quick,) $(if $(RESUME),--resume,)

# Test-time mirroring (8 passes) vs one pass: Dice and infer seconds per case, ours + baseline_unet, dense + scribbles,
# phantom + brain, 5 seeds (about 30 min); QUICK=1: phantom, one seed, ours dense. RESULTS_DIR=... to redirect.
bench-mirror: install $(SPM)
	$(BIN)/python bench/mirror.py $(if $(QUICK),--quick,)

# Largest-component clean-up of the label maps (infer.largest_component) vs none, ours + baseline_unet, brain
# scribbles, 5 seeds (about 20 min); DATASET=phantom / REGIME=dense for others, QUICK=1: one seed.
DATASET ?= brain
REGIME ?= scribbles
bench-cleanup: install $(SPM)
	$(BIN)/python bench/cleanup.py --dataset $(DATASET) --regime $(REGIME) $(if $(QUICK),--quick,)

# crossmodal predict's per-case uncertainty against Dice on the demo's cases, whole and without T2 / PD (~1 min).
# Sliding-window overlap / windows per pass on the brain demo through the server: Dice, seconds, peak RSS (~3 min).
bench-overlap: install data
	$(BIN)/python bench/overlap.py

bench-uncertainty: install data
	$(BIN)/python bench/uncertainty.py $(if $(QUICK),--quick,)

# Scribble propagation vs case size (48^3 to 160^3): seconds, peak memory, label quality, full vs coarse grid, cache.
bench-propagate: install
	$(BIN)/python bench/propagate.py $(if $(QUICK),--quick,)

# Registrations before training (stroke transfer, atlas pseudo-labels) on the brain: one at a time vs side by side.
bench-transfer: install $(SPM)
	$(BIN)/python bench/transfer.py $(if $(QUICK),--quick,)

# Where ours from scribbles loses to ours from dense (brain, seed 0): accuracy on / off class edges, volumes, and the
# most per-class logit offsets could give back.
bench-scribble-gap: install $(SPM)
	$(BIN)/python bench/scribble_gap.py

# Training on cases without a secondary modality's file: left out of their fusion vs zeros read as an image (the
# baseline) vs those cases left out of training; phantom (PET) and brain (PD), 5 seeds.
bench-incomplete: install $(SPM)
	$(BIN)/python bench/incomplete.py $(if $(QUICK),--quick,)

# Loader worker processes (train.num_workers 0 vs 2) on the brain demo's training, interleaved, 2 repeats (~15 min).
bench-workers: install data
	$(BIN)/python bench/workers.py

# Scoring pools of 100-800 unlabelled phantom cases: scores stored per case (before) vs batched, one run.
bench-pool: install
	$(BIN)/python bench/pool.py $(if $(QUICK),--quick,)

# One case's scoring forward (committed phantom / brain weights): MC-dropout decodes in one batch vs one pass each.
bench-scoring: install data
	$(BIN)/python bench/scoring.py $(if $(QUICK),--quick,)

# Pseudo-labels of unlabelled phantom cases from a one-case model: the network's segmentation vs walker-refined.
bench-refine: install
	$(BIN)/python bench/refine.py

# The demo's full training as the viewers start it (time, peak memory, Dice on the unlabelled demo cases).
# The CUDA path against the CPU on one machine (needs a GPU): train seconds, peak GPU memory, Dice of one model on both.
bench-gpu: install
	$(BIN)/python bench/gpu.py

bench-demo-train: install data
	$(BIN)/python bench/demo_training.py $(if $(SCRATCH),--from-scratch)

# Active learning in a simulated annotate-retrain loop: ours vs random vs MONAI Label Epistemic, phantom + brain,
# each drawn alike and as a mixed pool, 5 seeds (about 2 h on 2 cores); QUICK=1: phantom, one seed, 3 short rounds. RESULTS_DIR=... to redirect.
simulate: install $(SPM)
	$(BIN)/python bench/simulate.py $(if $(QUICK),--quick,) $(if $(RESUME),--resume,)

# The demo on Orthanc seen from OHIF in Chromium: Run -> overlay seconds per model, screenshot for the README.
bench-ohif: install data
	$(BIN)/python bench/ohif.py

# Re-make the committed pretrained weights: apps/crossmodal/pretrained/<preset>_<NET>.{pt,yaml,log,eval.json}
# (NET=baseline_unet or NET=crossmodal).
# Training cases use other seeds than the demo and the tests; evaluation is on held-out cases (truth, no label).
weights: weights-phantom weights-brain
NET ?= baseline_unet

weights-phantom: install
	rm -rf data/pretrain_phantom data/pretrain_phantom_model_$(NET)
	$(BIN)/crossmodal data phantom --out data/pretrain_phantom --cases 24 --dense 20 --seed 100 > /dev/null
	$(BIN)/crossmodal train --studies data/pretrain_phantom --config phantom --model-dir data/pretrain_phantom_model_$(NET) \
	  --epochs $(or $(EPOCHS),120) --network $(NET) --publish $(PRE)/phantom_$(NET).pt 2>&1 | grep --line-buffered -v "Iter:" > $(PRE)/phantom_$(NET).log
	cp data/pretrain_phantom_model_$(NET)/train_01/config.yaml $(PRE)/phantom_$(NET).yaml
	$(BIN)/crossmodal evaluate --studies data/pretrain_phantom --config phantom --model $(PRE)/phantom_$(NET).pt \
	  --network $(NET) --out $(PRE)/phantom_$(NET).eval.json 2>/dev/null | tail -12

weights-brain: install $(SPM)
	rm -rf data/pretrain_brain data/pretrain_brain_model_$(NET)
	$(BIN)/crossmodal data brain --templates data/spm12 --out data/pretrain_brain --cases 20 --dense 16 --seed 100 > /dev/null
	$(BIN)/crossmodal train --studies data/pretrain_brain --config brain --model-dir data/pretrain_brain_model_$(NET) \
	  --epochs $(or $(EPOCHS),40) --network $(NET) --publish $(PRE)/brain_$(NET).pt 2>&1 | grep --line-buffered -v "Iter:" > $(PRE)/brain_$(NET).log
	cp data/pretrain_brain_model_$(NET)/train_01/config.yaml $(PRE)/brain_$(NET).yaml
	$(BIN)/crossmodal evaluate --studies data/pretrain_brain --config brain --model $(PRE)/brain_$(NET).pt \
	  --network $(NET) --out $(PRE)/brain_$(NET).eval.json 2>/dev/null | tail -12

clean:
	rm -rf $(VENV) data
