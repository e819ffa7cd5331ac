# The README's two commands: `make demo` and `make test`. Each sets up .venv from nothing but Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch that this machine carries; installed only when the venv has no torch at all,
# because an unpinned torch pulls gigabytes of CUDA packages.
TORCH_PIN := torch==2.13.0

.PHONY: setup demo test lint bench clean

$(BIN)/.gradscope-installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/.gradscope-installed

demo: setup
	$(BIN)/gradscope demo

lint: setup
	$(BIN)/ruff check .

test: setup lint
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) gradscope-demo .pytest_cache
