# Conveniences over the commands in README.md (Windows users: run those directly).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ifeq ($(OS),Windows_NT)
BIN := $(VENV)/Scripts
endif
PY := $(BIN)/python

.PHONY: install demo test lint format clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

# The synthetic dataset, then training on it end to end (a few minutes on a CPU).
demo: install
	$(PY) demo_data.py --out data/demo
	$(PY) -c "import shutil; shutil.rmtree('checkpoints/demo', ignore_errors=True)"
	$(PY) train.py config/demo.py

test: install
	$(PY) -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) data/demo checkpoints/demo
