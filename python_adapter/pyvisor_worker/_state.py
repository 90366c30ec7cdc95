"""What the worker's parts share: the calls it holds and whether it admits new ones.

Owns :class:`Call` (a call the worker holds, which is also the ``ctx`` its function receives)
and :class:`WorkerState` (the calls by id, and the ``accepting`` flag). Plain data with no
behaviour and no threads: dispatch registers calls here, executors remove them when their reply
is written, the control thread reads them for beats and to see the drain end, and clears
``accepting`` when shutdown begins. It sits below all of them and imports none of them.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Optional

from ._context import Context
from ._registry import FunctionSpec

__all__ = ["Call", "AckedCall", "WorkerState", "QUEUED", "RUNNING"]

#: A call's phase, as the beat's ``in_progress`` reports it.
QUEUED = "queued"
RUNNING = "running"

_time = time.time


class Call(Context):
    """A call the worker holds; it is also the ``ctx`` its function receives.

    ``_phase`` and ``_started`` are set by whoever runs it; ``_handle`` is its executor's
    (a future or an asyncio task), for ``cancel``. ``_ack_start`` (a class attribute: a plain
    call pays nothing for it) says whether a ``started`` message goes out right before its
    function runs: only for an :class:`AckedCall`; it is also true for every stream call
    (``_streams.StreamCall``, whose ``_ack_stream`` says whether it asked for ``started``), so
    that the one class-attribute test of the plain path also routes streams.
    ``_stream`` (a class attribute too) says whether it is a stream call.
    """

    __slots__ = ("_spec", "_payload", "_phase", "_started", "_handle")

    _ack_start = False
    _stream = False

    def __init__(
        self,
        call_id: int,
        attempt: int,
        spec: FunctionSpec,
        payload: Any,
        deadline_ms: Optional[int],
        traceparent: Optional[str],
        tracestate: Optional[str],
    ) -> None:
        self._call_id = call_id
        self._attempt = attempt
        self._deadline_ms = deadline_ms
        self._traceparent = traceparent
        self._tracestate = tracestate
        self._cancelled = False
        self._spec = spec
        self._payload = payload
        self._phase = QUEUED
        self._started = _time()
        self._handle: Any = None


class AckedCall(Call):
    """A call that came as ``call_options`` with ``ack_start``: ``started`` is sent right
    before its function runs."""

    __slots__ = ()

    _ack_start = True


class WorkerState:
    """The calls the worker holds (by id) and whether it admits new ones.

    The order of two steps makes the drain end race-free: dispatch registers a call in
    ``calls`` *before* it looks at ``accepting``, and the control thread clears ``accepting``
    *before* it looks for an empty ``calls``; so either the call is refused or the control
    thread waits for it.
    """

    __slots__ = ("calls", "accepting")

    def __init__(self) -> None:
        self.calls: Dict[int, Call] = {}
        self.accepting = True
