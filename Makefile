# jaxtrace: `make train` (the embedded default) and `make test` set everything up on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/tiny.py
ARGS ?=
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

.PHONY: venv train train-grpo test test-fast lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: on CPU machines this takes the local CPU wheel (no CUDA download).
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[hf,data,dev]"
	touch $(STAMP)

venv: $(STAMP)

## The embedded default: SFT warm start, then TRACE; prints held-out accuracy before and after.
train: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m jaxtrace.train --config=$(CONFIG) $(ARGS)

## The same run with plain GRPO, for comparison.
train-grpo: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m jaxtrace.train --config=$(CONFIG):grpo \
		--config.workdir=runs/tiny_grpo $(ARGS)

test: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -n 2 --dist loadfile tests

test-fast: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -n 2 --dist loadfile -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	for b in benchmarks/*.py; do JAX_PLATFORMS=cpu $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
