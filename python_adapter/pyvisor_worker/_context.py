"""The per-call context handed to exposed functions that declare a ``ctx`` parameter."""

from __future__ import annotations

import time
from typing import Optional

__all__ = ["Context"]


class Context:
    """What a call knows about itself.

    A function receives one when it declares a parameter named ``ctx``::

        @expose
        def predict(features: dict, ctx: Context) -> dict:
            if ctx.cancelled:
                ...

    All attributes are read-only. ``cancelled`` becomes ``True`` as soon as the parent sends a
    ``cancel`` for this call, also while the function is running; a long function can poll it
    and stop early (its reply is then ignored by the parent).

    ``Context(...)`` can be built directly to call an exposed function in a unit test.
    """

    __slots__ = ("_call_id", "_attempt", "_deadline_ms", "_traceparent", "_tracestate", "_cancelled")

    def __init__(
        self,
        call_id: int = 0,
        attempt: int = 1,
        deadline: Optional[float] = None,
        traceparent: Optional[str] = None,
        tracestate: Optional[str] = None,
    ) -> None:
        self._call_id = call_id
        self._attempt = attempt
        self._deadline_ms = None if deadline is None else int(deadline * 1000.0)
        self._traceparent = traceparent
        self._tracestate = tracestate
        self._cancelled = False

    @property
    def call_id(self) -> int:
        """The parent's id of this call (unique for the worker's lifetime)."""
        return self._call_id

    @property
    def attempt(self) -> int:
        """1 for the first attempt, higher when the parent retries an idempotent call."""
        return self._attempt

    @property
    def deadline(self) -> Optional[float]:
        """Absolute deadline in seconds since the Unix epoch, or ``None``."""
        ms = self._deadline_ms
        return None if ms is None else ms / 1000.0

    @property
    def cancelled(self) -> bool:
        """``True`` once the parent cancelled this call."""
        return self._cancelled

    @property
    def traceparent(self) -> Optional[str]:
        """W3C ``traceparent`` of the parent's attempt span, or ``None``."""
        return self._traceparent

    @property
    def tracestate(self) -> Optional[str]:
        """W3C ``tracestate``, or ``None``."""
        return self._tracestate

    def remaining(self) -> Optional[float]:
        """Seconds left until the deadline (never negative), or ``None`` without a deadline."""
        ms = self._deadline_ms
        if ms is None:
            return None
        return max(0.0, ms / 1000.0 - time.time())

    def __repr__(self) -> str:
        return (
            f"Context(call_id={self._call_id}, attempt={self._attempt}, "
            f"deadline={self.deadline!r}, cancelled={self._cancelled})"
        )
