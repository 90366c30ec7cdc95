"""Target of the soak test (tests/soak.rs): a mix of small, large, slow, CPU-bound, failing and
async calls, idempotent, and one non-idempotent call with a side effect."""

import asyncio
import os
import time

from pyvisor_worker import expose, run_worker

SIDE_EFFECTS = os.environ["SOAK_SIDE_EFFECT_LOG"]


@expose(idempotent=True)
def echo(x):
    return x


@expose(idempotent=True)
def reverse(data):
    """A large payload in, the same size out (bytes reversed)."""
    return data[::-1]


@expose(idempotent=True)
def nap(ms):
    time.sleep(ms / 1000)
    return ms


@expose(idempotent=True)
async def async_nap(ms):
    await asyncio.sleep(ms / 1000)
    return ms


@expose(idempotent=True)
async def async_echo(x):
    await asyncio.sleep(0.005)
    return x


@expose(idempotent=True)
def squares(n):
    """CPU: the sum of k*k for k < n, in pure Python."""
    acc = 0
    for k in range(n):
        acc += k * k
    return acc


@expose(idempotent=True)
def fail(message):
    raise ValueError(message)


@expose
def record(token):
    """Not idempotent: appends the call's token to the side-effect log, then returns it."""
    fd = os.open(SIDE_EFFECTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{token}\n".encode())
    finally:
        os.close(fd)
    return token


if __name__ == "__main__":
    run_worker()
