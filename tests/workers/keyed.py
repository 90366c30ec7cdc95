"""Target of the idempotency-key tests: non-idempotent functions with a side-effect log.

Every function appends its token to ``KEYED_SIDE_EFFECT_LOG`` (one ``O_APPEND`` write, in the
file before anything else happens) when it starts running, so the log counts executions.
``KEYED_NO_CAPABILITIES=1`` makes the worker announce no capabilities (an older adapter): the
parent then sends plain ``call`` and never learns whether a call started.
"""

import os
import signal
import time

from pyvisor_worker import expose, run_worker

SIDE_EFFECTS = os.environ["KEYED_SIDE_EFFECT_LOG"]


def log(token):
    fd = os.open(SIDE_EFFECTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{token}\n".encode())
    finally:
        os.close(fd)


@expose
def record(token):
    """Logs the token and returns it."""
    log(token)
    return token


@expose
def record_slowly(args):
    """``[token, seconds]``: logs the token, sleeps, returns it."""
    token, seconds = args
    log(token)
    time.sleep(seconds)
    return token


@expose
def fail(token):
    """Logs the token, then raises."""
    log(token)
    raise ValueError(f"no good: {token}")


@expose
def die(token):
    """Logs the token, then the worker is SIGKILLed (by itself) while the function runs."""
    log(token)
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)


@expose
def block(seconds):
    """Keeps the worker's inline executor busy (calls behind it stay queued in the worker)."""
    time.sleep(seconds)
    return seconds


if __name__ == "__main__":
    if os.environ.get("KEYED_NO_CAPABILITIES") == "1":
        import pyvisor_worker._worker as w

        w.CAPABILITIES = ()
    run_worker()
