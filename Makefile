# make demo   set up .venv (torch, tools, the build) and run `python -m pyops demo`
# make test   set up the same way and run the test suite
# make bench  set up the same way and run the CPU/GPU microbenchmarks
# make lint   ruff (lint and format) and clang-format, checking only; make format applies them
# Each target re-uses .venv and rebuilds only what changed.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
PY := .venv/bin/python
SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h')
# local package indexes may print one warning per package they do not hold
QUIET := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: demo test bench check info lint format clean

demo: .venv/.built
	$(PY) -m pyops demo

test: lint .venv/.built
	$(PY) -m pytest -q

CXX_SOURCES = $(shell git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu')

lint: .venv/.deps
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/clang-format --dry-run -Werror $(CXX_SOURCES)

format: .venv/.deps
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .
	.venv/bin/clang-format -i $(CXX_SOURCES)

bench: .venv/.built
	$(PY) -m pyops bench

check: .venv/.built
	TRITON_INTERPRET=1 $(PY) -m pyops check

info: .venv/.built
	$(PY) -m pyops info

.venv/.deps: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv .venv
	$(PY) -m pip install -q --upgrade pip 2>&1 | $(QUIET)
	$(PY) -m pip install -q -r requirements-dev.txt 2>&1 | $(QUIET)
	touch $@

# The first build installs pyops in editable mode (kernels/ maps to pyops.kernels); later ones
# recompile in place, ninja rebuilding only the changed translation units.
.venv/.built: .venv/.deps $(SOURCES)
	if [ -f .venv/.installed ]; then \
	  $(PY) setup.py -q build_ext --inplace; \
	else \
	  $(PY) -m pip install -q -e . --no-build-isolation --no-deps 2>&1 | $(QUIET); \
	  touch .venv/.installed; \
	fi
	touch $@

clean:
	rm -rf build pyops/_C*.so pyops/_build.py .venv/.built
