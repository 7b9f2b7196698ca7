# Everything runs inside .venv, created on first use from the fully pinned lock file.
# `make venv CUDA=1` builds a separate .venv-cuda from requirements-cuda.lock (torch 2.13.0 for CUDA 13,
# a few GB from PyPI); the default venv, `make test` and CI never pull a CUDA build.
PYTHON ?= python3
DEVICE ?= cpu
# `make demo DEVICE=cuda` implies the CUDA venv.
ifeq ($(DEVICE),cuda)
CUDA   ?= 1
endif
CUDA   ?=
ifeq ($(CUDA),1)
VENV   ?= .venv-cuda
LOCK   := requirements-cuda.lock
# The CUDA torch is pinned by URL in the lock, so no local wheel folder is consulted for it.
PIPFLAGS := --no-deps
CHECK  := assert torch.version.cuda and torch.version.cuda.startswith('13'), 'torch is not the CUDA 13 build: ' + torch.__version__
else
VENV   ?= .venv
LOCK   := requirements.lock
# The CPU build of torch 2.13.0 lies in /opt/wheels on the project machines; elsewhere point
# PIP_FIND_LINKS (or PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu) at a CPU wheel.
WHEELS ?= $(wildcard /opt/wheels)
PIPFLAGS := --no-deps $(if $(WHEELS),--find-links $(WHEELS))
CHECK  := pass
endif
PY     := $(VENV)/bin/python

.PHONY: venv demo test bench clean

$(VENV)/.installed: $(LOCK) setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(PIPFLAGS) -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import cgnn_dgl, dgl, torch; $(CHECK); print('cgnn-dgl ready: torch', torch.__version__, 'cuda', torch.version.cuda, 'dgl', dgl.__version__)"
	touch $@

venv: $(VENV)/.installed

# make demo DEVICE=cuda trains the demo's heads on the GPU (in .venv-cuda).
demo: venv
	PY=$(PY) DEMO_DEVICE=$(DEVICE) bash scripts/demo.sh

test: venv
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

bench: venv
	$(PY) bench/coordinator.py
	$(PY) bench/cache.py
	$(PY) bench/ingest.py
	$(PY) bench/train.py
	$(PY) bench/learn_perov5.py

clean:
	rm -rf .venv .venv-cuda demo runs
