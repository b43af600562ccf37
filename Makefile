# make run   : set up .venv (CPU torch where there is no GPU) and run the default job
# make test  : set up .venv, fetch the real model and corpus, run ruff plus the whole suite (CI)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-install
# The CPU wheel where there is no NVIDIA GPU (a plain `torch` would pull a multi-GB CUDA build).
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
# Extras installed with the package; CI adds llamacpp (llama.cpp built from source, minutes).
EXTRAS ?= test

.PHONY: install run test clean

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
