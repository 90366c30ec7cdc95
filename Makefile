# The two commands of the README's quickstart:
#   make demo   sets everything up and runs examples/quickstart.rs
#   make test   sets everything up and runs every Rust test and the adapter's pytest suite
# Needs only Rust (cargo), python3 (>= 3.9, with venv) and network access to PyPI.

VENV ?= .venv
PY := $(CURDIR)/$(VENV)/bin/python
# Every pyvisor command, example and test picks its interpreter from here.
export PYVISOR_PYTHON := $(PY)

ADAPTER_SOURCES := python_adapter/pyproject.toml $(wildcard python_adapter/pyvisor_worker/*.py)

.PHONY: setup demo test test-rust test-python clean

setup: $(VENV)/.installed

$(VENV)/.installed: $(ADAPTER_SOURCES)
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e './python_adapter[test]'
	@touch $@

demo: setup
	cargo run --example quickstart

test: test-rust test-python

test-rust: setup
	cargo test --workspace

test-python: setup
	$(PY) -m pytest python_adapter/tests -q

clean:
	rm -rf $(VENV) target
