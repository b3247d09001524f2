# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-gaussians serve test lint clean browser

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# PRD on the CPU (~3.5 min on 2 cores): trains configs/demo_cpu.yaml, exports a mesh and a turntable per
# prompt to outputs/demo and prints each mesh's Chamfer distance to its target, untrained vs trained.
demo: $(STAMP)
	$(BIN)/python -m lightning_modules.demo

# The same demo with 3D Gaussians (configs/demo_cpu_gaussians.yaml) into outputs/demo_gaussians: the Chamfer
# distance of each prompt's Gaussian centres to its target, untrained vs trained.
demo-gaussians: $(STAMP)
	$(BIN)/python -m lightning_modules.demo --representation gaussians

# The web page and HTTP API (POST /generate) on http://127.0.0.1:7860/, serving the demo's student (trained
# first, ~3-4 min, when `make demo` has not run) unless SERVE_ARGS says otherwise, e.g. SERVE_ARGS="--weights W --base B --port 8000".
serve: $(STAMP)
	$(BIN)/prd serve $(SERVE_ARGS)

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

# Debian's chromium (/usr/bin/chromium) for the browser test of tests/test_serve_live.py (Playwright drives it; no
# browser is downloaded by the test tool). Installed with apt-get when missing, as root or with password-less sudo;
# otherwise, or when apt fails (no apt, no mirror), one line says what to run and the test skips with its reason:
# this target never fails the build, so CI runs the browser test wherever the machine can install the package.
CHROMIUM := /usr/bin/chromium
APT_CHROMIUM := env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium
browser:
	@if [ -x $(CHROMIUM) ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
		echo "make browser: no apt-get here: install Chromium as $(CHROMIUM) for the browser test (it skips without it)"; \
	elif [ "$$(id -u)" = 0 ]; then SUDO=; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "make browser: run 'sudo $(APT_CHROMIUM)' for the browser test (it skips without it)"; exit 0; fi; \
	command -v apt-get >/dev/null 2>&1 || exit 0; \
	echo "make browser: installing Debian's chromium for the browser test: $$SUDO apt-get install chromium"; \
	$$SUDO $(APT_CHROMIUM) >/dev/null 2>&1 || { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO $(APT_CHROMIUM) >/dev/null 2>&1; } \
		|| echo "make browser: apt-get could not install chromium (no mirror?): the browser test will skip"

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) outputs .demo .pytest_cache
