"""``@expose`` and the table of exposed functions.

A generator function or an ``async def`` generator function is a **stream function**
(``FunctionSpec.stream``): it is called as a stream (``_streams``), its ``hello`` entry says
``stream: true``. A plain generator keeps its kind (inline, or ``threads`` with ``threads=N``);
an async generator is of kind ``async``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Literal, Optional, TypeVar, overload

__all__ = ["FunctionSpec", "expose", "registered", "invoke", "RESERVED_NAMES", "BUFFER_MODES"]

F = TypeVar("F", bound=Callable[..., Any])

#: Execution kinds, as named in the ``hello`` message.
INLINE = "inline"
ASYNC = "async"
THREADS = "threads"

#: How a function is invoked (decided once, at decoration time).
CALL_PAYLOAD = 0  # fn(payload)
CALL_PAYLOAD_CTX = 1  # fn(payload, ctx=ctx)
CALL_PAYLOAD_CTX_POS = 2  # fn(payload, ctx)   (ctx is positional-only)
CALL_CTX_ONLY = 3  # fn(ctx=ctx)
CALL_NOTHING = 4  # fn()

#: What ``@expose(buffers=...)`` accepts: how the out-of-band buffers of a payload arrive.
BUFFER_MODES = ("bytes", "memoryview")

#: Names the adapter provides itself.
RESERVED_NAMES = frozenset({"health", "__pyvisor_chaos_arm"})


class FunctionSpec:
    """One exposed function and how to run it."""

    __slots__ = (
        "name", "fn", "idempotent", "kind", "threads", "call_mode", "origin", "stream", "buffers"
    )

    def __init__(
        self,
        name: str,
        fn: Callable[..., Any],
        idempotent: bool,
        kind: str,
        threads: int,
        call_mode: int,
        origin: tuple[str, str, int] | None,
        stream: bool = False,
        buffers: str = "bytes",
    ) -> None:
        self.name = name
        self.fn = fn
        self.idempotent = idempotent
        self.kind = kind
        self.threads = threads
        self.call_mode = call_mode
        self.origin = origin
        #: A generator (or async generator) function: called as a stream.
        self.stream = stream
        #: How out-of-band buffers in its payload arrive: ``"bytes"`` or ``"memoryview"``.
        self.buffers = buffers

    def describe(self) -> Dict[str, Any]:
        """The entry of this function in ``hello.functions``."""
        return {
            "name": self.name,
            "idempotent": self.idempotent,
            "kind": self.kind,
            "threads": self.threads,
            "stream": self.stream,
        }

    def __repr__(self) -> str:
        stream = ", stream=True" if self.stream else ""
        return (
            f"FunctionSpec(name={self.name!r}, kind={self.kind!r}, "
            f"idempotent={self.idempotent}{stream})"
        )


def invoke(spec: FunctionSpec, call: Any) -> Any:
    """Call ``spec.fn`` the way its signature asks (``spec.call_mode``), with ``call``'s
    payload and ``call`` as its ``ctx``."""
    mode = spec.call_mode
    if mode == CALL_PAYLOAD:
        return spec.fn(call._payload)
    if mode == CALL_PAYLOAD_CTX:
        return spec.fn(call._payload, ctx=call)
    if mode == CALL_PAYLOAD_CTX_POS:
        return spec.fn(call._payload, call)
    if mode == CALL_CTX_ONLY:
        return spec.fn(ctx=call)
    return spec.fn()


_registry: Dict[str, FunctionSpec] = {}


def registered() -> Dict[str, FunctionSpec]:
    """The exposed user functions, by name (a copy)."""
    return dict(_registry)


def _call_mode(fn: Callable[..., Any]) -> int:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # some builtins and C callables have no signature
        return CALL_PAYLOAD
    ctx = params.get("ctx")
    positional = [
        p
        for p in params.values()
        if p.name != "ctx"
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    if ctx is None:
        return CALL_PAYLOAD if positional else CALL_NOTHING
    if ctx.kind is ctx.VAR_KEYWORD or ctx.kind is ctx.VAR_POSITIONAL:  # `*ctx` / `**ctx`: not ours
        return CALL_PAYLOAD if positional else CALL_NOTHING
    if not positional:
        return CALL_CTX_ONLY if ctx.kind is not ctx.POSITIONAL_ONLY else CALL_NOTHING
    return CALL_PAYLOAD_CTX_POS if ctx.kind is ctx.POSITIONAL_ONLY else CALL_PAYLOAD_CTX


def _origin(fn: Callable[..., Any]) -> tuple[str, str, int] | None:
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    return (getattr(fn, "__qualname__", ""), code.co_filename, code.co_firstlineno)


def _check_buffers(buffers: Any) -> str:
    if not isinstance(buffers, str) or buffers not in BUFFER_MODES:
        raise TypeError(
            f'@expose(buffers=...) must be "bytes" (the default: a copy) or "memoryview" '
            f"(a read-only view of the shared memory, no copy), not {buffers!r}"
        )
    return buffers


def _register(
    fn: Callable[..., Any],
    name: Optional[str],
    idempotent: bool,
    threads: Optional[int],
    buffers: str = "bytes",
) -> None:
    if not callable(fn):
        raise TypeError(f"@expose needs a function, got {fn!r}")
    fname = getattr(fn, "__name__", None) if name is None else name
    if fname is None:
        raise ValueError(f"{fn!r} has no __name__: expose it with name=...")
    if not isinstance(fname, str) or not fname:
        raise ValueError(f"invalid exposed name {fname!r}")
    if fname in RESERVED_NAMES:
        raise ValueError(f"the name {fname!r} is reserved by pyvisor_worker")
    # (iscoroutinefunction is False for an async generator function: it is async too.)
    is_async_gen = inspect.isasyncgenfunction(fn)
    is_async = is_async_gen or inspect.iscoroutinefunction(fn)
    stream = is_async_gen or inspect.isgeneratorfunction(fn)
    if threads is not None:
        if is_async:
            raise ValueError(f"{fname!r}: threads= cannot be used with an async def function")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"{fname!r}: threads must be a positive int, got {threads!r}")
    kind = ASYNC if is_async else (THREADS if threads is not None else INLINE)
    spec = FunctionSpec(
        name=fname,
        fn=fn,
        idempotent=bool(idempotent),
        kind=kind,
        threads=threads if threads is not None else 0,
        call_mode=_call_mode(fn),
        origin=_origin(fn),
        stream=stream,
        buffers=buffers,
    )
    previous = _registry.get(fname)
    if previous is not None:
        # The same definition executed twice (a script imported once as __main__ and once
        # under its module name) replaces itself; anything else is a real clash.
        if previous.origin is None or previous.origin != spec.origin:
            raise ValueError(f"a function named {fname!r} is already exposed ({previous.fn!r})")
    _registry[fname] = spec


@overload
def expose(fn: F) -> F: ...


@overload
def expose(
    *,
    name: Optional[str] = None,
    idempotent: bool = False,
    threads: Optional[int] = None,
    buffers: Literal["bytes", "memoryview"] = "bytes",
) -> Callable[[F], F]: ...


def expose(
    fn: Optional[F] = None,
    *,
    name: Optional[str] = None,
    idempotent: bool = False,
    threads: Optional[int] = None,
    buffers: Literal["bytes", "memoryview"] = "bytes",
) -> Any:
    """Expose a function to the pyvisor parent.

    Usable bare (``@expose``) or with keywords (``@expose(name=..., idempotent=True,
    threads=4)``). The function is returned unchanged.

    - ``name``: the name callers use (default: the function's ``__name__``).
    - ``idempotent``: the parent may retry the call on another worker after a crash.
    - ``threads``: run a plain function on its own pool of that many threads instead of
      inline (not allowed for ``async def`` functions, which run on the worker's event loop).
    - ``buffers``: how byte strings the parent sent **out of band** (large ``bytes`` passed in
      sealed shared memory, capability ``oob``) arrive in the payload: ``"bytes"`` (the
      default: copied out of the shared memory) or ``"memoryview"`` (a read-only
      ``memoryview`` over the shared memory itself, no copy; wrap it without copying with
      :func:`pyvisor_worker.as_numpy`; the memory is released once the view and everything
      made from it are gone). Anything else raises ``TypeError``. Small byte strings, and all
      of them when out-of-band buffers are off, arrive as ``bytes`` in either mode.

    The function receives the call's payload as its one positional argument, and a
    :class:`~pyvisor_worker.Context` as ``ctx`` if it declares a ``ctx`` parameter.

    A generator function (``def`` with ``yield``) or an async generator function (``async
    def`` with ``yield``) is exposed as a **stream**: the parent calls it as a stream and
    receives the values it yields one by one, under flow control (the generator is not
    resumed while the parent holds as many items as it allowed). A cancelled stream's
    generator is closed (``GeneratorExit`` at its ``yield``: its ``finally`` blocks run).
    """
    mode = _check_buffers(buffers)  # at decoration time
    if fn is not None:
        _register(fn, name, idempotent, threads, mode)
        return fn

    def decorate(f: F) -> F:
        _register(f, name, idempotent, threads, mode)
        return f

    return decorate
