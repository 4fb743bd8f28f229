# `make test` and `make serve` do the whole set-up: a virtual environment at .venv, reused while
# pyproject.toml is unchanged. TORCH_SPEC is installed first: `torch==2.13.0` takes the CPU wheel
# that lies on this kind of machine; elsewhere pip takes the same version from PyPI (CUDA build on
# Linux x86_64). GPU users with another CUDA can pass e.g.
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint serve bench clean

install: $(STAMP)

$(STAMP): pyproject.toml client/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check .

serve: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m server

bench: $(STAMP)
	$(PY) bench/combine.py

clean:
	rm -rf $(VENV)
