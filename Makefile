# Two commands on a fresh machine:
#   make demo   -- create .venv, install sparsevid, run the demo on a real clip (CPU, or GPU when present)
#   make test   -- same set-up if needed, then the whole test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch==2.13.0 is pinned first so pip takes the local CPU wheel and never resolves a CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]" "$(TORCH)"
	touch $@

demo: setup
	$(PY) -m sparsevid demo --out out/demo

test: setup
	$(PY) -m pytest -q -n 2 -p no:cacheprovider

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
