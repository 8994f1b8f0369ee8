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

test: $(STAMP) toolchain
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) build out .pytest_cache .hypothesis
