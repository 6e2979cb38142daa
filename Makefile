# Both entry points create/refresh the virtualenv themselves (torch's CPU build first, so the
# [torch] extra's "torch>=2.13.0" is already satisfied and pip does not pull a multi-GB CUDA build).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# `make test-py313`: the flights side on the newest supported Python, in a virtualenv without torch.
# python3.13 from PATH, else pyenv's (its shim answers only while 3.13 is an active pyenv version).
PY313 ?= $(or $(shell python3.13 -c 'import sys; print(sys.executable)' 2>/dev/null),$(shell PYENV_VERSION=3.13 pyenv which python3.13 2>/dev/null),python3.13)
VENV313 := .venv313
STAMP313 := $(VENV313)/.installed

.PHONY: venv run test test-unit test-py313 lint bench stack-up stack-down clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[torch,dev]'
	touch $(STAMP)

$(STAMP313): pyproject.toml Makefile
	test -x $(VENV313)/bin/python || $(PY313) -m venv $(VENV313)
	$(VENV313)/bin/python -m pip install -q --upgrade pip
	$(VENV313)/bin/python -m pip install -q -e '.[dev]'
	touch $(STAMP313)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/tunepipe run flights $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

# Python 3.13 without torch: the Python-version checks only (packaging: flights imports no torch and
# fashion-mnist says in one line to install it; imports, data, features, search space, metrics, layering).
# Everything else runs once, under `make test`: the whole unit suite again under 3.13 put CI past 90 min.
PY313_TESTS ?= tests/unit/test_packaging.py tests/unit/test_imports.py tests/unit/test_flights_data.py \
  tests/unit/test_flight_features.py tests/unit/test_search_space.py tests/unit/test_evaluate.py \
  tests/unit/test_layering.py
test-py313: $(STAMP313)
	@if $(VENV313)/bin/python -c 'import torch' 2>/dev/null; then \
	  echo "$(VENV313) has torch: the flights side must install without it" >&2; exit 1; fi
	$(VENV313)/bin/python -m pytest $(PY313_TESTS) -m "not slow" $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

stack-up: $(STAMP)
	$(BIN)/tunepipe stack up

stack-down: $(STAMP)
	$(BIN)/tunepipe stack down

clean:
	rm -rf $(VENV) $(VENV313) .tunepipe .pytest_cache
