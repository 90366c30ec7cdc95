"""The pyvisor side of the benchmark: the same echo, exposed through the adapter."""

from pyvisor_worker import expose, run_worker


@expose(idempotent=True)
def echo(x):
    return x


@expose(idempotent=True)
def repeat(args):
    """``[item, n]``: yields ``item`` n times (the streaming scenario)."""
    item, n = args
    for _ in range(n):
        yield item


if __name__ == "__main__":
    run_worker()
