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

.PHONY: install data run test lint weights clean

install: $(STAMP)

# torchvision arrives with monailabel/sam2 but is built for CUDA torch and fails to import beside the CPU
# build ("operator torchvision::nms does not exist"); nothing we run needs it, so it is removed.
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -m pip uninstall --yes --quiet torchvision || true
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Real brain templates: the SPM12 wheel from PyPI, sha256-checked, unpacked (set-up time only).
$(SPM): | $(STAMP)
	$(BIN)/crossmodal data fetch-spm --out data/spm12

$(DEMO)/.done: $(SPM)
	rm -rf $(DEMO)
	$(BIN)/crossmodal data brain --templates data/spm12 --out $(DEMO) --cases 12 --dense 2 --sparse 2 --seed 1
	touch $@

data: $(DEMO)/.done

run: install data
	$(BIN)/monailabel start_server --app apps/crossmodal --studies $(DEMO) -i $(HOST) -p $(PORT) --conf preset brain

lint: install
	$(BIN)/ruff check lib apps tests bench

test: install $(SPM)
	$(BIN)/ruff check lib apps tests bench
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Re-make the committed pretrained weights (apps/crossmodal/pretrained/*.pt with their config and log).
weights: install $(SPM)
	$(BIN)/python bench/train_pretrained.py --preset phantom
	$(BIN)/python bench/train_pretrained.py --preset brain

clean:
	rm -rf $(VENV) data
