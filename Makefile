# Chorus: the two commands are `make run` and `make test`; both set everything up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The headless browser the browser tests drive (tests/browser): Debian's Chromium.
CHROMIUM ?= /usr/bin/chromium

.PHONY: run test typecheck bench clean browser

$(BIN)/.installed: requirements-dev.txt requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

## Run the server (embedded mock upstream unless OPENAI_API_KEY or a base_url is set).
run: $(BIN)/.installed
	$(BIN)/python -m server

## Run the whole test suite (and the type check).
test: $(BIN)/.installed browser
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest

## Benchmark Chorus against a naive aiohttp hub (a few minutes; needs gcc and taskset).
## Pass options with BENCH_ARGS, e.g. make bench BENCH_ARGS="--quick --only a,b".
bench: $(BIN)/.installed
	$(BIN)/python -m bench $(BENCH_ARGS)

## Chromium for the browser tests: installed with apt-get when it is missing and we are
## root, or may sudo without a password (a fresh CI machine). Otherwise nothing happens
## here, and the browser tests skip saying why (under CI=true they fail instead, so CI
## cannot pass by skipping them).
browser:
	@if [ ! -x "$(CHROMIUM)" ] && command -v apt-get >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ]; then as_root=""; \
		elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then as_root="sudo -n"; \
		else echo "make: no $(CHROMIUM) and not root: the browser tests will skip (fail under CI=true)"; exit 0; fi; \
		echo "make: installing chromium for the browser tests (apt-get, under a minute)"; \
		{ $$as_root apt-get update -qq && $$as_root env DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null; } \
		|| echo "make: could not install chromium: the browser tests will skip (fail under CI=true)"; \
	fi

typecheck: $(BIN)/.installed
	$(BIN)/python -m mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache
