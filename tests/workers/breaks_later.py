"""Test worker that starts fine until a marker file exists, then fails at import."""

import os

from pyvisor_worker import expose, run_worker

if os.path.exists(os.environ["BREAK_MARKER"]):
    raise RuntimeError("the model store is unreachable")


@expose
def echo(x):
    return x


if __name__ == "__main__":
    run_worker()
