# Two entry points that work on a fresh machine with only Python 3.10+:
#   make demo   the seed's symptom and its fix on embedded data (CPU, < 2 minutes)
#   make test   the whole test suite: core + PyTorch + Lightning, then Flax, Keras 3 (each backend) and Keras 2 in their own processes
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.evalgap-installed
EXTRAS := torch,keras,tf-keras,tensorflow,jax,flax,lightning,demo,dev
PYTEST := $(PY) -m pytest -q -p no:cacheprovider
# two pytest workers where tests mostly wait on one-core graph compilation (TensorFlow, JAX): measured 6:12 -> 4:02
# and 6:05 -> 4:50 on 2 cores, Keras 2 2:18 -> 1:56; PyTorch's own threads already fill both cores (Keras on torch: 2:20 -> 5:43 with two)
PYTEST2 := $(PYTEST) -n 2

.PHONY: demo test test-core test-keras bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: a CPU build is on this machine; an unpinned torch pulls a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/evalgap demo

test: $(STAMP)
	$(MAKE) --no-print-directory test-core
	$(PYTEST) tests/flax
	$(MAKE) --no-print-directory test-keras
	TF_USE_LEGACY_KERAS=1 $(PYTEST2) tests/tf_keras

test-core: $(STAMP)
	$(PYTEST) tests --ignore=tests/keras --ignore=tests/tf_keras --ignore=tests/flax

test-keras: $(STAMP)
	KERAS_BACKEND=tensorflow $(PYTEST2) tests/keras
	KERAS_BACKEND=jax $(PYTEST2) tests/keras
	KERAS_BACKEND=torch $(PYTEST) tests/keras

bench: $(STAMP)
	$(PY) bench/recalibrate_torch.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis
