"""Tracing: continue the parent's trace inside the worker (the ``otel`` extra).

The parent sends, in every ``call``, the W3C ``traceparent``/``tracestate`` of its attempt span.
The function's own span is **recorded by the parent**, not here: for a call with a
``traceparent`` the worker (``_executors.Runner``) draws a random span id, times the function
(``time.time_ns()`` just before and after it) and returns ``[span_id, start_ns, end_ns]`` in
the reply; the parent turns that into the function's span, a child of its attempt span. That
part needs nothing from OpenTelemetry and happens whether or not tracing is active here.

When tracing is active in the worker, this module adds two things:

- while a traced call's function runs, :meth:`Tracing.enter` makes current (on its thread, or
  in its asyncio task) a *non-recording* span standing for the function's span, whose context
  (trace id and flags from the ``traceparent``, the span id the reply reports) is built only
  when first asked for, so spans that user code starts (through :func:`tracer`, its own
  OpenTelemetry tracer, or instrumented libraries) are children of the function's span, and a
  function that starts none pays only for the attach;
- the worker's own tracer provider and OTLP exporter, which export those user spans (and
  nothing else), flushed on every exit path. The provider is installed as OpenTelemetry's
  *global* tracer provider (:func:`_install_globally`), so spans made through
  ``opentelemetry.trace.get_tracer(...)`` -- what instrumented libraries use -- are exported
  too; unless a global provider was set before ``run_worker()`` (by the user's module-level
  code, ``OTEL_PYTHON_TRACER_PROVIDER`` or ``opentelemetry-instrument``): that one is kept,
  and the spans it records still nest under the function's span (the current span is a
  context entry, whatever provider records the child), exported wherever it exports them.

Tracing is activated once, by ``run_worker()`` before ``hello``, and only when

- an OTLP endpoint is configured (``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or
  ``OTEL_EXPORTER_OTLP_ENDPOINT``, non-empty),
- ``OTEL_SDK_DISABLED`` is not ``true`` and ``OTEL_TRACES_EXPORTER`` is not ``none``,
- and the ``opentelemetry`` packages can be imported.

Otherwise this module imports nothing from ``opentelemetry``. The module itself must stay
cheap to import: everything from ``opentelemetry`` is imported inside :func:`activate`.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import os
import re
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, Tuple

from ._version import __version__

if TYPE_CHECKING:
    from ._context import Context

__all__ = [
    "tracer",
    "activate",
    "active",
    "tracing_requested",
    "span_protocol",
    "service_name",
    "Tracing",
    "parse_traceparent",
    "FLUSH_TIMEOUT",
]

#: How long the exit paths wait for the last spans to be exported, in seconds.
FLUSH_TIMEOUT = 2.0
DEFAULT_SERVICE_NAME = "pyvisor-worker"
INSTRUMENTATION_NAME = "pyvisor_worker"

GRPC = "grpc"
HTTP_PROTOBUF = "http/protobuf"


def _say(message: str) -> None:
    try:
        sys.stderr.write(f"pyvisor_worker: {message}\n")
        sys.stderr.flush()
    except Exception:
        pass


def _env(env: Mapping[str, str], key: str) -> str:
    return (env.get(key) or "").strip()


# ---------------------------------------------------------------------- configuration


def tracing_requested(env: Mapping[str, str]) -> bool:
    """Whether the environment asks for span export (before looking at what is installed)."""
    if _env(env, "OTEL_SDK_DISABLED").lower() == "true":
        return False
    if _env(env, "OTEL_TRACES_EXPORTER").lower() == "none":
        return False
    return bool(
        _env(env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or _env(env, "OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def span_protocol(env: Mapping[str, str]) -> str:
    """``grpc`` (the default) or ``http/protobuf``, from the ``OTEL_EXPORTER_OTLP_*PROTOCOL``
    variables (the traces-specific one wins)."""
    raw = _env(env, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or _env(
        env, "OTEL_EXPORTER_OTLP_PROTOCOL"
    )
    value = raw.lower()
    if value in ("", GRPC):
        return GRPC
    if value == HTTP_PROTOBUF:
        return HTTP_PROTOBUF
    if value.startswith("http"):
        # http/json has no Python exporter; a collector's HTTP port accepts protobuf too.
        _say(f"OTLP protocol {raw!r} is not supported by the Python exporters; using http/protobuf")
        return HTTP_PROTOBUF
    _say(f"unknown OTLP protocol {raw!r}; using grpc")
    return GRPC


def service_name(env: Mapping[str, str], detected: Optional[str] = None) -> str:
    """``OTEL_SERVICE_NAME``, else a ``service.name`` from ``OTEL_RESOURCE_ATTRIBUTES``
    (``detected``), else ``pyvisor-worker``; with ``-worker`` appended when it equals the
    parent's own service name (``PYVISOR_PARENT_SERVICE_NAME``)."""
    name = _env(env, "OTEL_SERVICE_NAME")
    if not name and detected and not detected.startswith("unknown_service"):
        name = detected
    if not name:
        name = DEFAULT_SERVICE_NAME
    parent = _env(env, "PYVISOR_PARENT_SERVICE_NAME")
    if parent and name == parent:
        name = f"{name}-worker"
    return name


# ---------------------------------------------------------------------- the active state


#: A W3C traceparent of version 00, the one the parent sends (checked first: it is cheaper).
_TRACEPARENT_00 = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}").fullmatch
#: Any version (as OpenTelemetry's propagator accepts it): a later version may append fields.
_TRACEPARENT = re.compile(
    r"[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?[ \t]*"
).fullmatch
_ZERO_SPAN_ID = "0" * 16


def parse_traceparent(traceparent: Any) -> Optional[Tuple[int, str]]:
    """``(trace_id, flags)`` of a valid W3C ``traceparent`` (flags as its two hex digits),
    else ``None``."""
    if type(traceparent) is not str:
        return None
    if _TRACEPARENT_00(traceparent) is not None:
        hex_trace_id = traceparent[3:35]
        parent_id = traceparent[36:52]
        flags = traceparent[53:]
    else:
        m = _TRACEPARENT(traceparent)
        if m is None:
            return None
        version, hex_trace_id, parent_id, flags, rest = m.groups()
        if version == "ff" or (version == "00" and rest):
            return None
    trace_id = int(hex_trace_id, 16)
    if trace_id == 0 or parent_id == _ZERO_SPAN_ID:
        return None
    return trace_id, flags


class Tracing:
    """The worker's tracer provider, and the context a traced call's function runs in
    (enabled path only)."""

    def __init__(self, provider: Any, is_global: bool = False) -> None:
        from opentelemetry import context as context_api
        from opentelemetry import trace
        from opentelemetry.trace import (
            INVALID_SPAN_CONTEXT,
            NonRecordingSpan,
            SpanContext,
            TraceFlags,
            TraceState,
        )

        self.provider = provider
        #: Whether ``provider`` is OpenTelemetry's global tracer provider (it is unless one was
        #: set before tracing was activated).
        self.is_global = is_global
        self.tracer = provider.get_tracer(INSTRUMENTATION_NAME, __version__)
        # The context key of the current span, found through the public API (the module
        # that defines it keeps it private).
        (self._span_key,) = trace.set_span_in_context(trace.INVALID_SPAN, context_api.Context())
        self._span_context = SpanContext
        self._trace_flags = TraceFlags
        self._flags = {"00": TraceFlags(0), "01": TraceFlags(1)}
        self._trace_state_from_header = TraceState.from_header
        self._no_trace_state = TraceState()
        # The last tracestate seen and its parsed form (a parent sends the same one again).
        self._last_state: Tuple[Optional[str], Any] = (None, self._no_trace_state)
        self._close_lock = threading.Lock()
        self._closer: Optional[threading.Thread] = None
        self._close_deadline = 0.0
        self._invalid = INVALID_SPAN_CONTEXT
        self._attach_context = context_api.attach
        self._detach = context_api.detach
        # The API's attach/detach wrap the runtime context's ContextVar in two calls each; with
        # the default runtime context (contextvars) use the variable itself, a per-call saving.
        runtime = getattr(context_api, "_RUNTIME_CONTEXT", None)
        var = getattr(runtime, "_current_context", None)
        if isinstance(var, contextvars.ContextVar):
            self._attach_context = var.set
            self._detach = var.reset
        self._context = context_api.Context
        build = self._build_span_context

        class CallSpan(NonRecordingSpan):  # type: ignore[misc,valid-type]
            """A running call's function span, as OpenTelemetry's current span. Its span
            context is built from the call's ``traceparent`` only when something asks for it
            (a user span starting), so a call whose function starts none never pays for it.
            It names its call, not "whatever runs now": a context captured during the call
            (``context.get_current()``, threading instrumentation) keeps meaning that call."""

            def __init__(self, call: "Context", span_id: int) -> None:  # no super(): lazy context
                # The headers only, not the call: a context captured during the call must not
                # keep its payload alive.
                self._headers = (call._traceparent, call._tracestate)
                self._span_id = span_id
                self._context = None

            def get_span_context(self) -> Any:
                sc = self._context
                if sc is None:
                    traceparent, tracestate = self._headers
                    sc = self._context = build(traceparent, tracestate, self._span_id)
                return sc

        self._call_span = CallSpan

    # -------------------------------------------------------------- per call

    def enter(self, call: "Context", span_id: int) -> Any:
        """Make the function's span current on this thread (or in this asyncio task) while
        the function runs, so spans it starts are its children: a non-recording span with the
        ``traceparent``'s trace id and flags and ``span_id``, whose span context is built only
        if asked for. Returns a token for :meth:`exit`. Never raises: tracing never fails a
        call."""
        try:
            return self._attach_context(self._context({self._span_key: self._call_span(call, span_id)}))
        except Exception:
            return None

    def exit(self, token: Any) -> None:
        """Undo :meth:`enter` (same thread or task)."""
        if token is not None:
            try:
                self._detach(token)
            except Exception:
                pass

    def _build_span_context(self, traceparent: Any, tracestate: Any, span_id: int) -> Any:
        """The span context of a call's function span, or the invalid one for an unusable
        ``traceparent`` (user spans are then roots). Never raises."""
        try:
            parsed = parse_traceparent(traceparent)
            if parsed is None:
                return self._invalid
            trace_id, flags = parsed
            trace_flags = self._flags.get(flags)
            if trace_flags is None:
                trace_flags = self._trace_flags(int(flags, 16))
            if tracestate and type(tracestate) is str:
                last = self._last_state
                if last[0] == tracestate:
                    trace_state = last[1]
                else:
                    trace_state = self._trace_state_from_header([tracestate])
                    self._last_state = (tracestate, trace_state)
            else:
                trace_state = self._no_trace_state
            return self._span_context(trace_id, span_id, False, trace_flags, trace_state)
        except Exception:
            return self._invalid

    # -------------------------------------------------------------- end

    def shutdown(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """Flush and shut the provider down, waiting at most ``timeout`` seconds.

        The SDK's flush does not honour its timeout while an exporter retries an unreachable
        collector, so it runs on a daemon thread that this call waits for, bounded. Safe to
        call from several threads and more than once: they all wait for the same flush.
        """
        with self._close_lock:
            closer = self._closer
            if closer is None:
                closer = threading.Thread(
                    target=self._close, args=(timeout,), name="pyvisor-otel-flush", daemon=True
                )
                self._closer = closer
                self._close_deadline = time.monotonic() + timeout
                closer.start()
        closer.join(max(0.0, self._close_deadline - time.monotonic()))

    def _close(self, timeout: float) -> None:
        try:
            self.provider.force_flush(int(timeout * 1000))
        except Exception:
            pass
        try:
            self.provider.shutdown()
        except Exception:
            pass


_state: Optional[Tracing] = None


def active() -> Optional[Tracing]:
    """The active tracing state, or ``None`` when tracing is off."""
    return _state


def activate(worker_id: str, run_id: str = "") -> Optional[Tracing]:
    """Set tracing up from the environment if it is asked for and installed (once)."""
    global _state
    if _state is not None:
        return _state
    env = os.environ
    if not tracing_requested(env):
        return None
    import importlib.util

    if importlib.util.find_spec("opentelemetry") is None:
        return None  # the extra is not installed: tracing is simply off
    try:
        _state = _build(env, worker_id, run_id)
    except ImportError as e:
        _say(f"tracing is off: {e} (install pyvisor-worker[otel])")
    except Exception as e:
        _say(f"tracing is off: OpenTelemetry set-up failed: {type(e).__name__}: {e}")
    return _state


def _build(env: Mapping[str, str], worker_id: str, run_id: str) -> Tracing:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporter: Any
    if span_protocol(env) == HTTP_PROTOBUF:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpSpanExporter,
        )

        exporter = HttpSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcSpanExporter,
        )

        exporter = GrpcSpanExporter()

    pid = os.getpid()
    # Resource.create() reads OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME; ours override.
    detected = Resource.create()
    ours: Dict[str, Any] = {
        "service.name": service_name(env, str(detected.attributes.get("service.name") or "")),
        "service.instance.id": worker_id or f"{socket.gethostname()}:{pid}",
        "process.pid": pid,
        "pyvisor.worker.id": worker_id,
    }
    if run_id:
        ours["pyvisor.run.id"] = run_id
    # No atexit hook: the worker flushes itself, bounded (an SDK hook could block the exit
    # for the exporter's whole retry budget when the collector is unreachable).
    provider = TracerProvider(resource=detected.merge(Resource(ours)), shutdown_on_exit=False)
    # The exporter reads endpoint, headers, timeout, compression and TLS from OTEL_* itself.
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(provider, is_global=_install_globally(provider))


def _install_globally(provider: Any) -> bool:
    """Make ``provider`` OpenTelemetry's global tracer provider, so that spans made through
    ``opentelemetry.trace.get_tracer(...)`` (instrumented libraries, user code) are recorded
    and exported by the worker -- tracers taken at import time included: until a provider is
    set they are proxies that switch over to it.

    A provider set before (by the user's code at import time, ``OTEL_PYTHON_TRACER_PROVIDER``,
    or ``opentelemetry-instrument``) is left as it is. Returns whether ``provider`` is now the
    global one."""
    from opentelemetry import trace

    # get_tracer_provider() is the proxy until someone sets a provider (it loads the one that
    # OTEL_PYTHON_TRACER_PROVIDER names, if set, and that counts as set).
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return False
    trace.set_tracer_provider(provider)
    return trace.get_tracer_provider() is provider


# ---------------------------------------------------------------------- public tracer()


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


class _NoopSpan:
    """Stands for a span when tracing is off: every span method is accepted and ignored."""

    __slots__ = ()

    def is_recording(self) -> bool:
        return False

    def end(self, end_time: Optional[int] = None) -> None:
        pass

    def __enter__(self) -> "_NoopSpan":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name.startswith("__"):
            raise AttributeError(name)
        return _noop

    def __repr__(self) -> str:
        return "<pyvisor_worker no-op span>"


NOOP_SPAN = _NoopSpan()


class _CurrentSpan:
    """What ``tracer().start_as_current_span(...)`` returns: a context manager (and
    decorator) that looks the tracer up when it is entered, so it may be created at import
    time, before ``run_worker()`` activated tracing."""

    __slots__ = ("_name", "_args", "_kwargs", "_inner")

    def __init__(self, name: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        self._name = name
        self._args = args
        self._kwargs = kwargs
        self._inner: Any = None

    def __enter__(self) -> Any:
        state = _state
        if state is None:
            return NOOP_SPAN
        inner = state.tracer.start_as_current_span(self._name, *self._args, **self._kwargs)
        span = inner.__enter__()
        self._inner = inner
        return span

    def __exit__(self, *exc_info: Any) -> Any:
        inner = self._inner
        if inner is None:
            return False
        self._inner = None
        return inner.__exit__(*exc_info)

    def _fresh(self) -> "_CurrentSpan":
        return _CurrentSpan(self._name, self._args, self._kwargs)

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with self._fresh():
                    return await fn(*args, **kwargs)

            return async_wrapper

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self._fresh():
                return fn(*args, **kwargs)

        return wrapper


class _Tracer:
    """The adapter's tracer: OpenTelemetry's when tracing is active, a no-op otherwise.

    The same object is returned before and after activation; each method looks the active
    tracer up when called.
    """

    __slots__ = ()

    def start_span(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Like ``opentelemetry.trace.Tracer.start_span``; the new span's parent is the current
        span (inside an exposed function called with a ``traceparent``: the function's span,
        which the parent records). End it with ``span.end()``."""
        state = _state
        if state is None:
            return NOOP_SPAN
        return state.tracer.start_span(name, *args, **kwargs)

    def start_as_current_span(self, name: str, *args: Any, **kwargs: Any) -> _CurrentSpan:
        """Like ``opentelemetry.trace.Tracer.start_as_current_span``: a context manager (or
        decorator) that starts a span, makes it current and ends it on exit."""
        return _CurrentSpan(name, args, kwargs)

    @property
    def enabled(self) -> bool:
        """Whether spans are being recorded and exported (tracing is active)."""
        return _state is not None

    def __repr__(self) -> str:
        return f"<pyvisor_worker tracer ({'active' if _state is not None else 'no-op'})>"


_TRACER = _Tracer()


def tracer() -> _Tracer:
    """The adapter's tracer, for spans of your own under the function's span::

        from pyvisor_worker import expose, tracer

        @expose
        def predict(features):
            with tracer().start_as_current_span("preprocess") as span:
                span.set_attribute("n", len(features))
                ...

    With tracing active (the ``otel`` extra installed and an OTLP endpoint configured) it
    delegates to an OpenTelemetry tracer of the worker's own provider, which exports the spans;
    otherwise its spans do
    nothing (and nothing from ``opentelemetry`` is imported). It may be called at import
    time: the returned object follows activation.
    """
    return _TRACER
