# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# PRD on the CPU (~7 min on 2 cores): trains configs/demo_cpu.yaml, exports a mesh and a turntable per
# prompt to outputs/demo and prints each mesh's Chamfer distance to its target, untrained vs trained.
demo: $(STAMP)
	$(BIN)/python -m lightning_modules.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) outputs .demo .pytest_cache
