# make run   : set up .venv (CPU torch where there is no GPU) and run the default job
# make test  : set up .venv, fetch the real model and corpus, run ruff plus the whole suite (CI)
# make device-wheels : .whl/, what benchmarks/device_check.sh installs on a GPU machine
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-install
# The CPU wheel where there is no NVIDIA GPU (a plain `torch` would pull a multi-GB CUDA build).
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
# Extras installed with the package; CI adds llamacpp (llama.cpp built from source, minutes).
EXTRAS ?= test

.PHONY: install run test clean device-wheels

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m flexgen_lab run

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m flexgen_lab fetch smollm2-135m-instruct corpus  # cached after the first time
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) results .pytest_cache .ruff_cache

# The lent GPU machine's python3 (3.12, no network) has torch, transformers and accelerate;
# the device checks also need these, carried there as wheels (run(carry=[".whl"])): our pins
# of Hydra, OmegaConf and PuLP, pydantic and hjson for DeepSpeed (with their dependencies),
# and wheels built here from the sources the registry serves (DeepSpeed without its compiled
# ops, the ANTLR runtime Hydra parses with).
DEVICE_PLATFORM := --only-binary=:all: --python-version 3.12 --implementation cp \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
device-wheels: $(STAMP)
	rm -rf .whl && mkdir .whl
	$(PY) -m pip download -q --no-deps $(DEVICE_PLATFORM) -d .whl \
		$$($(PY) -m pip freeze | grep -i -E '^(hydra-core|omegaconf|pulp)==')
	$(PY) -m pip download -q $(DEVICE_PLATFORM) -d .whl pydantic hjson
	DS_BUILD_OPS=0 $(PY) -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed \
		$$($(PY) -m pip freeze | grep -i '^antlr4-python3-runtime==')
	du -sh .whl
