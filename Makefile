# Two commands do the whole set-up on a fresh machine:
#   make repro   venv + pinned install + `dvc repro` of the pipeline on the embedded default data
#   make test    venv + pinned install + the whole test suite + the dvc.lock freshness check
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Stage commands in dvc.yaml call `python`: it must be the venv's.
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: setup repro test lock-check lint format clean-venv

# torch first, by exact pin: an unpinned torch (or a package pulling one) downloads GBs of CUDA
# wheels. constraints.txt pins every transitive dependency to what dvc.lock was produced with.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

repro: setup
	dvc repro

test: setup
	pytest
	$(MAKE) --no-print-directory lock-check

lock-check: setup
	$(PY) -m pcam.lockcheck

lint: setup
	ruff check .
	ruff format --check .

format: setup
	ruff format .
	ruff check --fix .

clean-venv:
	rm -rf $(VENV)
