# Everything runs from a project-local virtualenv that these targets create or
# refresh, so a fresh machine needs only python3 and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: help venv test demo bench bench-smoke clean

help:
	@echo "make demo    run the example packs against the bundled fake Flyte API"
	@echo "make test    run the test suite"
	@echo "make bench   run the benchmark suite (prints a table, writes bench/results/)"
	@echo "make clean   remove the virtualenv and build leftovers"

$(STAMP): setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,metrics]'
	touch $(STAMP)

venv: $(STAMP)

test: venv
	$(BIN)/python -m pytest

demo: venv
	$(BIN)/flyte-gevent demo

bench: venv
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info bench/results
