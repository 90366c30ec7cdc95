"""Test worker whose start a test can hold back: while the file named by $PYVISOR_TEST_HOLD
exists, module-level code waits, so a (re)started worker stays `starting` (not ready)."""

import os
import time

from pyvisor_worker import expose, run_worker

_HOLD = os.environ.get("PYVISOR_TEST_HOLD")
while _HOLD and os.path.exists(_HOLD):
    time.sleep(0.05)


@expose(idempotent=True)
def echo(x):
    return x


@expose(idempotent=True)
def pid(_):
    return os.getpid()


if __name__ == "__main__":
    run_worker()
