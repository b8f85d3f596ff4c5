# Two entry points for a newcomer: `make demo` and `make test`. Both create .venv if it is missing and
# install the pinned set plus this package (editable) into it.
# Python 3.11: the hash-pinned ve-fairseq wheel is cp311
PYTHON ?= $(shell command -v python3.11 2>/dev/null || echo python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_run

.PHONY: install demo test test-all bench clean

$(STAMP): requirements.txt requirements-fairseq.txt setup.py
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "need Python 3.11 (found %d.%d at $(PYTHON)); run make PYTHON=/path/to/python3.11" % sys.version_info[:2])'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --no-deps --require-hashes -r requirements-fairseq.txt
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m eat_fairseq.cli.demo --out $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -q tests

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow" tests

bench: $(STAMP)
	$(PY) benchmarks/features.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache build *.egg-info
