# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
BACKEND ?= tensorflow
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	KERAS_BACKEND=$(BACKEND) $(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -q tests
	$(PY) -m ruff check src tests bench examples
	$(PY) -m mypy

lint: $(STAMP)
	$(PY) -m ruff check src tests bench examples
	$(PY) -m ruff format --check src tests bench examples
	$(PY) -m mypy

bench: $(STAMP)
	KERAS_BACKEND=$(BACKEND) $(PY) bench/bulk.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
