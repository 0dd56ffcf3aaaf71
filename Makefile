# Everything a fresh machine needs: `make demo` runs a local training run,
# `make test` runs the linters and the test suite. Both set up what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BUF := node_modules/.bin/buf

.PHONY: setup lint generate test test-fast demo bench clean

$(STAMP): pyproject.toml constraints/ci.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints/ci.txt -e '.[dev]'
	touch $@

$(BUF): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

setup: $(STAMP) $(BUF)

lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BUF) lint

generate: $(STAMP)
	$(BIN)/python scripts/generate.py

# One torch thread per process: the suite runs servers and workers side by side,
# and two threads each on two cores stall small kernels (10x slower steps).
test: lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest

test-fast: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m "not slow"

demo: $(STAMP)
	$(BIN)/dragon-server demo

clean:
	rm -rf $(VENV) node_modules .pytest_cache .mypy_cache .ruff_cache
