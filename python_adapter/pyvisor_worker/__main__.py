"""Launcher: ``python -m pyvisor_worker SCRIPT [args...]`` or ``--module MODULE [args...]``.

This is how the pyvisor parent starts a worker. In order, it:

1. checks the start environment (``PYVISOR_FD``; exit status 2 when this process was not
   started by pyvisor);
2. makes stdout/stderr line-buffered so the parent sees each line promptly;
3. forks the watchdog (see ``_watchdog``) before any user code runs;
4. runs the user's script or module as ``__main__``;
5. calls ``run_worker()`` if the user code did not.

Errors in user code propagate normally: traceback on stderr, non-zero exit.
"""

from __future__ import annotations

import faulthandler
import os
import runpy
import sys
from typing import List, NoReturn, Optional

from ._config import EXIT_BAD_START, StartError, current_config, exit_bad_start
from ._watchdog import start_watchdog
from ._worker import run_worker, started

USAGE = (
    "usage: python -m pyvisor_worker SCRIPT [args...]\n"
    "       python -m pyvisor_worker --module MODULE [args...]\n"
)


def _usage_error(message: str) -> NoReturn:
    sys.stderr.write(f"pyvisor_worker: {message}\n{USAGE}")
    raise SystemExit(EXIT_BAD_START)


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        current_config()
    except StartError as e:
        exit_bad_start(e)

    module: Optional[str] = None
    script: Optional[str] = None
    if not args:
        _usage_error("no script given")
    if args[0] in ("-m", "--module"):
        if len(args) < 2:
            _usage_error(f"{args[0]} needs a module name")
        module, rest = args[1], args[2:]
    elif args[0].startswith("-"):
        _usage_error(f"unknown option {args[0]!r}")
    else:
        script, rest = args[0], args[1:]

    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)
    if not faulthandler.is_enabled():
        faulthandler.enable()  # a crash in C code leaves the Python stack on stderr

    start_watchdog()

    if script is not None:
        if not os.path.isfile(script):
            sys.stderr.write(f"pyvisor_worker: can't open script {script!r}: no such file\n")
            return 1
        sys.argv = [script, *rest]
        # Like `python SCRIPT`: the script's directory comes first on sys.path.
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        runpy.run_path(script, run_name="__main__")
    else:
        assert module is not None
        sys.argv = [module, *rest]
        runpy.run_module(module, run_name="__main__", alter_sys=True)

    if not started():
        run_worker()
    return 0


if __name__ == "__main__":
    sys.exit(main())
