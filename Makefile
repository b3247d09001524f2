# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Stand-in until the CPU training demo lands: prompt -> mesh with the tiny reference model.
DEMO_WEIGHTS := tests/fixtures/reference/triplaneturbo_ref_A/triplane_turbo.pth
demo: $(STAMP)
	$(BIN)/prd generate "a DSLR photo of a corgi wearing a red party hat" "a wooden chair" \
		--weights $(DEMO_WEIGHTS) --out outputs/demo --resolution 64 --format glb

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) outputs .pytest_cache
