# CPU set-up: torch is pinned to a CPU build here; GPU users install their own torch first.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# Where pip takes torch from; empty: pip's configured index. On Linux, PyPI's torch is the CUDA
# build (gigabytes): TORCH_INDEX=https://download.pytorch.org/whl/cpu gives the CPU-only one.
TORCH_INDEX ?=
BIN := $(VENV)/bin

.PHONY: setup setup-test demo test test-slow lint typecheck schema clean

# The demo needs tokenreduce alone; the tests, lint and type checks add the test extras.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e .
	touch $@

$(BIN)/.installed-test: $(BIN)/.installed
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/.installed

setup-test: $(BIN)/.installed-test

demo: setup
	$(BIN)/tokenreduce demo

# The suite without the tests marked slow (torch.compile, whole commands): minutes on a laptop CPU.
test: setup-test
	$(BIN)/python -m pytest -q -m "not slow"

# The slow tests: compile fullgraph on every adapter, end-to-end commands, packaging.
test-slow: setup-test
	$(BIN)/python -m pytest -q -m slow

lint: setup-test
	$(BIN)/ruff check framework plugins toma_plugin baselines tests
	$(BIN)/ruff format --check framework plugins toma_plugin baselines tests

# mypy on the whole package (.ci/typecheck), through a tree with the installed layout.
typecheck: setup-test
	PYTHON=$(abspath $(BIN))/python .ci/typecheck

schema: setup
	$(BIN)/tokenreduce schema -o docs/config.schema.json

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis tokenreduce-demo eval-proxy eval-results
