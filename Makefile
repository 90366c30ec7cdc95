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

.PHONY: setup demo test test-rust test-python bench bench-quick bench-cluster clean

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

# Separate invocations: pyvisor-cluster turns on ractor's `cluster` feature, which would unify
# into the rest of the workspace and remove ractor's blanket `Message` impl from its actors. The
# third tests `pyvisor node`, which exists only in a CLI built with that feature.
test-rust: setup
	cargo test --workspace --exclude pyvisor-cluster
	cargo test -p pyvisor-cluster
	cargo test -p pyvisor-cli --features cluster --test node

# The two adapter suites run side by side (they wait on worker processes far more than they
# compute: 85 s together instead of 165 s one after the other on 2 cores); each one's output is
# printed once both are done, and either failing fails the target.
test-python: setup $(PLAIN_VENV)/.installed
	@mkdir -p target
	@echo "adapter tests, with and without the otel extra, side by side (logs: target/pytest-*.log) ..."
	@$(PY) -m pytest python_adapter/tests -q -p no:cacheprovider > target/pytest-otel.log 2>&1 & otel=$$!; \
	$(PLAIN_PY) -m pytest python_adapter/tests -q -p no:cacheprovider > target/pytest-plain.log 2>&1; plain=$$?; \
	wait $$otel; otel=$$?; \
	echo "== adapter tests with the otel extra ($(VENV))"; cat target/pytest-otel.log; \
	echo "== adapter tests without it ($(PLAIN_VENV))"; cat target/pytest-plain.log; \
	test $$otel -eq 0 && test $$plain -eq 0

# The benchmark suite (release build): floor and pyvisor interleaved, ratios printed.
bench: setup
	cargo run --release -p pyvisor-bench -- --plot docs/benchmarks-latency.svg

# A short smoke of the suite: it runs and prints ratios (figures not meaningful).
bench-quick: setup
	cargo run -p pyvisor-bench -- --quick

# The multi-node benchmark row (release build): a remote call over loopback against a local
# call plus a raw TCP round trip, and throughput from one and two hosting nodes
# (docs/benchmarks.md, "Across nodes"). The node binary is built first: the bench starts it
# from its own directory. Every process of it runs on the last CPU (`--pin-cpu`: on a small VM a
# wake of an idle virtual CPU costs more than the paths measured; docs/benchmarks.md gives both).
# Options: `make bench-cluster BENCH_CLUSTER_ARGS="--rounds 3 --json F"` (no `--pin-cpu`: unpinned).
BENCH_CLUSTER_ARGS ?= --pin-cpu $(shell expr $$(nproc) - 1) --json target/bench/cluster.json
bench-cluster: setup
	cargo build --release -p pyvisor-cluster --bins
	cargo run --release -p pyvisor-cluster --bin pyvisor-cluster-bench -- $(BENCH_CLUSTER_ARGS)

clean:
	rm -rf $(VENV) $(PLAIN_VENV) target
