# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# the FHIR server the DICOMcast tests publish to (tests/fhir_peer, npm)
FHIR_PEER := tests/fhir_peer/node_modules/.package-lock.json
# the OpenID Connect provider the auth tests get tokens from (tests/oidc_peer, npm)
OIDC_PEER := tests/oidc_peer/node_modules/.package-lock.json

.PHONY: run test lint typecheck unit bench profile load soak migrate clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# without npm its tests skip
$(FHIR_PEER): tests/fhir_peer/package-lock.json
	if command -v npm >/dev/null; then npm ci --prefix tests/fhir_peer --no-audit --no-fund >/dev/null; \
	else echo "npm not found: the FHIR server's tests will skip"; fi

$(OIDC_PEER): tests/oidc_peer/package-lock.json
	if command -v npm >/dev/null; then npm ci --prefix tests/oidc_peer --no-audit --no-fund >/dev/null; \
	else echo "npm not found: the OpenID provider's tests will skip"; fi

## start the appliance on the embedded default (SQLite + ./data), migrating first
run: $(STAMP)
	$(BIN)/dicom-appliance migrate
	exec $(BIN)/dicom-appliance serve

migrate: $(STAMP)
	$(BIN)/dicom-appliance migrate

## lint, type checks and the whole test suite
test: lint typecheck $(FHIR_PEER) $(OIDC_PEER)
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

## where the CPU goes on C-STORE and STOW-RS: py-spy flame graphs and CPU per
## instance into bench/results/profile-<commit> (PROFILE_ARGS="--tree DIR"
## profiles another checkout, e.g. an older commit, with this one's tools)
profile: $(STAMP)
	sh bench/ensure_tools.sh
	$(BIN)/python -m bench profile $(PROFILE_ARGS)

## a bounded load on loopback (dcmtk storescu, pynetdicom C-STORE, STOW-RS,
## QIDO-RS and WADO-RS clients at once for LOAD_SECONDS), then every
## acknowledged instance checked; results in bench/results/load-*.json
LOAD_SECONDS ?= 60
load: $(STAMP)
	$(BIN)/python -m bench load --duration $(LOAD_SECONDS)

## the same load for SOAK_MINUTES (default 20), sampling every serve
## process's memory and open files; fails if they grow (not part of `make test`)
SOAK_MINUTES ?= 20
soak: $(STAMP)
	$(BIN)/python -m bench soak --minutes $(SOAK_MINUTES)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
