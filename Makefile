# One command to run, one to test; both create the virtualenv themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SOURCES := $(wildcard further_link tests benchmarks examples)
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run

# As root (as in CI) the tests run programs as `nobody` with Debian's python3,
# which then needs numpy and Pillow from Debian; tests/test_webpage.py drives
# Debian's chromium (headless, through Playwright; no browser download).
# tests/test_service.py checks the systemd unit with systemd-analyze (Debian's systemd).
# tests/test_display.py opens tkinter windows on a real Xvfb display, seen with xwininfo.
DEBIAN_TEST_PACKAGES := python3-numpy python3-pil chromium systemd xvfb python3-tk x11-utils

.PHONY: run test lint format bench clean system-deps

$(BIN)/python:
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); \
	  else \
	    echo "python3 cannot create a virtualenv: install it with 'sudo apt-get install python3-venv'"; exit 1; \
	  fi; }

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

# Running needs only the package itself, not the test and lint tools.
$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	@touch $@

run: $(RUN_STAMP)
	$(BIN)/further-link $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format $(SOURCES)
	$(BIN)/ruff check --fix $(SOURCES)

system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=$$(for p in $(DEBIAN_TEST_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then \
	    echo "installing $$missing from Debian for the tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  fi; \
	fi

# The whole suite runs twice: with the warm interpreter pool (the default) and without.
test: lint system-deps
	FURTHER_LINK_TEST_POOL_SIZE=2 $(BIN)/python -m pytest $(PYTEST_ARGS)
	FURTHER_LINK_TEST_POOL_SIZE=0 $(BIN)/python -m pytest $(PYTEST_ARGS)

# Figures, not pass/fail: see benchmarks/run.py --help. BENCH_ARGS=--quick for a smoke run.
bench: $(STAMP)
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
