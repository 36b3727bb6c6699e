# Everyday commands. `make setup` once, then `make test`, `make lint`, `make app` or `make bench`.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test lint format app bench

setup:  ## the development environment, as the README says
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -r requirements-dev.txt

test:  ## the whole suite, offline (a few minutes on 2 CPU cores)
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format:
	$(BIN)/ruff format .

app:  ## the Space (default model: a GPU and a download); APP_ARGS="--model tiny-qwen2.5-vl" runs offline
	$(BIN)/python app.py $(APP_ARGS)

bench:  ## the benchmark (default: the tiny model on this machine); see CONTRIBUTING.md for the GPU run
	$(BIN)/python -m bench $(BENCH_ARGS)
