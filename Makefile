# The two commands of the README. Both create the environment (.venv) when it is missing.
#   make demo  -> `ddpo train` on the embedded Shapes default, then prints where the run is
#   make test  -> the test suite (slow end-to-end tests included; `make test-fast` skips them); installs
#                 Chromium (apt-get) for the report tests when it is missing
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast env clean chromium

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

# The report tests open report.html in headless Chromium (Debian's package); they skip only if it cannot be installed.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && SUDO= || SUDO=sudo; \
	    { $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	    echo "warning: chromium could not be installed; the report rendering tests will be skipped" >&2; }

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
