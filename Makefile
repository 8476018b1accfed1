# Everything runs from a project-local virtualenv that these targets create or
# refresh, so a fresh machine needs only python3 and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
BUILD_STAMP := $(VENV)/.build-stamp
LINT_STAMP := $(VENV)/.lint-stamp
# The Python versions flyte_gevent supports (setup.cfg's classifiers list the same ones).
SUPPORTED_PYTHONS := 3.11 3.12 3.13

.PHONY: help venv test lint test-all dist check-wheel demo bench clean

help:
	@echo "make demo         run the example packs against the bundled fake Flyte API"
	@echo "make test         run the test suite"
	@echo "make lint         run ruff and mypy (strict) over the package, the tests, the examples and bench/"
	@echo "make test-all     run the sdist's test suite on every supported Python found ($(SUPPORTED_PYTHONS))"
	@echo "make dist         build the sdist and the wheel into dist/"
	@echo "make check-wheel  install the built wheel into a fresh virtualenv and run flyte-gevent demo from it"
	@echo "make bench        run the benchmark suite (prints a table, writes bench/results/)"
	@echo "make clean        remove the virtualenv and build leftovers"

$(STAMP): setup.cfg setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,metrics]'
	touch $(STAMP)

venv: $(STAMP)

# The packaging targets need the PyPA build frontend, kept out of the test extra: packagers do not need it.
$(BUILD_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet build
	touch $(BUILD_STAMP)

# The suite runs as TEST_SHARDS pytest processes side by side (most tests wait on loopback I/O);
# TEST_SHARDS=1 runs one plain pytest.
TEST_SHARDS ?= 3

test: venv
	$(BIN)/python .ci/pytest-shards $(TEST_SHARDS) $(BIN)/python -m pytest

# ruff and mypy come from the lint extra, installed on first use: `make test` does not need them.
$(LINT_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,metrics,lint]'
	touch $(LINT_STAMP)

# What they check and how strictly is configured in pyproject.toml.
lint: $(LINT_STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

dist: $(BUILD_STAMP)
	rm -rf dist
	$(BIN)/python -m build --quiet --outdir dist .

test-all: dist
	.ci/test-all dist/flyte_gevent-*.tar.gz $(SUPPORTED_PYTHONS)

check-wheel: dist
	.ci/check-wheel dist/flyte_gevent-*-py3-none-any.whl $(PYTHON)

demo: venv
	$(BIN)/flyte-gevent demo

bench: venv
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info bench/results .mypy_cache .ruff_cache
