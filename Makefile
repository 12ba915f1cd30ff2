# make run   -> set up .venv and run the main job (a small study on ./tauopt.db)
# make test  -> set up .venv and run the test suite
# make lint  -> ruff and mypy
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
# torch's build: auto (the CPU build on Linux where no NVIDIA GPU is seen, else PyPI's), cpu,
# or cuda (PyPI's, which on Linux brings the CUDA libraries); see tools/install-torch.sh
TORCH ?= auto
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: setup run test lint bench

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt tools/install-torch.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	TORCH=$(TORCH) TORCH_CPU_INDEX=$(TORCH_CPU_INDEX) sh tools/install-torch.sh $(BIN)/pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

run: $(STAMP)
	$(BIN)/tauopt run $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

# mypy cannot follow the editable install's mapping (tauopt.models lives in models/, ...):
# it checks a tree of links laid out as the wheel installs them.
TYPECHECK := build/typecheck/tauopt

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	rm -rf build/typecheck && mkdir -p $(TYPECHECK)
	ln -s $(addprefix $(CURDIR)/,$(wildcard tauopt/*.py)) $(TYPECHECK)/
	for d in models engine storage study; do ln -s $(CURDIR)/$$d $(TYPECHECK)/$$d; done
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/epoch_speed.py $(ARGS)
