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

.PHONY: setup repro test lock-check repro-check remote-check lint format clean-venv export bundle

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

# PYTEST_ARGS narrows the run, e.g. PYTEST_ARGS='-m "not slurm"' where the tests cannot be root.
PYTEST_ARGS ?=
test: setup
	pytest $(PYTEST_ARGS)
	$(MAKE) --no-print-directory lock-check

lock-check: setup
	$(PY) -m pcam.lockcheck

# `dvc repro --force` from scratch, then every hash of the new dvc.lock against the saved one
# (benchmark timings aside); the saved dvc.lock and git-tracked outputs are put back. CI runs it.
repro-check: setup
	$(PY) -m pcam.reprocheck

# Every cached output in dvc.lock is in the DVC remote (the default one, or REMOTE=name).
REMOTE ?=
remote-check: setup
	$(PY) -m pcam.remotecheck $(if $(REMOTE),--remote $(REMOTE))

lint: setup
	ruff check .
	ruff format --check .

format: setup
	ruff format .
	ruff check --fix .

clean-venv:
	rm -rf $(VENV)

# --- Deployment: after `dvc repro` (needs models/model.pt, models/threshold.json, the test split) --
# export: models/model.onnx + models/onnx_parity.json (onnxruntime against PyTorch on the test
# split; the model is written only if they agree). Not a DVC stage: the seven stages are fixed.
# bundle: dist/pcam-bundle-<target>.tar.gz for an offline machine (README inside). Downloads the
# target's wheels once into .cache/bundle-wheels/; BUNDLE_ARGS='--platform ... --python-version ...'.
BUNDLE_ARGS ?=
export: setup
	$(PY) -m pcam.export

bundle: export
	$(PY) -m pcam.bundle $(BUNDLE_ARGS)

# --- Experiment sweeps, reports for pull requests, the offline plots page ---------------------
# A grid over lr and seed (every combination):   make sweep sweep-run sweep-report
# Override the grid or parallelism:               make sweep SWEEP_LRS=1e-3,1e-4 SWEEP_SEEDS=0,1,2,3
# SWEEP_TARGETS=evaluate stops each experiment after `evaluate` (skips slice and benchmark).
SWEEP_LRS ?= 1e-3,3e-4
SWEEP_SEEDS ?= 0,1,2
SWEEP_GRID ?= -S train.lr=$(SWEEP_LRS) -S train.seed=$(SWEEP_SEEDS)
SWEEP_TARGETS ?=
SWEEP_JOBS ?= 1
REPORTS ?= reports
BASE ?= main

.PHONY: sweep sweep-run sweep-report changes-report plots-template model-card

sweep: setup
	dvc exp run --queue $(SWEEP_GRID) $(SWEEP_TARGETS)

# --run-all waits until the queue is empty (`dvc queue start -j N` returns at once and leaves the
# workers in the background). It exits 0 even when an experiment failed, so count the failures.
# One job per 2 cores: with train.threads=2, more jobs only slow each other down.
sweep-run: setup
	@failed_before=$$(dvc queue status | grep -cw Failed); \
	dvc exp run --run-all -j $(SWEEP_JOBS) || exit 1; \
	if [ "$$(dvc queue status | grep -cw Failed)" -gt "$$failed_before" ]; then \
	  dvc queue status; \
	  echo "sweep-run: experiments failed; see dvc queue logs <task>, then dvc queue remove --failed"; \
	  exit 1; \
	fi

sweep-report: setup
	$(PY) -m pcam.report experiments --out $(REPORTS)/experiments.md --plot $(REPORTS)/experiments.png

# Markdown for a pull request: params, metrics and plots of the workspace against $(BASE).
changes-report: setup
	$(PY) -m pcam.report changes --base $(BASE) --out $(REPORTS)/changes.md --plots-dir $(REPORTS)/plots

# Rebuilds the committed `dvc plots` page template with Vega inlined (vendor/dvc-plots-offline.html,
# the default through .dvc/config), e.g. after changing the pinned versions. Needs npm once.
plots-template: setup
	$(PY) -m pcam.offline_plots

# The model card (Markdown, figures linked) from the pipeline's outputs: run after `dvc repro`.
model-card: setup
	$(PY) -m pcam.modelcard --out $(REPORTS)/model_card.md
