# All set-up happens here, idempotently, into .venv. Two commands matter:
#   make demo   -> environment + the main job on the embedded default (tiny teacher, synthetic data)
#   make test   -> environment + the whole test suite (unit + slow end-to-end)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint env clean

env: $(STAMP)

# Reinstall only when the dependency declarations change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) pipelines/demo.py

test: $(STAMP)
	$(PY) -m pytest tests

test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check vitpose pipelines tests benchmarks

clean:
	rm -rf runs .pytest_cache
