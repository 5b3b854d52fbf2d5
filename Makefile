# One task runner for humans and CI. Every target sets up what it needs on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install lint typecheck test test-fast demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check src tests examples benchmarks

typecheck: install
	$(VENV)/bin/mypy

## ruff, mypy --strict, then the whole test suite (slow fault-injection tests included)
test: lint typecheck
	$(PY) -m pytest $(PYTEST_ARGS)

## the quick tests only
test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

## the demo, on the embedded Valkey unless REDIS_URL is set
demo: install
	$(VENV)/bin/agentstreams demo $(if $(REDIS_URL),--redis-url $(REDIS_URL),)

## the benchmark suite (tables per server, JSON in benchmarks/results/)
bench: install
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
