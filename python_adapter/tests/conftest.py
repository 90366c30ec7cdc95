"""Fixtures: worker scripts written into tmp_path and started under a FakeParent."""

from __future__ import annotations

import itertools
import os
import signal
import textwrap
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import pytest

from pyvisor_worker.testing import FakeParent

#: A worker exposing one function per behaviour the tests need.
KITCHEN_SINK = '''
import asyncio
import os
import subprocess
import sys
import threading
import time

from pyvisor_worker import Context, expose, run_worker


class MyError(Exception):
    pass


class Weird(BaseException):
    pass


@expose
def echo(x):
    return x


@expose(name="predict", idempotent=True)
def _predict(features, ctx: Context):
    return {
        "call_id": ctx.call_id,
        "attempt": ctx.attempt,
        "deadline": ctx.deadline,
        "remaining": ctx.remaining(),
        "traceparent": ctx.traceparent,
        "tracestate": ctx.tracestate,
        "cancelled": ctx.cancelled,
        "n": len(features),
    }


@expose
def ctx_only(ctx: Context):
    return ctx.call_id


@expose
def no_args():
    return "no args"


@expose
def fail(message):
    raise MyError(message)


@expose
def weird(_):
    raise Weird("not an Exception")


@expose
def exit_with(code):
    sys.exit(code)


@expose
def unserializable(kind):
    if kind == "set":
        return {1, 2, 3}
    if kind == "bigint":
        return 2 ** 70
    return object()


@expose
def big(n):
    return b"x" * n


@expose
def sleep(seconds):
    time.sleep(seconds)
    return seconds


@expose
def spin(seconds):
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


@expose
def until_cancelled(limit, ctx: Context):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if ctx.cancelled:
            return "saw cancel"
        sum(range(1000))
    return "limit reached"


_order = []


@expose
def record(x):
    _order.append(x)
    return list(_order)


@expose
def chatty(x):
    print("hello from user code", x)
    for i in range(100):
        print("line", i)
    print("to stderr", file=sys.stderr)
    return x


_abarrier = None


@expose
async def async_barrier(_):
    global _abarrier
    if _abarrier is None:
        _abarrier = asyncio.Barrier(4)
    await asyncio.wait_for(_abarrier.wait(), 10)
    return "through"


@expose
async def async_sleep(seconds):
    await asyncio.sleep(seconds)
    return "slept"


@expose
async def async_fail(_):
    await asyncio.sleep(0)
    raise MyError("async failure")


_tbarrier = threading.Barrier(4, timeout=10)


@expose(threads=4)
def thread_barrier(_):
    _tbarrier.wait()
    return threading.current_thread().name


@expose(threads=1)
def thread_sleep(seconds):
    time.sleep(seconds)
    return seconds


@expose
def spawn_sleep(_):
    return subprocess.Popen(["sleep", "1000"]).pid


if __name__ == "__main__":
    run_worker()
'''

SpawnFn = Callable[..., FakeParent]


@pytest.fixture(autouse=True)
def _no_inherited_otlp_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers inherit the test process's environment: an OTLP endpoint set outside (a CI
    exporting its own traces) would turn tracing on in every worker where the `otel` extra is
    installed. Tests that want tracing pass their own endpoint."""
    for key in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def write_script(tmp_path: Path) -> Callable[[str, str], Path]:
    def write(source: str, name: str = "worker.py") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(source))
        return path

    return write


@pytest.fixture
def spawn(write_script: Callable[[str, str], Path]) -> Iterator[SpawnFn]:
    """spawn(source=KITCHEN_SINK, **FakeParent.spawn kwargs) -> FakeParent (cleaned up after)."""
    parents: List[FakeParent] = []

    def start(source: str = KITCHEN_SINK, name: str = "worker.py", **kwargs: Any) -> FakeParent:
        parent = FakeParent.spawn(write_script(source, name), **kwargs)
        parents.append(parent)
        return parent

    yield start
    for parent in parents:
        if parent.proc.poll() is None:
            try:
                os.killpg(parent.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        parent.close(timeout=10)


@pytest.fixture
def worker(spawn: SpawnFn) -> FakeParent:
    """The kitchen-sink worker with a 100 ms beat."""
    return spawn(beat_interval_ms=100)


class RespawningWorker:
    """One worker process for a property test, spawned on first use and again after it exits
    (a protocol error ends it); ``ids`` hands out call ids the worker has never seen."""

    def __init__(self, script: Path) -> None:
        self.script = script
        self.parent: Optional[FakeParent] = None
        self.ids: Iterator[int] = itertools.count(1)

    def get(self) -> FakeParent:
        if self.parent is None:
            self.parent = FakeParent.spawn(self.script, beat_interval_ms=60_000)
        return self.parent

    def close(self) -> None:
        if self.parent is not None:
            self.parent.close(timeout=10)
            self.parent = None
