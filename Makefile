# make run   -> set up .venv and run the main job (a small study on ./tauopt.db)
# make test  -> set up .venv and run the test suite
# make lint  -> ruff and mypy
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
# e.g. https://download.pytorch.org/whl/cpu: torch's CPU build, without the CUDA libraries
TORCH_INDEX_URL ?=

.PHONY: setup run test lint bench

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(if $(TORCH_INDEX_URL),$(BIN)/pip install -q -c constraints.txt --index-url $(TORCH_INDEX_URL) --extra-index-url https://pypi.org/simple torch torchvision)
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
