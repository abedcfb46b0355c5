# `make demo` and `make test` set themselves up on a fresh machine. The virtual environment is
# rebuilt only when pyproject.toml changes (a stamp file named by its hash), so a second call
# skips the installing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU build of torch where no GPU is present; on this project's machines it lies on disk.
TORCH_VERSION ?= 2.13.0
HASH   := $(shell sha1sum pyproject.toml | cut -c1-12)
STAMP  := $(VENV)/.installed-$(HASH)

.PHONY: setup test test-gpu demo lint bench-cpu clean chromium

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(PY) -m pip install -q "torch>=2.4"; \
	else \
	  $(PY) -m pip install -q torch==$(TORCH_VERSION); \
	fi
	$(PY) -m pip install -q -e '.[platform,triton,dev,hf]'
	@rm -f $(VENV)/.installed-*
	@touch $@

# Headless Chromium for the report's browser test (tests/dashboards), from Debian's `chromium` package.
# Quick when it is on PATH; without root or apt-get it says so, and that test skips with the reason.
chromium:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "chromium: not installed, and installing it needs root and apt-get; the report's browser test will skip"; \
	else \
	  echo "chromium: installing Debian's chromium package (once)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null; } || \
	  echo "chromium: apt-get could not install it; the report's browser test will skip"; \
	fi

test: setup chromium
	TRITON_INTERPRET=1 $(PY) -m pytest -q --durations=15 tests

# The kernel and model tests on CUDA, on a GPU box whose python already holds torch and triton (no venv, no
# network: `make test-gpu PY=python3`; benchmarks/gpu_round.sh runs it). The kernel tests pick CUDA when it is
# there and the interpreter is off; tests/rattention/test_model_cuda.py skips without CUDA.
test-gpu:
	@$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'test-gpu: no CUDA device')"
	TRITON_INTERPRET=0 $(PY) -m pytest -q -p no:cacheprovider --durations=10 tests/kernels tests/rattention/test_model_cuda.py

lint: setup
	$(VENV)/bin/ruff check .

demo: setup
	$(PY) -m rattention demo

clean:
	rm -rf $(VENV) .pytest_cache
