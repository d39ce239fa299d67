# The two commands of the README. Both create the environment (.venv) when it is missing.
#   make demo  -> `ddpo train` on the embedded Shapes default, then prints where the run is
#   make test  -> the test suite (slow end-to-end tests included; `make test-fast` skips them)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast env clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: it is a local CPU build here, and an unpinned torch pulls a multi-GB CUDA build.
	# Never torchvision: its wheels here break `from diffusers import StableDiffusionPipeline`.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test,shapes]"
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(BIN)/ddpo train

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
