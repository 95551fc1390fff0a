# Every target does its own setup: a virtualenv in .venv with torch==2.13.0 (CPU) installed in the
# same pip run as the project, so nothing can pull a CUDA build of torch.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all test-asan test-kernels test-wheel bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0" -e ".[test,plot,eval]"
	touch $(STAMP)

demo: $(STAMP)  ## QAT+KD of the bundled teacher on the bundled books (<= 10 min on 2 cores)
	$(BIN)/ternary-mamba quantize

test: $(STAMP)  ## the offline test suite (no ../shared, no network), then the kernels built for other CPUs
	$(BIN)/python -m pytest -q
	bash scripts/test_kernels.sh

test-all: $(STAMP)  ## including the slow tests
	$(BIN)/python -m pytest -q -m ""

test-asan: $(STAMP)  ## the C kernels under AddressSanitizer: kernel tests + the fuzz cases
	bash scripts/test_asan.sh

test-wheel: $(STAMP)  ## a wheel built from this tree, installed alone: its kernels build and run, the CLI starts
	bash scripts/test_wheel.sh

test-kernels: $(STAMP)  ## only the kernel tests, against builds for a scalar (x86-64) and an AVX2-only CPU
	bash scripts/test_kernels.sh

bench: $(STAMP)
	$(BIN)/ternary-mamba bench model

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
