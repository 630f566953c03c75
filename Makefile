# Two commands: `make demo` (set up + train the CPU demo) and `make test` (set up + run the tests).
# `make weights`: ImageNet MobileNetV2 weights into torch's hub cache, for scale=bccd_pretrained / coco128_pretrained.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test lint weights

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

weights: setup
	$(VENV)/bin/fl-rpn-weights $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .
