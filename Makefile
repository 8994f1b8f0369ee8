# Two entry points, each self-sufficient on a fresh Debian machine:
#   make demo   the main job on the default model and data
#   make test   the test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test toolchain clean

$(STAMP): pyproject.toml
	bash scripts/install_toolchain.sh
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e ".[all]"
	touch $@

toolchain:
	bash scripts/install_toolchain.sh

demo: $(STAMP) toolchain
	$(VENV)/bin/tinytrain demo

# One pytest per test file, as many at once as there are CPUs (tests/run_files.py says why).
test: $(STAMP) toolchain
	$(VENV)/bin/python tests/run_files.py

clean:
	rm -rf $(VENV) build out .pytest_cache .hypothesis
