# Two commands on a fresh machine:
#   make demo   -- create .venv, install sparsevid, run the demo on the trained testbed (CPU, or GPU when present)
#   make test   -- same set-up if needed, then the whole test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is installed first, pinned, so the rest of the install never swaps it. Which build that is depends
# on where pip looks: here a local CPU wheel (pip's find-links); on an ordinary Linux machine PyPI's torch,
# which is the CUDA build (several GB). For the CPU build there: make TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=

# ComfyUI (tests/test_comfyui.py) needs torchvision, whose wheels here need torch 2.14.1: its tests run in an
# environment of their own, set up only where a ComfyUI is present (CI: the snapshot at ../shared).
COMFY_VENV ?= .venv-comfy
COMFYUI    ?= ../shared/vendor/comfyui

.PHONY: setup demo test test-comfyui clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)")
	$(PY) -m pip install --quiet -e ".[dev]" "$(TORCH)"
	touch $@

demo: setup
	$(PY) -m sparsevid demo --out out/demo

test: setup
	$(PY) -m pytest -q -n 2 -p no:cacheprovider
	@if [ -d "$(COMFYUI)/comfy" ] || [ -n "$$COMFYUI_PATH" ]; then $(MAKE) --no-print-directory test-comfyui; \
	else echo "ComfyUI tests skipped: no ComfyUI at $(COMFYUI) and no COMFYUI_PATH"; fi

$(COMFY_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(COMFY_VENV)
	$(COMFY_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(COMFY_VENV)/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1" einops torchsde psutil \
		pyyaml safetensors transformers tqdm pillow scipy aiohttp av pytest
	$(COMFY_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $@

test-comfyui: $(COMFY_VENV)/.installed
	$(COMFY_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_comfyui.py

clean:
	rm -rf $(VENV) $(COMFY_VENV) out .pytest_cache .hypothesis
