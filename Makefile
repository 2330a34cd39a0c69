# Two commands on a fresh machine:  `make demo`  (main job)  and  `make test`  (test suite).
# Both create .venv and install what they need. torch: the CPU build (torch==2.13.0) is installed first unless a
# torch is already importable in the venv; users with GPUs: create .venv with your own CUDA torch, or run
# `make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
export OMP_NUM_THREADS ?= 1

.PHONY: demo test install install-test benchmarks clean

$(VENV)/.matkit-installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.matkit-installed

demo: install
	OMP_NUM_THREADS=2 $(VENV)/bin/matkit demo

test: install
	$(VENV)/bin/ruff check matkit tests benchmarks examples potentials
	$(PY) -m pytest -q -n 2 --dist loadfile

benchmarks: install
	$(PY) benchmarks/neighbors.py
	$(PY) benchmarks/models.py
	$(PY) benchmarks/so2_convolution.py
	$(PY) benchmarks/data_loader.py
	$(PY) benchmarks/tensor_products.py
	# the two below need torchmd-net 3.1.0 in its own venv (see benchmarks/model_specs/tensornet.py)
	-$(PY) benchmarks/tensornet_vs_torchmdnet.py
	-$(PY) benchmarks/tensornet_speed_vs_torchmdnet.py --rounds 2
	# the two below need matgl in its own venv: $$MATKIT_MATGL_PYTHON (see benchmarks/README.md)
	-$(PY) benchmarks/tensornet_vs_matgl.py
	-$(PY) benchmarks/tensornet_speed_vs_matgl.py --rounds 3

clean:
	rm -rf $(VENV) runs
