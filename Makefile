# Set-up and everyday commands. Every target creates the virtual environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test demo info check-kernels clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=68" wheel
	# torch==2.13.0 is the CPU build on these machines; the package itself accepts torch>=2.4
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test,hf,bench,images]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/eomt-fast info
	$(BIN)/eomt-fast demo
	$(BIN)/eomt-fast segment examples/scenes --out segmented

info: $(STAMP)
	$(BIN)/eomt-fast info

check-kernels: $(STAMP)
	$(BIN)/eomt-fast check-kernels

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
