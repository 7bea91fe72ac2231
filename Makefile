# Every target installs what it needs into .venv first (scripts/bootstrap.sh is idempotent).
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup quickstart test test-slow lint bench

setup:
	bash scripts/bootstrap.sh

quickstart: setup
	$(BIN)/llavamed quickstart

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	bash scripts/webtest_deps.sh
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check src tests benchmarks && $(BIN)/ruff format --check src tests benchmarks
