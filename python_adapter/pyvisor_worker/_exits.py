"""How the worker process ends, and its messages on stderr.

Owns the exit paths that do not go back through ``run_worker()``: ``hard_exit`` (flush the
last spans and stdio, then ``os._exit``), the parent gone (EOF or a failed write: status 0),
a protocol error (status 3), an adapter bug in one of its threads (status 1), and
``end_by_sigterm`` (after an external SIGTERM: the process dies by that signal, so the parent
does not take the exit for the worker's own doing). Knows nothing of sockets, calls or
threads beyond that; every other module reports through it.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from typing import Callable, NoReturn

from . import _otel
from ._config import EXIT_INTERNAL, EXIT_OK, EXIT_PROTOCOL

__all__ = [
    "say",
    "flush_stdio",
    "hard_exit",
    "parent_gone",
    "protocol_error",
    "guarded",
    "exit_status",
    "end_by_sigterm",
]


def say(message: str) -> None:
    """One line on stderr, prefixed ``pyvisor_worker:``; never raises."""
    try:
        sys.stderr.write(f"pyvisor_worker: {message}\n")
        sys.stderr.flush()
    except Exception:
        pass


def flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass


def _flush_all() -> None:
    tracing = _otel.active()
    if tracing is not None:
        tracing.shutdown()  # export the last spans first (bounded)
    flush_stdio()


def hard_exit(status: int) -> NoReturn:
    """Flush the last spans (bounded) and stdio, then ``os._exit(status)`` from any thread."""
    _flush_all()
    os._exit(status)


def parent_gone() -> NoReturn:
    """The parent closed the socket or is gone (EOF, a failed write): exit 0 at once."""
    hard_exit(EXIT_OK)


def protocol_error(message: str) -> NoReturn:
    say(f"protocol error: {message}")
    hard_exit(EXIT_PROTOCOL)


def guarded(target: Callable[[], None]) -> Callable[[], None]:
    """A thread body running ``target``; an exception escaping it is a bug in the adapter:
    say so and exit 1 rather than hang without a reader or a beat."""

    def run() -> None:
        try:
            target()
        except BaseException:
            try:
                sys.stderr.write("pyvisor_worker: internal error\n")
                traceback.print_exc()
            except Exception:
                pass
            hard_exit(EXIT_INTERNAL)

    return run


def exit_status(exc: BaseException) -> int:
    """The exit status for ``SystemExit``/``KeyboardInterrupt`` raised by user code."""
    if isinstance(exc, SystemExit):
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        say(str(code))
        return 1
    try:
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    except Exception:
        pass
    return 130


def end_by_sigterm() -> NoReturn:
    """End the process by SIGTERM: its wait status then says "killed by signal 15".

    Called on the main thread (only it may change a signal's disposition) once an external
    SIGTERM's drain is over. Flushes the last spans and stdio, restores SIGTERM's default
    disposition, unblocks it and sends it to this process; ``os._exit(128 + 15)`` if the
    process is somehow still alive.
    """
    _flush_all()
    sigterm = signal.SIGTERM
    try:
        signal.signal(sigterm, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {sigterm})
    except (ValueError, OSError, AttributeError):  # not the main thread: kill() still works
        pass
    try:
        os.kill(os.getpid(), sigterm)
        # Unblocked on this thread, it is delivered before kill() returns; give another
        # thread that would take it a moment.
        time.sleep(1.0)
    except Exception:
        pass
    os._exit(128 + int(sigterm))
