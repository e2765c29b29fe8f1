# mmnorm: the README's commands.
#   make test   set up .venv (if needed) and run the test suite
#   make demo   set up .venv (if needed) and run the embedded demo
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: env test demo demo-seg benchmark clean-env

env:
	@VENV=$(VENV) PYTHON=$(PYTHON) bash tools/setup_env.sh

test: env
	$(PY) -m pytest $(PYTEST_ARGS)

demo: env
	@echo "The embedded demo is not built yet (see the README)."

benchmark: env
	$(PY) tools/benchmark_norms.py

clean-env:
	rm -rf $(VENV)
