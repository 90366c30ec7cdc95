"""Test worker that is hard to kill: ignores SIGTERM, can hold the GIL in C code, and
starts a subprocess of its own."""

import signal
import subprocess
import sys
import time

from pyvisor_worker import expose, run_worker

signal.signal(signal.SIGTERM, signal.SIG_IGN)

_children = []


@expose
def echo(x):
    return x


@expose
def spawn_child(_):
    time.sleep(0.3)  # long enough that two concurrent calls land on two workers
    p = subprocess.Popen(["sleep", "1000"])
    _children.append(p)
    return p.pid


@expose
def detach(_):
    """A subprocess in its own session: out of reach of the process group."""
    p = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    _children.append(p)
    return p.pid


_STUBBORN = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ok', flush=True)\n"
    "time.sleep(1000)\n"
)


@expose
def detach_stubborn(_):
    """A grandchild that leaves the worker's session (setsid) and ignores SIGTERM."""
    p = subprocess.Popen([sys.executable, "-c", _STUBBORN], start_new_session=True, stdout=subprocess.PIPE)
    assert p.stdout is not None
    p.stdout.readline()  # its SIGTERM handler is in place
    _children.append(p)
    return p.pid


@expose
def hold_gil(_):
    # One long C loop that never releases the GIL.
    return sum(range(10**12))


if __name__ == "__main__":
    run_worker()
