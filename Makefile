# adv_soups: `make demo` and `make test` bootstrap .venv themselves on a fresh clone.
# PYTHON defaults to what scripts/find-python picks (3.12 if present, else 3.11); override with PYTHON=...
PYTHON ?= $(shell scripts/find-python)
VENV := .venv
PY := $(VENV)/bin/python
PYTEST := $(PY) -m pytest
WORKDIR ?= workdirs/digits_demo
DEMO_FLAGS ?=

.PHONY: install test test-fast test-interop timm-venv demo bench bench-torch-venv clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	@test -n "$(PYTHON)" || { echo "no Python >= 3.11 found; run e.g. make PYTHON=python3.12"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The whole suite, slow tests included (what CI runs): TEST_WORKERS pytest processes (most tests
# compile on one core or wait on subprocesses; two processes keep both cores busy), a test file
# per process at a time (its module fixtures are built once), then the tests marked serial alone
# (pytest exits 5 if none is marked: the suite then fails rather than skip them silently).
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile
test: install
	$(PYTEST) -q $(XDIST) --durations=25 -m "not serial" tests
	$(PYTEST) -q -m serial tests

# Everything but the tests marked slow (end-to-end training, notebook): for local work.
test-fast: install
	$(PYTEST) -q $(XDIST) -m "not slow and not serial" tests

# timm interop (the exports load in timm with equal logits): a torch venv of its own, never the
# package's. Python 3.11: torch 2.14.1 + torchvision 0.29.1 come from these machines' local disk
# (~5.5 GB; PyPI's torchvision does not import beside the CPU torch 2.13.0 of .venv-torch).
timm-venv: .venv-timm/.installed

.venv-timm/.installed:
	python3.11 -m venv .venv-timm && .venv-timm/bin/pip install -q torch==2.14.1 torchvision==0.29.1 timm safetensors numpy
	touch $@

test-interop: install timm-venv
	ADV_SOUPS_TIMM_PYTHON=$(CURDIR)/.venv-timm/bin/python $(PYTEST) -q -m interop tests

demo: install
	$(PY) -m adv_soups.demo --workdir=$(WORKDIR) $(DEMO_FLAGS)

bench: install
	$(PY) -m bench.bench_attacks
	$(PY) -m bench.bench_sweep
	$(PY) -m bench.peak
	$(PY) -m bench.train_step $(if $(wildcard .venv-torch/bin/python),--baseline=torch)

# The PyTorch eager baseline of bench/train_step lives in its own venv, never in the package's.
# Python 3.11 on purpose: there torch 2.13.0 resolves to a CPU wheel on this disk (a 3.12 venv would
# download a CUDA build of several GB).
bench-torch-venv: .venv-torch/.installed

.venv-torch/.installed:
	python3.11 -m venv .venv-torch && .venv-torch/bin/pip install -q torch==2.13.0 numpy
	touch $@

clean:
	rm -rf $(VENV) .venv-timm .pytest_cache
