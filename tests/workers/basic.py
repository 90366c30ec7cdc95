"""Test worker: echo, errors, sleeps, barriers, and ways to misbehave."""

import asyncio
import os
import threading
import time

from pyvisor_worker import Context, expose, run_worker


@expose(idempotent=True)
def echo(x):
    return x


@expose
def add(args):
    a, b = args
    return a + b


@expose
def fail(message):
    raise ValueError(message)


class CustomError(Exception):
    pass


@expose
def fail_custom(message):
    raise CustomError(message)


@expose
def unserializable(_):
    return {1, 2, 3}


@expose
def sleep(seconds):
    time.sleep(seconds)
    return seconds


@expose
def pid(_):
    return os.getpid()


@expose
def noisy(x):
    print("printing to stdout must not corrupt the protocol", x, flush=True)
    print("\x00\x00\x00\x05garbage")
    return x


_async_barriers: dict = {}


@expose
async def async_barrier(args):
    parties, timeout = args
    b = _async_barriers.setdefault(parties, asyncio.Barrier(parties))
    await asyncio.wait_for(b.wait(), timeout=timeout)
    return "passed"


_thread_barrier = threading.Barrier(4, timeout=20)


@expose(threads=4)
def thread_barrier(_):
    _thread_barrier.wait()
    return threading.get_ident()


@expose
def die_after(seconds):
    """Sleep then get killed: used with an external SIGKILL mid-call."""
    time.sleep(seconds)
    return "survived"


def _protocol_fd() -> int:
    """The worker's end of the socketpair (the adapter removes PYVISOR_FD from os.environ)."""
    from pyvisor_worker._config import current_config

    return current_config().fd


@expose
def corrupt(_):
    """Write a frame that is not MessagePack straight onto the protocol socket."""
    os.write(_protocol_fd(), b"\x00\x00\x00\x02\xc1\xc1")
    time.sleep(30)


@expose
def oversized_prefix(_):
    """Announce a frame larger than any maximum."""
    os.write(_protocol_fd(), b"\x7f\xff\xff\xff")
    time.sleep(30)


@expose
def big(n):
    return b"x" * n


@expose
def minor_faults(_):
    """Page faults this process has taken so far (memory touched for the first time)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@expose
def getenv(name):
    return os.environ.get(name)


@expose
def deadline(_, ctx: Context):
    return ctx.deadline


@expose
def trace_context(_, ctx: Context):
    return [ctx.traceparent, ctx.tracestate]


if __name__ == "__main__":
    run_worker()
