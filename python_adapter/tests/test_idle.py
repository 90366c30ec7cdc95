"""An idle worker sleeps: no thread of it wakes every few milliseconds."""

from __future__ import annotations

import glob
import time

from conftest import SpawnFn
from pyvisor_worker.testing import FakeParent


def _wakeups(pid: int) -> int:
    """Voluntary context switches of every thread of ``pid`` so far."""
    total = 0
    for status in glob.glob(f"/proc/{pid}/task/*/status"):
        try:
            with open(status) as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        except OSError:
            pass  # a thread that just ended
    return total


def test_an_idle_worker_does_not_poll(spawn: SpawnFn) -> None:
    worker = spawn(beat_interval_ms=1000)
    # Serve a slow plain call first: the sentinel has watched once and must go back to sleep.
    assert worker.invoke("sleep", 0.05) == 0.05
    assert worker.invoke("echo", 1) == 1
    time.sleep(0.2)
    before = _wakeups(worker.pid)
    time.sleep(2.0)
    woke = _wakeups(worker.pid) - before
    # Two heartbeats cost a few wakeups; a 5 ms poll would cost ~400.
    assert woke < 40, f"{woke} wakeups in 2 s of idleness"


def test_a_slow_call_still_lets_the_sentinel_read(worker: FakeParent) -> None:
    # While a plain call runs, the sentinel takes the socket over: a ping is answered.
    call_id = worker.call("spin", 1.0)
    time.sleep(0.1)
    worker.ping(7)
    worker.pong_for(7, timeout=0.5)  # raises if no pong arrives while the call runs
    assert worker.reply_for(call_id).ok
