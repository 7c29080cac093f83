# Two commands do everything on a fresh machine:
#   make demo   set up .venv and run the main job
#   make test   set up .venv; run ruff, import-linter, the tests and the docstring examples
#               (the slow tests: make test-slow)
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.moekit-setup

.PHONY: setup demo lint test test-slow test-all clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/setup-venv.sh
	bash scripts/setup-venv.sh "$(PYTHON)" "$(VENV)"
	touch $@

demo: setup
	$(BIN)/moekit vowels

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: setup
	$(BIN)/python -m pytest -m slow -q

test-all: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
