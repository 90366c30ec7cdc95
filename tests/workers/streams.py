"""Target of the streaming tests (tests/streaming.rs): generator functions, sync and async.

Side effects go to files the test names in the arguments, written with one ``os.write`` each so
that the test can read them while the stream runs (what the generator did, seen from the
worker's side).
"""

import asyncio
import os
import time

from pyvisor_worker import expose, run_worker


def note(path, text):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


@expose(idempotent=True)
def count(n):
    """0, 1, ..., n - 1."""
    yield from range(n)


@expose
async def count_async(n):
    """0, 1, ..., n - 1, from an async generator."""
    for i in range(n):
        if i % 1000 == 0:
            await asyncio.sleep(0)
        yield i


@expose
def produced(args):
    """``{"log": path, "n": n}``: yields 0..n, noting each index in the log as it is produced:
    the log shows how far the generator ran (it is not resumed without credit)."""
    for i in range(args["n"]):
        note(args["log"], f"{i}\n")
        yield i


@expose
def endless(args):
    """``{"done": path, "pause": seconds}``: yields 0, 1, 2, ... forever; its ``finally``
    writes "closed" to ``done`` (runs when the stream is cancelled and the generator closed)."""
    try:
        i = 0
        while True:
            yield i
            i += 1
            if args.get("pause"):
                time.sleep(args["pause"])
    finally:
        note(args["done"], "closed")


@expose
async def endless_async(args):
    """``endless`` as an async generator (closed with ``aclose``)."""
    try:
        i = 0
        while True:
            yield i
            i += 1
            await asyncio.sleep(args.get("pause", 0))
    finally:
        note(args["done"], "closed")


@expose(idempotent=True)
def pids(args):
    """``{"n": n, "pause": seconds}``: yields ``[pid, i]`` for i in 0..n, pausing between."""
    for i in range(args["n"]):
        yield [os.getpid(), i]
        time.sleep(args.get("pause", 0))


@expose
def pids_once(args):
    """``pids``, not idempotent."""
    yield from pids(args)


@expose
def fails_after(n):
    """Yields n items, then raises."""
    yield from range(n)
    raise ValueError(f"failed after {n} items")


@expose
def plain(x):
    """Not a generator."""
    return x


if __name__ == "__main__":
    run_worker()
