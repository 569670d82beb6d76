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
# tests/test_page_gui.py cuts its own server's connections with ss -K (iproute2).
DEBIAN_TEST_PACKAGES := python3-numpy python3-pil chromium systemd xvfb python3-tk x11-utils \
  python3-matplotlib x11vnc x11-apps iproute2

.PHONY: run test lint format bench clean system-deps deb web

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

# tests/test_web_build.py rebuilds the page with node and npm (Debian's, unless some are on PATH).
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=$$(for p in $(DEBIAN_TEST_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done; \
	    command -v npm >/dev/null || echo nodejs npm); \
	  if [ -n "$$missing" ]; then \
	    echo "installing $$missing from Debian for the tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  fi; \
	fi

# The built-in page: its npm packages exactly as web/package-lock.json pins them,
# bundled by esbuild into further_link/web/ (committed: installing needs no Node).
web:
	cd web && npm ci --no-audit --no-fund && node build.mjs

# The Debian package, built from the checkout's files (tracked and new, not ignored ones)
# with Debian's own tools, then checked by lintian: dist/further-link_<version>_all.deb.
DEB_BUILD_TOOLS := debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools \
  dpkg-dev lintian
DEB_BUILD_DIR := build/deb
VERSION = $(shell sed -n 's/^PACKAGE_VERSION = "\(.*\)"/\1/p' further_link/__init__.py)

deb:
	@missing=$$(for p in $(DEB_BUILD_TOOLS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing $$missing from Debian to build the package"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends $$missing >/dev/null; \
	  else echo "building the package needs: sudo apt-get install $$missing"; exit 1; fi; \
	fi
	@test "$$(dpkg-parsechangelog -S Version)" = "$(VERSION)" || { \
	  echo "debian/changelog's version is not $(VERSION) (further_link/__init__.py): add an entry"; \
	  exit 1; }
	rm -rf $(DEB_BUILD_DIR) && mkdir -p $(DEB_BUILD_DIR)/further-link dist
	git ls-files -z --cached --others --exclude-standard | \
	  xargs -0 cp --parents --no-dereference -t $(DEB_BUILD_DIR)/further-link
	# Debian's python3 and setuptools, whatever python3 comes first in PATH (e.g. pyenv).
	cd $(DEB_BUILD_DIR)/further-link && PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -b -us -uc >../build.log 2>&1 || \
	  { tail -40 ../build.log; exit 1; }
	mv $(DEB_BUILD_DIR)/further-link_$(VERSION)_all.deb dist/
	lintian --fail-on error,warning --info dist/further-link_$(VERSION)_all.deb
	@echo "built dist/further-link_$(VERSION)_all.deb"

# The whole suite runs twice: with the warm interpreter pool (the default) and without.
# As root on Debian the package is built once first; tests/test_deb.py installs,
# uses, removes and purges it.
TEST_DEB := $(CURDIR)/dist/further-link_$(VERSION)_all.deb
# The slowest tests are listed at the end of each pass: where the suite's time goes.
PYTEST_ARGS ?= --durations=15
test: lint system-deps
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  $(MAKE) --no-print-directory deb; fi
	FURTHER_LINK_TEST_DEB=$(TEST_DEB) FURTHER_LINK_TEST_POOL_SIZE=2 $(BIN)/python -m pytest $(PYTEST_ARGS)
	FURTHER_LINK_TEST_DEB=$(TEST_DEB) FURTHER_LINK_TEST_POOL_SIZE=0 $(BIN)/python -m pytest $(PYTEST_ARGS)

# Figures, not pass/fail: see benchmarks/run.py --help. BENCH_ARGS=--quick for a smoke run.
bench: $(STAMP)
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
