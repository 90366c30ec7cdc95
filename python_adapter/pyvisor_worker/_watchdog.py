"""The watchdog: a tiny process that outlives the worker just long enough to kill its group.

The parent starts the worker with ``PR_SET_PDEATHSIG=SIGKILL``, so a worker dies with its parent
even when it ignores SIGTERM or is stuck in C code. That signal reaches only the worker itself;
processes that user code started would survive. So before any user code runs the launcher forks
this watchdog: its own parent-death signal (SIGTERM) fires when the worker dies, for any
reason, and it then SIGKILLs the worker's whole process group (itself included).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import time
from types import FrameType
from typing import Any, NoReturn, Optional

__all__ = ["start_watchdog", "set_parent_death_signal", "watchdog_alive"]

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15

_libc: Any = None

#: The watchdog's pid in the worker (None: none was started), and whether it is known gone.
_pid: Optional[int] = None
_lost = False


def _load_libc() -> Any:
    global _libc
    if _libc is None:
        if not sys.platform.startswith("linux"):
            _libc = False
        else:
            try:
                _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                _libc.prctl.argtypes = [
                    ctypes.c_int,
                    ctypes.c_ulong,
                    ctypes.c_ulong,
                    ctypes.c_ulong,
                    ctypes.c_ulong,
                ]
                _libc.prctl.restype = ctypes.c_int
            except (OSError, AttributeError):
                _libc = False
    return _libc


def set_parent_death_signal(signum: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, signum)`` for the calling thread's process; False if unsupported."""
    libc = _load_libc()
    if not libc:
        return False
    return bool(libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0)


def _set_process_name(name: bytes) -> None:
    libc = _load_libc()
    if libc:
        buf = ctypes.create_string_buffer(name[:15])
        libc.prctl(PR_SET_NAME, ctypes.cast(buf, ctypes.c_void_p).value or 0, 0, 0, 0)


def start_watchdog() -> Optional[int]:
    """Fork the watchdog; returns its pid, or ``None`` when it cannot do its job safely.

    Must be called while the process is single-threaded (before user code runs). It is only
    started when the worker leads its own process group (the parent starts it that way): the
    watchdog kills that group, and killing a group the worker merely belongs to could hit the
    parent itself.
    """
    worker_pid = os.getpid()
    if os.getpgrp() != worker_pid or not _load_libc():
        return None
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    pid = os.fork()
    if pid != 0:
        global _pid
        _pid = pid
        return pid
    try:
        _watch(worker_pid)
    finally:
        os._exit(0)


def watchdog_alive() -> Optional[bool]:
    """Whether this worker's watchdog still runs (``None``: none was started).

    Reported in every beat: a worker whose watchdog died has lost its protection against the
    parent's death taking only the worker and leaving its subprocesses behind, so the parent
    recycles it (make-before-break). The dead watchdog is reaped here.
    """
    global _lost
    if _pid is None:
        return None
    if _lost:
        return False
    try:
        done, _ = os.waitpid(_pid, os.WNOHANG)
    except ChildProcessError:  # reaped by someone else: gone all the same
        done = _pid
    except OSError:
        return True
    if done == _pid:
        _lost = True
        return False
    return True


def _watch(worker_pid: int) -> NoReturn:
    pgid = worker_pid

    def kill_group() -> NoReturn:
        try:
            os.killpg(pgid, signal.SIGKILL)  # this kills the watchdog too
        finally:
            os._exit(0)

    def on_term(signum: int, frame: Optional[FrameType]) -> None:
        # Our parent-death signal, or a SIGTERM sent to the whole group? Only the first means
        # the worker is gone; on a group-wide SIGTERM the worker shuts down gracefully itself,
        # and we act when it has exited.
        if os.getppid() != worker_pid:
            kill_group()

    # The handler goes in before the parent-death signal is armed, so that signal can never
    # hit the default action (which would just end the watchdog).
    signal.signal(signal.SIGTERM, on_term)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    _set_process_name(b"pyvisor-watchdog")
    armed = set_parent_death_signal(signal.SIGTERM)

    # Hold nothing of the worker's: not the protocol socket, not the stdout/stderr pipes
    # (otherwise the parent would never see EOF on them).
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    _close_fds_from(3)

    if os.getppid() != worker_pid:  # the worker died before the signal was armed
        kill_group()
    if armed:
        while True:
            signal.pause()
    while True:  # no parent-death signal on this system: poll
        time.sleep(0.5)
        if os.getppid() != worker_pid:
            kill_group()


def _close_fds_from(low: int) -> None:
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        try:
            limit = os.sysconf("SC_OPEN_MAX")
        except (ValueError, OSError):
            limit = -1
        os.closerange(low, limit if limit > 0 else 65536)
        return
    for fd in fds:
        if fd >= low:
            try:
                os.close(fd)
            except OSError:
                pass
