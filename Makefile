# Two commands set up and run everything on a fresh machine:
#   make demo   - start the box, quantize a model end to end, verify it
#   make test   - run the test suite
# Both create .venv and install what they need. torch goes in first so pip never
# replaces the CPU build with a CUDA one (set TORCH_SPEC to change it, e.g. on a GPU box).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint bench clean system-deps

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,interop]"
	touch $(STAMP)

venv: $(STAMP)

system-deps:
	bash scripts/install-system-deps.sh

demo: venv
	$(PY) -m app.demo

test: venv system-deps
	bash scripts/run-tests.sh

lint: venv
	$(PY) -m ruff check .

bench: venv
	$(PY) bench/quantize.py

clean:
	rm -rf var .pytest_cache
