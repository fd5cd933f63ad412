# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck unit bench migrate clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## start the appliance on the embedded default (SQLite + ./data), migrating first
run: $(STAMP)
	$(BIN)/dicom-appliance migrate
	exec $(BIN)/dicom-appliance serve

migrate: $(STAMP)
	$(BIN)/dicom-appliance migrate

## lint, type checks and the whole test suite
test: lint typecheck
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

## only the fast unit tests
unit: $(STAMP)
	$(BIN)/pytest tests/unit

## the appliance next to Orthanc on one corpus (installs Orthanc and dcmtk
## when missing); results in bench/results/, a table at the end;
## BENCH_ARGS=--scaled-out adds the appliance on PostgreSQL + SeaweedFS
bench: $(STAMP)
	sh bench/ensure_tools.sh
	$(BIN)/python -m bench all $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
