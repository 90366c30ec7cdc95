"""The decorator and Context, in-process (no worker started)."""

from __future__ import annotations

import time
from typing import AsyncIterator, Iterator

import pytest

import pyvisor_worker
from pyvisor_worker import Context, expose
from pyvisor_worker._registry import (
    CALL_CTX_ONLY,
    CALL_NOTHING,
    CALL_PAYLOAD,
    CALL_PAYLOAD_CTX,
    CALL_PAYLOAD_CTX_POS,
    registered,
)


def test_public_names() -> None:
    assert pyvisor_worker.PROTOCOL_VERSION == 2
    assert pyvisor_worker.__version__ == "0.1.0"
    assert set(pyvisor_worker.__all__) == {
        "expose",
        "run_worker",
        "Context",
        "tracer",
        "chaos",
        "__version__",
        "PROTOCOL_VERSION",
        "as_numpy",
    }


def test_expose_bare_returns_the_function_unchanged() -> None:
    def api_bare(x: int) -> int:
        return x + 1

    assert expose(api_bare) is api_bare
    assert api_bare(1) == 2
    spec = registered()["api_bare"]
    assert spec.kind == "inline" and spec.idempotent is False and spec.threads == 0


def test_generator_functions_are_streams() -> None:
    @expose(name="api_gen")
    def gen(n: int) -> Iterator[int]:
        yield from range(n)

    @expose(name="api_gen_threads", threads=2)
    def gen_threads(n: int) -> Iterator[int]:
        yield from range(n)

    @expose(name="api_agen")
    async def agen(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    @expose(name="api_coroutine")
    async def coroutine(n: int) -> int:
        return n

    specs = registered()
    assert [specs["api_gen"].kind, specs["api_gen"].stream] == ["inline", True]
    assert specs["api_gen_threads"].describe() == {
        "name": "api_gen_threads",
        "idempotent": False,
        "kind": "threads",
        "threads": 2,
        "stream": True,
    }
    # inspect.iscoroutinefunction is False for an async generator function: async all the same
    assert [specs["api_agen"].kind, specs["api_agen"].stream] == ["async", True]
    assert [specs["api_coroutine"].kind, specs["api_coroutine"].stream] == ["async", False]
    assert list(gen(2)) == [0, 1]  # returned unchanged


def test_an_async_generator_cannot_take_threads() -> None:
    with pytest.raises(ValueError, match="threads= cannot be used"):

        @expose(name="api_agen_threads", threads=2)
        async def agen() -> AsyncIterator[int]:
            yield 1


def test_expose_with_arguments() -> None:
    @expose(name="api_named", idempotent=True, threads=3)
    def whatever(x: int) -> int:
        return x

    assert whatever(5) == 5
    spec = registered()["api_named"]
    assert spec.describe() == {
        "name": "api_named",
        "idempotent": True,
        "kind": "threads",
        "threads": 3,
        "stream": False,
    }


def test_async_function_kind() -> None:
    @expose
    async def api_async(x: int) -> int:
        return x

    assert registered()["api_async"].kind == "async"


def test_duplicate_name_is_rejected() -> None:
    @expose(name="api_dup")
    def first(x: int) -> int:
        return x

    with pytest.raises(ValueError, match="already exposed"):

        @expose(name="api_dup")
        def second(x: int) -> int:
            return x


def test_same_definition_twice_is_not_a_duplicate() -> None:
    def api_again(x: int) -> int:
        return x

    expose(api_again)
    expose(api_again)  # e.g. a script imported both as __main__ and as a module


@pytest.mark.parametrize("threads", [0, -1, 1.5, True])
def test_bad_threads(threads: object) -> None:
    with pytest.raises(ValueError):
        expose(threads=threads)(lambda x: x)  # type: ignore[call-overload]


def test_threads_on_async_function_is_rejected() -> None:
    async def api_async_threads(x: int) -> int:
        return x

    with pytest.raises(ValueError, match="async"):
        expose(threads=2)(api_async_threads)


def test_reserved_name() -> None:
    with pytest.raises(ValueError, match="reserved"):
        expose(name="health")(lambda x: x)


def test_not_a_function() -> None:
    with pytest.raises(TypeError):
        expose("name")  # type: ignore[call-overload]


def test_call_modes() -> None:
    def a(x): ...  # noqa: E704
    def b(x, ctx): ...  # noqa: E704
    def c(x, *, ctx): ...  # noqa: E704
    def d(x, ctx, /): ...  # noqa: E704
    def e(ctx): ...  # noqa: E704
    def f(): ...  # noqa: E704
    def g(*args): ...  # noqa: E704
    def h(x, **ctx): ...  # noqa: E704

    from pyvisor_worker._registry import _call_mode

    assert _call_mode(a) == CALL_PAYLOAD
    assert _call_mode(b) == CALL_PAYLOAD_CTX
    assert _call_mode(c) == CALL_PAYLOAD_CTX
    assert _call_mode(d) == CALL_PAYLOAD_CTX_POS
    assert _call_mode(e) == CALL_CTX_ONLY
    assert _call_mode(f) == CALL_NOTHING
    assert _call_mode(g) == CALL_PAYLOAD
    assert _call_mode(h) == CALL_PAYLOAD


def test_context() -> None:
    ctx = Context(call_id=7, attempt=2, deadline=time.time() + 5, traceparent="tp", tracestate="ts")
    assert ctx.call_id == 7 and ctx.attempt == 2
    assert ctx.traceparent == "tp" and ctx.tracestate == "ts"
    assert ctx.cancelled is False
    remaining = ctx.remaining()
    assert remaining is not None and 4 < remaining <= 5
    with pytest.raises(AttributeError):
        ctx.cancelled = True  # type: ignore[misc]
    assert Context().deadline is None and Context().remaining() is None
    assert Context(deadline=time.time() - 10).remaining() == 0.0
    assert "call_id=7" in repr(ctx)
