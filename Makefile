# Chorus: the two commands are `make run` and `make test`; both set everything up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test typecheck bench clean

$(BIN)/.installed: requirements-dev.txt requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

## Run the server (embedded mock upstream unless OPENAI_API_KEY or a base_url is set).
run: $(BIN)/.installed
	$(BIN)/python -m server

## Run the whole test suite (and the type check).
test: $(BIN)/.installed
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest

## Benchmark Chorus against a naive aiohttp hub (a few minutes; needs gcc and taskset).
## Pass options with BENCH_ARGS, e.g. make bench BENCH_ARGS="--quick --only a,b".
bench: $(BIN)/.installed
	$(BIN)/python -m bench $(BENCH_ARGS)

typecheck: $(BIN)/.installed
	$(BIN)/python -m mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache
