"""The worker of the multi-node benchmark (src/bin/pyvisor-cluster-bench.rs): the same echo
runs in the bench's own local pool and in the pools of the hosting nodes."""

from pyvisor_worker import expose, run_worker


@expose(idempotent=True)
def echo(x):
    """``x`` back, unchanged."""
    return x


if __name__ == "__main__":
    run_worker()
