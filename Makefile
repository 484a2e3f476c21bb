# layerline: install, test, run-cluster, tui, bench.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STAGES ?= 3
MODEL ?=
DEMO_DIR := .cache/demo-model

.PHONY: install test lint format run-cluster tui bench clean

install: $(STAMP)

# torch is installed first, pinned to the local CPU build, so that nothing later resolves
# to a multi-GB CUDA wheel.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

run-cluster: install
	HF_HUB_OFFLINE=1 $(PY) -m broker.cluster --stages $(STAGES) $(if $(MODEL),--model $(MODEL),)

tui: install
	$(PY) -m tui $(if $(BROKER),--broker $(BROKER),)

bench: install
	HF_HUB_OFFLINE=1 $(PY) -m bench $(ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache
