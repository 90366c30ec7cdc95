"""The worker: puts the parts together, says ``hello`` and serves until the end.

Owns :func:`run_worker` (process set-up: output buffering, faulthandler, tracing) and
:class:`Worker`, which builds the parts, starts the executors and threads, sends ``hello`` and
waits for the control thread to say the worker is done. It reads no frame and runs no call
itself: past ``hello``, everything happens on the parts' threads. The parts, from the bottom
up (each module imports only modules listed before it):

- ``_state``: the calls the worker holds and whether it admits new ones;
- ``_exits``: how the process ends (``os._exit`` paths, death by SIGTERM);
- ``_oob``: out-of-band buffers in the protocol (capability ``oob``: the fds received on the
  side channel, ``PYVISOR_FDS_FD``, and the ``fds`` messages that claim them; large
  bytes-like results sent in sealed memfds), on the primitives of ``_buffers``;
- ``_replies``: reply frames and the locked, batching writer;
- ``_streams``: generator functions run as streams (credit, items, the stream flusher);
- ``_executors``: inline, asyncio and thread-pool execution, and the one kind → executor map;
- ``_control``: beats, graceful shutdown, SIGTERM (the control thread);
- ``_dispatch``: frames → messages → calls routed to their executor;
- ``_reader``: the two serving threads sharing the socket's read side (leader/follower and
  the sentinel), which also execute the inline calls they read.

Threads (all but the main thread are daemons): two serving threads, the control thread, an
asyncio loop thread (only when an ``async def`` function is exposed), one pool per function
exposed with ``threads=N``, the stream flusher (started with the first stream); the main
thread installs the SIGTERM handler, waits, and after an outside SIGTERM ends the process by
that signal.
"""

from __future__ import annotations

import os
import platform
import signal
import socket
import sys
import threading
from typing import Dict, List, Optional

from . import _otel
from ._config import PROTOCOL_VERSION, StartError, WorkerConfig, current_config, exit_bad_start
from ._control import SIGNALLED, Control
from ._dispatch import Dispatcher, Route
from ._executors import Executor, Runner, make_executors
from ._exits import end_by_sigterm, flush_stdio, guarded, protocol_error, say
from ._framing import CAP_OOB, CAPABILITIES, MSG_HELLO, frame, new_packer
from ._oob import Inbound, Outbound, oob_supported
from ._reader import Reader
from ._registry import CALL_NOTHING, CALL_PAYLOAD, INLINE, FunctionSpec, registered
from ._replies import Writer
from ._state import WorkerState
from ._version import __version__

__all__ = ["run_worker", "started", "Worker"]


class Worker:
    def __init__(
        self,
        config: WorkerConfig,
        functions: Dict[str, FunctionSpec],
        tracing: Optional[_otel.Tracing] = None,
    ) -> None:
        sock = socket.socket(fileno=config.fd)
        sock.setblocking(True)
        os.set_inheritable(sock.fileno(), False)  # user subprocesses must not hold it open
        self._sock = sock
        self._max_frame = max_frame = config.max_frame

        self._state = state = WorkerState()
        self._writer = writer = Writer(sock.sendall, sock)
        # The side channel of the parent's fds (PYVISOR_FDS_FD), if it passed a datagram socket.
        self._side = side = _side_channel(config.fds_fd)
        # Out-of-band buffers (capability ``oob``): wanted (PYVISOR_OOB), possible here, and a
        # side channel to receive the parent's fds on.
        self._oob = config.oob and side is not None and oob_supported()
        outbound: Optional[Outbound] = None
        self._inbound: Optional[Inbound] = None
        if self._oob:
            assert side is not None
            outbound = Outbound(writer, config.oob_threshold, config.max_buffer, max_frame)
            self._inbound = Inbound(side, config.max_buffer, config.fds_timeout_ms / 1000.0)
        self._control = control = Control(
            writer, state, max_frame, config.beat_interval_ms / 1000.0
        )

        from .chaos import _arm_from_parent

        self._functions: Dict[str, FunctionSpec] = dict(functions)
        self._functions["health"] = FunctionSpec(
            "health", control.health, True, INLINE, 0, CALL_NOTHING, None
        )
        self._functions["__pyvisor_chaos_arm"] = FunctionSpec(
            "__pyvisor_chaos_arm", _arm_from_parent, False, INLINE, 0, CALL_PAYLOAD, None
        )
        # What hello and the unknown-function hint show: the internal ``__pyvisor_*`` hooks stay
        # callable (the parent's chaos API uses them) but are not the user's functions.
        self._names: List[str] = sorted(n for n in self._functions if not n.startswith("__pyvisor"))

        runner = Runner(max_frame, tracing, writer, outbound)
        self._inline, self._executors = make_executors(
            self._functions, runner, writer, state, max_frame
        )

    def serve(self) -> str:
        """Serve until the end; returns how the worker ends (``_control.REQUESTED`` or
        ``SIGNALLED``)."""
        executors: List[Executor] = []
        for executor in self._executors.values():
            if executor not in executors:
                executors.append(executor)
        for executor in executors:
            executor.start()
        # Built after the executors started: a route keeps its executor's current ``submit``.
        routes: Dict[str, Route] = {
            name: (self._functions[name], executor.submit, executor)
            for name, executor in self._executors.items()
        }
        dispatcher = Dispatcher(
            routes, self._names, self._state, self._control, self._max_frame, self._inbound
        )
        reader = Reader(self._sock, dispatcher, self._inline, self._writer, self._inbound)

        control = self._control
        control.install_signals()

        hello = {
            "protocol": PROTOCOL_VERSION,
            "pid": os.getpid(),
            "adapter": __version__,
            "python": platform.python_version(),
            "functions": [self._functions[name].describe() for name in self._names],
            "capabilities": list(CAPABILITIES) + ([CAP_OOB] if self._oob else []),
        }
        body = new_packer()([MSG_HELLO, hello])
        if len(body) > self._max_frame:
            protocol_error(
                f"the hello message ({len(body)} bytes) does not fit the maximum frame size "
                f"of {self._max_frame} bytes"
            )
        self._writer.write(frame(body))

        for target, name in (
            (control.run, "pyvisor-control"),
            (reader.serve, "pyvisor-serve-1"),
            (reader.serve, "pyvisor-serve-2"),
        ):
            threading.Thread(target=guarded(target), name=name, daemon=True).start()

        outcome = control.wait()

        control.restore_signals()
        for executor in executors:
            executor.stop()
        flush_stdio()
        return outcome


def _side_channel(fd: Optional[int]) -> Optional[socket.socket]:
    """The socket of ``PYVISOR_FDS_FD`` (made close-on-exec), or ``None`` when there is none
    or it is not a datagram socket (then the worker does not announce ``oob``)."""
    if fd is None:
        return None
    try:
        side = socket.socket(fileno=fd)
    except OSError:  # not open, not a socket
        return None
    if side.family != socket.AF_UNIX or side.type != socket.SOCK_DGRAM:
        side.detach()  # not ours to close
        return None
    os.set_inheritable(fd, False)  # user subprocesses must not hold it open
    side.setblocking(True)
    return side


_started = False


def started() -> bool:
    """Whether ``run_worker()`` has been called in this process."""
    return _started


def run_worker() -> None:
    """Serve the exposed functions to the pyvisor parent until shutdown.

    Sends ``hello`` (after the module-level code that defined the functions has run), then
    serves calls until

    - a ``shutdown`` message: returns once the calls in flight have finished (the process
      exits 0 if they outlast the message's grace);
    - SIGTERM without a ``shutdown`` message (someone else's kill): does **not** return; once
      the calls in flight have finished, or after a 5 s grace, the process dies by SIGTERM
      (so the parent sees a kill, not an exit of the worker's own);
    - the parent closing the socket: the process exits 0 at once.

    Calls that arrive once shutdown began are answered with an error of kind ``refused``
    (type ``WorkerShuttingDown``): they did not run, and the parent may send them elsewhere.

    Outside a pyvisor start (no ``PYVISOR_FD``) it explains so on stderr and exits with
    status 2.
    """
    global _started
    try:
        config = current_config()
    except StartError as e:
        exit_bad_start(e)
    if _started:
        raise RuntimeError("run_worker() was already called in this process")
    _started = True
    if config.protocol is not None and config.protocol != PROTOCOL_VERSION:
        say(
            f"the parent speaks protocol {config.protocol}, this adapter speaks "
            f"{PROTOCOL_VERSION}"
        )
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(line_buffering=True)  # the parent forwards output line by line
            except (ValueError, OSError):
                pass
    try:
        import faulthandler

        if not faulthandler.is_enabled():
            faulthandler.enable()
        if hasattr(signal, "SIGUSR1"):
            # The parent can ask a hung worker for its Python stacks (written to stderr).
            faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)
    except (ImportError, RuntimeError, ValueError, OSError, AttributeError):
        pass
    # Tracing (the `otel` extra) is set up before hello, only if asked for and installed.
    tracing = _otel.activate(config.worker_id, config.run_id)
    try:
        outcome = Worker(config, registered(), tracing).serve()
    finally:
        if tracing is not None:
            tracing.shutdown()  # the last spans, bounded: a dead collector can't hold the exit
    if outcome == SIGNALLED:
        end_by_sigterm()
