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


@expose(buffers="memoryview")
def mirror(data):
    """The buffers scenario: every byte read, a new buffer of the same size back (numpy,
    imported here so that the other scenarios' workers do not load it)."""
    import numpy as np

    return np.frombuffer(data, np.uint8) + 1


if __name__ == "__main__":
    run_worker()
