# Two commands: `make demo` (set up + train the CPU demo) and `make test` (set up + run the tests).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet $(TORCH)
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/fl-rpn-train $(ARGS)

test: setup
	$(VENV)/bin/pytest -q -n auto $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .
