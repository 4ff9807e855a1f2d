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
PRE := apps/crossmodal/pretrained
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

.PHONY: install data run test lint bench-infer bench-quality bench-demo-train weights weights-phantom weights-brain clean

install: $(STAMP)

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

lint: install
	$(BIN)/ruff check lib apps tests bench

test: install $(SPM)
	$(BIN)/ruff check lib apps tests bench
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Infer speed and memory, ours vs baseline_unet vs a radiology-style pipeline (RESULTS_DIR=... to redirect).
bench-infer: install $(SPM)
	$(BIN)/python bench/infer.py $(if $(QUICK),--quick,)

# Segmentation quality: methods x annotation regimes x misregistration x a missing modality, 3 seeds, phantom and
# brain (about an hour on 2 cores); QUICK=1: phantom, one seed, a few minutes. RESULTS_DIR=... to redirect.
bench-quality: install $(SPM)
	$(BIN)/python bench/quality.py $(if $(QUICK),--quick,)

# The demo's full training as the viewers start it (time, peak memory, Dice on the unlabelled demo cases).
bench-demo-train: install data
	$(BIN)/python bench/demo_training.py

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
