"""The pyvisor side of the benchmark: the same echo, exposed through the adapter."""

from pyvisor_worker import expose, run_worker


@expose(idempotent=True)
def echo(x):
    return x


if __name__ == "__main__":
    run_worker()
