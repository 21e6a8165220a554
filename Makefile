# The two commands of the README: `make demo` and `make test`. Both work on a fresh Debian 12
# machine as root: they install what is missing first (scripts/bootstrap).
VENV ?= /opt/hpcfed/venv
HPCFED := $(VENV)/bin/hpcfed
# Everything by default (the Fed-BioMed image, ~3.5 GB, is built once in the run: ~4 min);
# `make test-fedbiomed` runs only the tests that need that image.
PYTEST_ARGS ?=

.PHONY: bootstrap test test-fedbiomed lint test-fresh demo demo-down install bench clean wheel

bootstrap:
	HPCFED_VENV=$(VENV) bash scripts/bootstrap

# Reinstall only the Python package (after a code change), not the system packages.
install:
	HPCFED_VENV=$(VENV) bash scripts/bootstrap.d/20-python.sh

# The Rust data plane's unit tests first (they link libpython from python3-dev), then the suite.
test: bootstrap lint
	cargo test --release --quiet
	HPCFED_VENV=$(VENV) $(VENV)/bin/pytest $(PYTEST_ARGS)

test-fedbiomed: bootstrap
	HPCFED_VENV=$(VENV) $(VENV)/bin/pytest -m fedbiomed_image tests/test_fedbiomed.py

# ruff (lint + format) over the whole tree and mypy over the package (strict for plan,
# profiles, scheduler, state, rejoin: pyproject.toml); part of `make test`.
lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The proof that a fresh machine is green: wipe everything hpcfed wrote outside a checkout
# (scripts/wipe: state of every user, /var/lib/hpcfed, /var/tmp/hpcfed-*, the venv, images;
# KEEP_IMAGES=1 keeps the image caches), then run CI's command from a clean clone.
test-fresh:
	bash scripts/wipe
	rm -rf /tmp/hpcfed-fresh-clone && git clone -q . /tmp/hpcfed-fresh-clone
	cd /tmp/hpcfed-fresh-clone && CI=true bash .ci/run

# FRAMEWORK=flower|fedbiomed: the Flower (demo/flower.py) or Fed-BioMed (demo/fedbiomed.py;
# its image is ~3.5 GB, built once) federation instead of NVFlare's.
FRAMEWORK ?= nvflare
DEMO_ARGS := $(if $(filter flower fedbiomed,$(FRAMEWORK)),$(FRAMEWORK),)

demo: bootstrap
	HPCFED_VENV=$(VENV) bash scripts/demo $(DEMO_ARGS)

demo-down:
	HPCFED_VENV=$(VENV) bash scripts/demo $(DEMO_ARGS) down

bench:
	HPCFED_VENV=$(VENV) $(VENV)/bin/python -m benchmarks $(BENCH)

# Binary wheel(s) into dist/: abi3 (CPython >= 3.9), manylinux_2_28 (glibc >= 2.28), checked with
# auditwheel; pip installs them with no Rust toolchain. WHEEL_ARCHS="x86_64 aarch64" for both.
wheel:
	bash scripts/build-wheel
