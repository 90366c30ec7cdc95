"""Reading: the serving threads that share the socket's read side.

Owns the socket's read side and the read buffer, and the two **serving threads** (lazy
leader/follower through ``_read_lock``). The holder reads bytes and has ``_dispatch`` act on
the frames in them; a plain (inline) call is run by the thread that read it: once there are
plain calls to execute, it releases ``_read_lock`` and drains the inline executor's queue in
arrival order, then tries to read again. The other thread is a *sentinel* that never blocks on
``_read_lock``: it polls every ``TICK`` and takes the socket over only when plain calls have
been executing for longer than ``TICK``; while no plain call executes it sleeps on an event
the reading thread sets when a run of plain calls begins, so an idle worker does not wake
every ``TICK``. A fast call therefore costs no thread switch, and
while a slow one runs, ``cancel``, ``ping`` and async/threaded calls are still seen within a few
milliseconds. A thread that finished draining and finds ``_read_lock`` taken becomes the
sentinel. An inline stream (a plain generator) is such a call: while it waits for credit its
serving thread stays in the drain, and the sentinel reads the ``credit`` or ``cancel`` that
ends the wait.

The socket is always read with plain ``recv_into``: with capability ``oob`` the parent's fds
come on a side channel (``_oob.Inbound``, read by ``_dispatch`` when an ``fds`` message is
dispatched), so the only difference is that frames are decoded with
``_oob.unpack_unannounced`` (which refuses a buffer reference no ``fds`` message announced).

Does not interpret frames (``_dispatch``), run functions (``_executors``) or build replies; it
writes the immediate replies that dispatch hands back. EOF on the socket ends the process
(status 0).
"""

from __future__ import annotations

import functools
import socket
import threading
import time
from typing import Callable, List, Optional

from ._dispatch import Dispatcher
from ._exits import parent_gone
from ._executors import TICK, InlineExecutor
from ._framing import new_packer
from ._oob import Inbound, unpack_unannounced
from ._replies import Pack, Writer

__all__ = ["Reader", "INITIAL_BUFFER"]

#: Read buffer; grows for a larger frame and shrinks back once that frame is consumed.
INITIAL_BUFFER = 256 * 1024

_monotonic = time.monotonic


class Reader:
    def __init__(
        self,
        sock: socket.socket,
        dispatcher: Dispatcher,
        inline: InlineExecutor,
        writer: Writer,
        inbound: Optional[Inbound] = None,
    ) -> None:
        self._recv_into: Callable[[memoryview], int] = sock.recv_into
        if inbound is None:
            self._dispatch = dispatcher.dispatch_frames
        else:  # capability ``oob``: buffer references are checked
            self._dispatch = functools.partial(  # (C-level: no Python frame per read)
                dispatcher.dispatch_frames, unpack_body=unpack_unannounced
            )
        self._inline = inline
        self._write = writer.write
        self._try_flush = writer.try_flush
        self._read_lock = threading.Lock()
        self._buf = bytearray(INITIAL_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        #: Set when a run of plain calls begins while the sentinel sleeps (``_idle``).
        self._wake = threading.Event()
        self._idle = False

    def serve(self) -> None:
        """A serving thread's body: read (or watch), then execute the plain calls read."""
        pack = new_packer()
        acquire = self._read_lock.acquire
        release = self._read_lock.release
        watch = self._watch
        read = self._read
        drain = self._inline.drain
        while True:
            if not acquire(False):
                watch()  # returns holding _read_lock
            read(pack)  # returns holding _read_lock, with plain calls to execute
            release()
            drain(pack)

    def _watch(self) -> None:
        """Sentinel: take the socket over once plain calls have run longer than TICK."""
        sleep = time.sleep
        inline = self._inline
        acquire = self._read_lock.acquire
        wake = self._wake
        while True:
            if not inline.executing:
                # Nothing to watch: sleep until a run of plain calls begins. The flag is up
                # before `executing` is looked at again, so a run that begins meanwhile either
                # is seen here or sets the event.
                wake.clear()
                self._idle = True
                if not inline.executing:
                    wake.wait()
                self._idle = False
            sleep(TICK)
            if inline.executing and _monotonic() - inline.session_start >= TICK:
                self._try_flush()  # replies of calls that finished before the slow one
                if acquire(False):
                    return

    def _read(self, pack: Pack) -> None:
        """Read and dispatch until there are plain calls for this thread to execute."""
        recv_into = self._recv_into
        dispatch = self._dispatch
        inline = self._inline
        queue = inline.queue
        while True:
            view = self._view
            end = self._end
            try:
                n = recv_into(view[end:])
            except OSError:
                n = 0
            if n == 0:  # EOF: the parent closed the socket or is gone
                parent_gone()
            end += n
            out: List[bytes] = []
            buf = self._buf
            start, need = dispatch(buf, view, self._start, end, out, pack)

            # Buffer upkeep: keep room for the frame being received.
            if start == end:
                self._start = self._end = 0
                if len(buf) > INITIAL_BUFFER:
                    self._buf = bytearray(INITIAL_BUFFER)
                    self._view = memoryview(self._buf)
            else:
                size = len(buf)
                if need > size:
                    grown = bytearray(need)
                    grown[: end - start] = view[start:end]
                    self._buf = grown
                    self._view = memoryview(grown)
                    self._start, self._end = 0, end - start
                elif size - start < need or size - end < 4096:
                    buf[: end - start] = view[start:end]
                    self._start, self._end = 0, end - start
                else:
                    self._start = start
                    self._end = end

            if out:
                self._write(out[0] if len(out) == 1 else b"".join(out))
            if queue:
                with inline.lock:
                    if not inline.executing:
                        inline.executing = True
                        inline.session_start = _monotonic()
                        if self._idle:
                            self._wake.set()
                        return
