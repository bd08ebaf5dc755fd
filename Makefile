# Set-up and everyday commands. Every target creates the virtual environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test demo info check-kernels device-versions clean

# $(call install-env,VENV,PINS): create VENV when missing, install PINS, then the package (editable) with
# every extra; what PINS installed already satisfies the package's own requirements and stays
define install-env
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip "setuptools>=68" wheel
	$(1)/bin/python -m pip install -q $(2)
	$(1)/bin/python -m pip install -q --no-build-isolation -e ".[test,hf,bench,images]"
	touch $(1)/.installed
endef

# torch==2.13.0 is the CPU build on these machines; the package itself accepts torch>=2.4
$(STAMP): pyproject.toml Makefile
	$(call install-env,$(VENV),torch==2.13.0)

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

# The test suite and check-kernels (sm_90) under the GPU machine's versions (torch 2.11, triton 3.6,
# transformers 5.17), in a second environment $(DEVICE_VENV): what a later Triton or transformers hides
# shows here before GPU time is spent on it. Not part of CI (about 5 GB to install, then the tests and
# the compiles).
# torch 2.11.0 from PyPI is a CUDA build (it runs on the CPU too); numpy < 2.4 because Triton 3.6's
# interpreter fails on numpy 2.4 ("only 0-dimensional arrays can be converted to Python scalars").
DEVICE_VENV ?= .venv-device
DEVICE_PINS := torch==2.11.0 triton==3.6.0 transformers==5.17.0 "numpy<2.4"

$(DEVICE_VENV)/.installed: pyproject.toml Makefile
	$(call install-env,$(DEVICE_VENV),$(DEVICE_PINS))

device-versions: $(DEVICE_VENV)/.installed
	$(DEVICE_VENV)/bin/python -c "import torch, triton, transformers, numpy; print('torch', torch.__version__, \
	'triton', triton.__version__, 'transformers', transformers.__version__, 'numpy', numpy.__version__)"
	$(DEVICE_VENV)/bin/pytest $(PYTEST_ARGS)
	$(DEVICE_VENV)/bin/eomt-fast check-kernels --arch 90  # the device's arch (sm_80 under 3.6: README)

clean:
	rm -rf $(VENV) $(DEVICE_VENV) build *.egg-info .pytest_cache
