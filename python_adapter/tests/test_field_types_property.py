"""Property: a call frame with fields of random types either runs with well-typed fields or
is a protocol error (exit 3, no traceback); nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import RespawningWorker  # noqa: E402
from pyvisor_worker.testing import WorkerExited  # noqa: E402

WORKER = """
from pyvisor_worker import Context, expose, run_worker


@expose
def probe(x, ctx: Context):
    return [ctx.call_id, ctx.attempt, ctx._deadline_ms, ctx.traceparent, ctx.tracestate]


if __name__ == "__main__":
    run_worker()
"""

UINT64 = 2**64 - 1
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), UINT64),
    st.floats(allow_nan=False),
    _text,
    st.binary(max_size=8),
)
#: Any MessagePack value.
_any = st.recursive(
    _scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=6,
)

_FRESH = object()  # "a fresh, well-typed id"

#: Well-typed values per field (``_FRESH``: the test assigns an id the worker does not hold).
_WELL_TYPED = {
    "id": st.just(_FRESH),
    "attempt": st.one_of(st.sampled_from([1, 2**32 - 1]), st.integers(1, 2**32 - 1)),
    "function": st.sampled_from(["probe", "no_such_function"]),
    "deadline_ms": st.one_of(st.none(), st.integers(0, UINT64)),
    "traceparent": st.one_of(st.none(), _text),
    "tracestate": st.one_of(st.none(), _text),
}
#: Values of any type, and the near misses (attempt 0 and 2**32, negative ids and deadlines).
_ANY_TYPE = {
    "id": st.one_of(st.integers(-(2**63), -1), _any),
    "attempt": st.one_of(st.sampled_from([0, -1, 2**32, UINT64]), _any),
    "function": _any,
    "deadline_ms": st.one_of(st.integers(-(2**63), -1), _any),
    "traceparent": _any,
    "tracestate": _any,
}


@st.composite
def call_fields(draw: Any) -> Dict[str, Any]:
    """A call's fields: most well-typed, those in a random set of any type (which may still
    happen to be well-typed: the test judges the values, not how they were drawn)."""
    mistyped = draw(st.sets(st.sampled_from(sorted(_WELL_TYPED)), max_size=3))
    fields = {
        name: draw(_ANY_TYPE[name] if name in mistyped else _WELL_TYPED[name])
        for name in sorted(_WELL_TYPED)
    }
    fields["payload"] = draw(_any)
    return fields


def _uint(x: Any, bits: int) -> bool:
    return type(x) is int and 0 <= x < 2**bits


def _str_or_nil(x: Any) -> bool:
    return x is None or type(x) is str


def _well_typed(f: Dict[str, Any]) -> bool:
    return (
        _uint(f["id"], 64)
        and _uint(f["attempt"], 32)
        and f["attempt"] >= 1
        and type(f["function"]) is str
        and (f["deadline_ms"] is None or _uint(f["deadline_ms"], 64))
        and _str_or_nil(f["traceparent"])
        and _str_or_nil(f["tracestate"])
    )


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[RespawningWorker]:
    script = tmp_path / "probe_worker.py"
    script.write_text(WORKER)
    w = RespawningWorker(script)
    yield w
    w.close()


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(fields=call_fields())
def test_random_call_frames_run_or_are_protocol_errors(
    workers: RespawningWorker, fields: Dict[str, Any]
) -> None:
    fields = dict(fields)
    parent = workers.get()
    if fields["id"] is _FRESH or _uint(fields["id"], 64):
        fields["id"] = next(workers.ids)  # never an id the worker holds
    msg: List[Any] = [1, fields["id"], fields["attempt"], fields["function"],
                      fields["deadline_ms"], fields["traceparent"], fields["tracestate"],
                      fields["payload"]]
    parent.send(msg)
    if _well_typed(fields):
        event("well-typed: runs")
        reply = parent.reply_for(fields["id"], timeout=10)
        assert reply.attempt == fields["attempt"]
        if fields["function"] == "probe":
            assert reply.ok, reply.error
            assert reply.value == msg[1:3] + msg[4:7]
        else:
            assert not reply.ok and reply.error["kind"] == "unknown_function"
    else:
        event("mistyped: protocol error")
        with pytest.raises(WorkerExited):
            parent.recv(timeout=10)
        status = parent.wait()
        stderr = parent.stderr_text()
        workers.parent = None
        parent.close(timeout=10)
        assert status == 3, stderr
        assert "protocol error" in stderr
        assert "Traceback" not in stderr, stderr
