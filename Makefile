# The two commands of the README: `make demo` and `make test`. Both work on a fresh Debian 12
# machine as root: they install what is missing first (scripts/bootstrap).
VENV ?= /opt/hpcfed/venv
HPCFED := $(VENV)/bin/hpcfed
PYTEST_ARGS ?=

.PHONY: bootstrap test demo demo-down install bench clean

bootstrap:
	HPCFED_VENV=$(VENV) bash scripts/bootstrap

# Reinstall only the Python package (after a code change), not the system packages.
install:
	HPCFED_VENV=$(VENV) bash scripts/bootstrap.d/20-python.sh

test: bootstrap
	HPCFED_VENV=$(VENV) $(VENV)/bin/pytest $(PYTEST_ARGS)

demo: bootstrap
	HPCFED_VENV=$(VENV) bash scripts/demo

demo-down:
	HPCFED_VENV=$(VENV) bash scripts/demo down

bench:
	HPCFED_VENV=$(VENV) $(VENV)/bin/python -m benchmarks $(BENCH)
