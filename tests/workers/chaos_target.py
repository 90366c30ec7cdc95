"""Target of the external chaos test: one idempotent and one non-idempotent function."""

import os

from pyvisor_worker import expose, run_worker

SIDE_EFFECTS = os.environ["CHAOS_SIDE_EFFECT_LOG"]


@expose(idempotent=True)
def compute(x):
    """Idempotent: returns its input unchanged, after a little CPU work."""
    acc = 0
    for i in range(2000):
        acc = (acc * 31 + i) % 1000003
    return x


@expose
def record(token):
    """Not idempotent: appends the call's token to the side-effect log, then returns it."""
    # One unbuffered write with O_APPEND: lines from concurrent workers never interleave, and
    # the line is in the file before the reply is sent.
    fd = os.open(SIDE_EFFECTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{token}\n".encode())
    finally:
        os.close(fd)
    return token


if __name__ == "__main__":
    run_worker()
