"""Control: the worker's heartbeat, its graceful shutdown and its signals.

Owns the **control thread** (:meth:`Control.run`): it sends a ``beat`` every interval through
the writer and, once shutdown has begun (a ``shutdown`` message, or SIGTERM delivered through
a wake-up pipe by ``signal.set_wakeup_fd``), stops admitting calls, watches the calls in flight
drain and ends the worker when they are done or the grace expired. Also the SIGTERM handler
(installed and restored on the main thread), the beat and ``pong`` maps, and ``health``.

How the worker ends (:meth:`Control.wait`) depends on who asked. After the parent's
``shutdown`` message, ``run_worker()`` returns once the calls in flight are done (exit status
0), or the process exits 0 when the grace expires. After a SIGTERM that came without a
``shutdown`` message (someone else's kill), the main thread makes the process die by SIGTERM
(``_exits.end_by_sigterm``), drained or not: its wait status then says "killed by signal 15",
which the parent does not hold against the calls in flight, instead of an exit of its own.
Either way, calls that arrive once shutdown began are refused (``WorkerState.accepting``).
Does not read the socket or run calls.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from typing import Any, Dict, Optional

from ._config import EXIT_OK
from ._exits import hard_exit, say
from ._framing import HEADER, MSG_BEAT, MSG_PONG, new_packer
from ._replies import Pack, Writer
from ._state import WorkerState
from ._watchdog import watchdog_alive

__all__ = ["Control", "DEFAULT_GRACE", "REQUESTED", "SIGNALLED"]

#: Grace for SIGTERM (the parent's ``shutdown`` message carries its own).
DEFAULT_GRACE = 5.0

#: How the worker ends: a ``shutdown`` message (``run_worker()`` returns) ...
REQUESTED = "requested"
#: ... or a SIGTERM that came without one (the process dies by SIGTERM).
SIGNALLED = "signalled"

_WAKE_SHUTDOWN = b"\x00"
_SIGTERM_BYTE = int(signal.SIGTERM)
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_HEADER_PACK = HEADER.pack


def rss() -> int:
    """Resident set size in bytes, from ``/proc/self/statm``."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0


def _on_sigterm(signum: int, frame: Any) -> None:
    # The real work happens in the control thread, woken through signal.set_wakeup_fd.
    pass


class Control:
    def __init__(
        self, writer: Writer, state: WorkerState, max_frame: int, beat_interval: float
    ) -> None:
        self._writer = writer
        self._state = state
        self._max_frame = max_frame
        self._beat_interval = beat_interval
        self._beat_seq = 0

        self._stop_lock = threading.Lock()
        self._stop_deadline: Optional[float] = None
        self._requested = False  # a `shutdown` message came
        self._outcome = REQUESTED
        self._finished = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

        self._signals_installed = False
        self._old_wakeup_fd = -1
        self._old_term: Any = None

    # ------------------------------------------------------------------ signals (main thread)

    def install_signals(self) -> None:
        """Route SIGTERM to the control thread; only on the main thread (else say so)."""
        if threading.current_thread() is not threading.main_thread():
            say("run_worker() is not running in the main thread: SIGTERM is not handled")
            return
        # The C-level handler writes the signal number to the wake-up pipe, so SIGTERM is
        # seen by the control thread even while the main thread is busy.
        self._old_wakeup_fd = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
            # (A script that chose to ignore SIGTERM keeps ignoring it.)
            self._old_term = signal.signal(signal.SIGTERM, _on_sigterm)
        self._signals_installed = True

    def restore_signals(self) -> None:
        if self._signals_installed:
            if self._old_term is not None:
                signal.signal(signal.SIGTERM, self._old_term)
            signal.set_wakeup_fd(self._old_wakeup_fd)
            self._signals_installed = False

    # ------------------------------------------------------------------ shutdown

    def begin_shutdown(self, grace: Optional[float], requested: bool) -> None:
        """Stop admitting calls; end once those in flight are done, or after ``grace``
        seconds (``None``: :data:`DEFAULT_GRACE`). ``requested``: the parent's ``shutdown``
        message (else SIGTERM). A second request keeps the earlier deadline."""
        if grace is None:
            grace = DEFAULT_GRACE
        with self._stop_lock:
            self._state.accepting = False
            if requested:
                self._requested = True
            deadline = time.monotonic() + max(0.0, grace)
            if self._stop_deadline is None or deadline < self._stop_deadline:
                self._stop_deadline = deadline
        try:
            os.write(self._wake_w, _WAKE_SHUTDOWN)
        except OSError:  # pipe full: the control thread is awake anyway
            pass

    def wait(self) -> str:
        """Until the worker is done (main thread); returns how it ends: :data:`REQUESTED`
        or :data:`SIGNALLED`."""
        while not self._finished.wait(1.0):
            pass
        return self._outcome

    def _finish(self) -> None:
        self._outcome = REQUESTED if self._requested else SIGNALLED
        self._finished.set()

    # ------------------------------------------------------------------ beats

    def beat_map(self) -> Dict[str, Any]:
        now_calls = list(self._state.calls.values())
        return {
            "seq": self._beat_seq,
            "rss": rss(),
            "in_progress": [
                [c._call_id, c._attempt, c._phase, int(c._started * 1000.0)] for c in now_calls
            ],
            "served": self._writer.served,
            "watchdog": watchdog_alive(),
        }

    def beat_frame(self, kind: int, nonce: Any, pack: Pack) -> bytes:
        """A ``beat`` (``kind`` MSG_BEAT) or the ``pong`` answering ``nonce``."""
        beat = self.beat_map()
        message = [MSG_BEAT, beat] if kind == MSG_BEAT else [MSG_PONG, nonce, beat]
        body = pack(message)
        while len(body) > self._max_frame and beat["in_progress"]:
            # Thousands of calls in flight and a tiny frame limit: report fewer of them.
            del beat["in_progress"][len(beat["in_progress"]) // 2 :]
            body = pack(message)
        return _HEADER_PACK(len(body)) + body

    def health(self) -> Dict[str, Any]:
        """The built-in ``health`` function."""
        return {"ok": True, "pid": os.getpid(), "rss": rss(), "served": self._writer.served}

    # ------------------------------------------------------------------ the control thread

    def run(self) -> None:
        pack = new_packer()
        writer = self._writer
        calls = self._state.calls
        interval = self._beat_interval
        monotonic = time.monotonic
        wake = self._wake_r
        next_beat = monotonic() + interval
        while True:
            timeout = next_beat - monotonic()
            if self._stop_deadline is not None:
                timeout = min(timeout, 0.01)  # watch the calls in flight drain
            if timeout > 0:
                ready, _, _ = select.select([wake], [], [], timeout)
                if ready:
                    try:
                        woken = os.read(wake, 4096)
                    except BlockingIOError:
                        woken = b""
                    if _SIGTERM_BYTE in woken:
                        self.begin_shutdown(DEFAULT_GRACE, requested=False)
            now = monotonic()
            if now >= next_beat:
                self._beat_seq += 1
                writer.write(self.beat_frame(MSG_BEAT, None, pack))
                next_beat += interval
                if next_beat <= now:
                    next_beat = now + interval
            deadline = self._stop_deadline
            if deadline is not None:
                if not calls:
                    writer.flush()
                    self._finish()
                    return
                if now >= deadline:
                    say(f"shutdown grace expired with {len(calls)} call(s) still in flight; exiting")
                    writer.flush()
                    if self._requested:
                        hard_exit(EXIT_OK)
                    self._finish()  # the main thread ends the process by SIGTERM
                    return
