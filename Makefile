# The README's two commands: `make demo` and `make test`. Both create .venv on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# torch first, pinned, so the CPU wheel is used where one is available; override on GPU machines.
TORCH_SPEC ?= torch==2.13.0
DATA_DIR ?= ../shared/data
BIN := $(VENV)/bin

.PHONY: install demo test test-fast lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[dev]"
	touch $@

install: $(VENV)/.installed

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

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python benchmarks/grading.py
	$(BIN)/python benchmarks/selection.py
	$(BIN)/python benchmarks/unlearn.py
	$(BIN)/python benchmarks/generation.py

clean:
	rm -rf $(VENV) runs .pytest_cache
