# The two commands of the README's quickstart:
#   make demo   sets everything up and runs examples/quickstart.rs
#   make test   sets everything up and runs every Rust test and the adapter's pytest suite
# Needs only Rust (cargo), python3 (>= 3.9, with venv) and network access to PyPI.

VENV ?= .venv
PY := $(CURDIR)/$(VENV)/bin/python
# A second venv without the `otel` extra: the adapter must work, and import nothing of
# OpenTelemetry, without it.
PLAIN_VENV ?= .venv-plain
PLAIN_PY := $(CURDIR)/$(PLAIN_VENV)/bin/python
# Every pyvisor command, example and test picks its interpreter from here.
export PYVISOR_PYTHON := $(PY)

ADAPTER_SOURCES := python_adapter/pyproject.toml $(wildcard python_adapter/pyvisor_worker/*.py)

.PHONY: setup demo test test-rust test-python bench bench-quick clean

setup: $(VENV)/.installed

$(VENV)/.installed: $(ADAPTER_SOURCES)
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e './python_adapter[test,otel]'
	@touch $@

$(PLAIN_VENV)/.installed: $(ADAPTER_SOURCES)
	@test -x $(PLAIN_PY) || python3 -m venv $(PLAIN_VENV)
	$(PLAIN_PY) -m pip install --quiet --disable-pip-version-check -e './python_adapter[test]'
	@touch $@

demo: setup
	cargo run --example quickstart

test: test-rust test-python

test-rust: setup
	cargo test --workspace

test-python: setup $(PLAIN_VENV)/.installed
	$(PY) -m pytest python_adapter/tests -q
	$(PLAIN_PY) -m pytest python_adapter/tests -q

# The benchmark suite (release build): floor and pyvisor interleaved, ratios printed.
bench: setup
	cargo run --release -p pyvisor-bench -- --plot docs/benchmarks-latency.svg

# A short smoke of the suite: it runs and prints ratios (figures not meaningful).
bench-quick: setup
	cargo run -p pyvisor-bench -- --quick

clean:
	rm -rf $(VENV) $(PLAIN_VENV) target
