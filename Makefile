# jaxtrace: `make train` (the embedded default) and `make test` set everything up on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Two install steps: what training needs (the package and its core dependencies), then what the
# tests, lint, notebooks and benchmarks add (torch + transformers for the parity tests, grain /
# tfds / gcsfs, pytest, ruff).
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
CONFIG ?= configs/tiny.py
ARGS ?=
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

.PHONY: venv venv-tpu train train-grpo test test-fast lint format bench bench-peers reproduce clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(TEST_STAMP): $(STAMP)
	# torch first, pinned: on CPU machines this takes the local CPU wheel (no CUDA download).
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[hf,data,dev]"
	touch $@

## libtpu, for ahead-of-time compiles for TPU slices on any host (`python -m jaxtrace.compile`,
## tests/test_tpu_compile.py): the jax[tpu] extra at the installed jax's own version.
TPU_STAMP := $(VENV)/.installed-tpu
$(TPU_STAMP): $(STAMP)
	$(PY) -m pip install -q "jax[tpu]==$$($(PY) -c 'import jax; print(jax.__version__)')"
	touch $@

venv-tpu: $(TPU_STAMP)

## The whole development environment: test extras and libtpu (`make train` needs only $(STAMP)).
venv: $(TEST_STAMP) $(TPU_STAMP)

## The embedded default: SFT warm start, then TRACE; prints held-out accuracy before and after.
train: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m jaxtrace.train --config=$(CONFIG) $(ARGS)

## The same run with plain GRPO, for comparison.
train-grpo: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m jaxtrace.train --config=$(CONFIG):grpo \
		--config.workdir=runs/tiny_grpo $(ARGS)

test: $(TEST_STAMP) $(TPU_STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -n 2 --dist loadfile --durations=30 tests

test-fast: $(TEST_STAMP) $(TPU_STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -n 2 --dist loadfile -m "not slow" tests

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(TEST_STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(TEST_STAMP)
	for b in rollout span_kl moe linear_attention mfu; do \
		JAX_PLATFORMS=cpu $(PY) benchmarks/$$b.py || exit 1; done

## jaxtrace vs google-tunix and transformers.generate (tunix gets its own virtualenv).
PEERS ?= .venv-peers
$(PEERS)/.installed: pyproject.toml benchmarks/peers/requirements.txt
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q --upgrade pip
	$(PEERS)/bin/python -m pip install -q "torch==2.13.0"
	$(PEERS)/bin/python -m pip install -q -e ".[hf,data]"
	$(PEERS)/bin/python -m pip install -q --no-deps "google-tunix==0.1.7"
	$(PEERS)/bin/python -m pip install -q -r benchmarks/peers/requirements.txt
	touch $@

bench-peers: $(PEERS)/.installed
	JAX_PLATFORMS=cpu XLA_FLAGS= $(PEERS)/bin/python benchmarks/vs_peers.py $(ARGS)

## The paper's claims in miniature: 3 seeds x {GRPO, OPSD, TRACE-FKL, TRACE-RKL} (hours on CPU).
reproduce: $(TEST_STAMP)
	JAX_PLATFORMS=cpu $(PY) benchmarks/reproduce.py $(ARGS)

clean:
	rm -rf $(VENV) $(PEERS) runs .pytest_cache
