# All set-up happens here, idempotently, into .venv. Two commands matter:
#   make demo   -> environment + the main job on the embedded default (tiny teacher, synthetic data)
#   make test   -> environment + the whole test suite (unit + slow end-to-end)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo video test test-fast lint env clean

env: $(STAMP)

# Reinstall only when the dependency declarations change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) pipelines/demo.py

# After `make demo` (it needs models:/vitpose-student@champion): trains and registers the synthetic data's person
# detector (~5 min on 2 cores), makes a synthetic video, and writes its poses, tracked and smoothed, to runs/predict/.
video: $(STAMP)
	$(PY) pipelines/detector.py
	$(PY) -m vitpose.data.synthetic_video --out runs/data/synthetic-video/people.mp4 --frames 90
	$(PY) pipelines/predict.py --model models:/vitpose-student@champion --config configs/predict/synthetic.yaml \
		--out runs/predict runs/data/synthetic-video/people.mp4

test: $(STAMP)
	$(PY) -m pytest tests --durations=25

test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check vitpose pipelines tests benchmarks

clean:
	rm -rf runs .pytest_cache
