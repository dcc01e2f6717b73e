# The README's two commands: `make demo` and `make test`. Both set everything up on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo lint bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0          # CPU build, before anything that depends on torch
	$(BIN)/pip install -q -e '.[dev,tflite,zoo]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)   # ruff, then the suite (which also checks the import contracts of docs/architecture.md)
	$(BIN)/ruff check chita_edge exporters tests benchmarks docs
	$(BIN)/python -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(BIN)/chita-edge demo

lint: $(STAMP)
	$(BIN)/ruff check chita_edge exporters tests benchmarks
