# Two commands set everything up on a fresh machine:
#   make demo   installs, then trains the MNIST CNN on the embedded 5k images and writes its record
#   make test   installs, then runs the test suite
# torch is installed first, pinned to the CPU wheel this project is tested with; on a GPU machine
# install your CUDA/ROCm build instead:  make TORCH="torch --index-url https://download.pytorch.org/whl/cu126" demo

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: install
	$(BIN)/parallelnn run mnist

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/mnist_cpu.py

clean:
	rm -rf $(VENV) runs .pytest_cache
