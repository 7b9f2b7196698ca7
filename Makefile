# Everything runs inside .venv, created on first use from the fully pinned lock file.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU build of torch 2.13.0 lies in /opt/wheels on the project machines; elsewhere point
# PIP_FIND_LINKS (or PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu) at a CPU wheel.
WHEELS ?= $(wildcard /opt/wheels)
PIPFLAGS := --no-deps $(if $(WHEELS),--find-links $(WHEELS))

.PHONY: venv demo test bench clean

$(VENV)/.installed: requirements.lock setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(PIPFLAGS) -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import cgnn_dgl, dgl, torch; print('cgnn-dgl ready: torch', torch.__version__, 'dgl', dgl.__version__)"
	touch $@

venv: $(VENV)/.installed

demo: venv
	bash scripts/demo.sh

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
	rm -rf $(VENV) demo runs
