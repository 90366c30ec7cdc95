"""Test worker that starts once: every later start (a replacement) fails at import.

The first start creates the marker file named by ``STARTS_ONCE_MARKER``; a start that finds it
raises, as a worker whose model store became unreachable would.
"""

import os

from pyvisor_worker import expose, run_worker

MARKER = os.environ["STARTS_ONCE_MARKER"]

try:
    os.close(os.open(MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
except FileExistsError:
    raise RuntimeError("started once already: every restart fails at import") from None


@expose(idempotent=True)
def echo(x):
    return x


if __name__ == "__main__":
    run_worker()
