"""Test worker for fault tolerance: side effects, crashes, hangs, leaks, cancellation."""

import asyncio
import ctypes
import os
import sys
import time

from pyvisor_worker import Context, chaos, expose, run_worker, tracer

SIDE_EFFECTS = os.environ.get("SIDE_EFFECT_LOG")
EVENTS = os.environ.get("EVENT_LOG")


def _log(path, line):
    if path:
        # One write with O_APPEND: lines from concurrent workers never interleave.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{line}\n".encode())
        finally:
            os.close(fd)


@expose(idempotent=True)
def echo(x):
    return x


@expose
def record(x):
    """Not idempotent: its side effect must happen at most once per call."""
    _log(SIDE_EFFECTS, x)
    return x


@expose
def record_points(x):
    """A side effect between two chaos points."""
    chaos.point("before_side_effect")
    _log(SIDE_EFFECTS, x)
    chaos.point("after_side_effect")
    return x


@expose(idempotent=True)
def segfault(_):
    ctypes.string_at(0)


@expose
def hold_gil(_):
    return sum(range(10**12))


@expose
def spin(seconds):
    end = time.time() + seconds
    n = 0
    while time.time() < end:
        n += 1
    return seconds


@expose
def nap(seconds):
    time.sleep(seconds)
    return seconds


_leaked = []


@expose(idempotent=True)
def leak(mib):
    _leaked.append(b"\x01" * (mib << 20))  # really touched, so resident
    return len(_leaked)


@expose
def wait_cancel(timeout, ctx: Context):
    end = time.time() + timeout
    while time.time() < end:
        if ctx.cancelled:
            _log(EVENTS, f"inline saw cancel {ctx.call_id}")
            return "saw cancel"
        time.sleep(0.01)
    return "no cancel"


@expose
async def async_wait(seconds):
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        _log(EVENTS, "async cancelled")
        raise
    return seconds


@expose
def mark(x):
    _log(EVENTS, f"ran {x}")
    return x


@expose
def traced(x):
    """Makes a span of its own (exported by the worker when tracing is active), then fails
    when asked to."""
    with tracer().start_as_current_span("user.step") as span:
        span.set_attribute("step.input", str(x))
    if x == "fail":
        raise ValueError("asked to fail")
    return x


@expose
def long_line(mib):
    """Hostile output: `mib` MiB on stderr without a line ending, then one, then `after`."""
    chunk = b"x" * (1 << 20)
    out = sys.stderr.buffer
    for _ in range(mib):
        out.write(chunk)
    out.write(b"\nafter\n")
    out.flush()
    return mib


@expose
def overrun(seconds):
    time.sleep(seconds)  # ignores cancel: only harakiri ends it early
    return seconds


if __name__ == "__main__":
    run_worker()
