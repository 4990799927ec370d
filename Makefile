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

typecheck: $(BIN)/.installed
	$(BIN)/python -m mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache
