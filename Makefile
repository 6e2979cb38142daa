# Both entry points create/refresh the virtualenv themselves (torch's CPU build first, so the
# project's "torch>=2.13.0" is already satisfied and pip does not pull a multi-GB CUDA build).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv run test test-unit lint bench stack-up stack-down clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/tunepipe run flights $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

stack-up: $(STAMP)
	$(BIN)/tunepipe stack up

stack-down: $(STAMP)
	$(BIN)/tunepipe stack down

clean:
	rm -rf $(VENV) .tunepipe .pytest_cache
