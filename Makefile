# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-gaussians serve test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# PRD on the CPU (~7 min on 2 cores): trains configs/demo_cpu.yaml, exports a mesh and a turntable per
# prompt to outputs/demo and prints each mesh's Chamfer distance to its target, untrained vs trained.
demo: $(STAMP)
	$(BIN)/python -m lightning_modules.demo

# The same demo with 3D Gaussians (configs/demo_cpu_gaussians.yaml) into outputs/demo_gaussians: the Chamfer
# distance of each prompt's Gaussian centres to its target, untrained vs trained.
demo-gaussians: $(STAMP)
	$(BIN)/python -m lightning_modules.demo --representation gaussians

# The web page and HTTP API (POST /generate) on http://127.0.0.1:7860/, serving the demo's student (run
# `make demo` first) unless SERVE_ARGS says otherwise, e.g. SERVE_ARGS="--weights W --base B --port 8000".
serve: $(STAMP)
	$(BIN)/prd serve $(SERVE_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) outputs .demo .pytest_cache
