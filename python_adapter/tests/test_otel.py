"""Tracing with the `otel` extra: real workers export the spans user code makes to a receiver
in the test.

The function's own span is recorded by the parent from the reply's ``[span_id, start_ns,
end_ns]``; the worker exports no span per call. What is checked here: that spans made inside
a traced call are children of that span id in the traceparent's trace, that calls without a
traceparent make root spans, and that export and the flush on every exit path still work.

Skipped when the extra is not installed. The receivers are written here: an OTLP/HTTP one (a
``http.server`` decoding ``ExportTraceServiceRequest``) and, when ``grpcio`` is there, an
OTLP/gRPC one (``TraceServiceServicer`` from ``opentelemetry-proto``).
"""

from __future__ import annotations

import gzip
import os
import signal
import socket
import textwrap
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

pytest.importorskip("opentelemetry.sdk.trace")
pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")
trace_service_pb2 = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")

from pyvisor_worker.testing import FakeParent, Reply  # noqa: E402

ExportTraceServiceRequest = trace_service_pb2.ExportTraceServiceRequest
ExportTraceServiceResponse = trace_service_pb2.ExportTraceServiceResponse

SPAN_KIND_INTERNAL = 1

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"


def traceparent(trace_id: str = TRACE_ID, span_id: str = PARENT_SPAN_ID, flags: str = "01") -> str:
    return f"00-{trace_id}-{span_id}-{flags}"


def span_id_hex(reply: Reply) -> str:
    """The function span's id from a reply, as OTLP spells span ids."""
    assert reply.span is not None, reply
    return format(reply.span[0], "016x")


WORKER = '''
import asyncio
import sys
import threading
import time

import pyvisor_worker
from pyvisor_worker import Context, expose, run_worker

TRACER = pyvisor_worker.tracer()  # taken before run_worker(): it follows activation


class MyError(Exception):
    pass


@TRACER.start_as_current_span("user.decorated")  # decorated at import time
def helper(x):
    return x


@expose
def echo(x):
    return x


@expose
def fail(message):
    raise MyError(message)


@expose
def unserializable(_):
    return object()


@expose
def exit_with(code):
    sys.exit(code)


@expose
def span_then_exit(code):
    with TRACER.start_as_current_span("user.before_exit"):
        pass
    sys.exit(code)


@expose
def sleep(seconds):
    time.sleep(seconds)
    return seconds


@expose
def nested(x):
    with TRACER.start_as_current_span("user.inline") as span:
        span.set_attribute("user.value", x)
    return helper(x)


@expose
async def async_nested(x):
    async def child():
        with pyvisor_worker.tracer().start_as_current_span("user.async.task"):
            await asyncio.sleep(0)

    with pyvisor_worker.tracer().start_as_current_span("user.async"):
        await asyncio.sleep(0)
    await asyncio.create_task(child())  # a task created by the function sees the span too
    return x


@expose
async def async_wait(seconds):
    await asyncio.sleep(seconds)
    return "done"


@expose
def captured_context(x):
    """A context captured during the call and attached in a thread of the user's own (as the
    threading instrumentation does) still names this call's span."""
    from opentelemetry import context

    captured = context.get_current()

    def run():
        token = context.attach(captured)
        try:
            pyvisor_worker.tracer().start_span("user.captured").end()
        finally:
            context.detach(token)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return x


@expose(threads=2)
def threaded_nested(x):
    span = pyvisor_worker.tracer().start_span("user.threaded")
    span.end()
    return x


@expose
def global_api_span(_):
    """A span made through OpenTelemetry's global API (as instrumented libraries make theirs)
    nests under the function's span and is exported by the worker: the adapter's provider is
    the global one."""
    from opentelemetry import trace

    with trace.get_tracer("user").start_as_current_span("user.global") as span:
        parent = span.parent
        return [
            format(span.get_span_context().trace_id, "032x"),
            None if parent is None else format(parent.span_id, "016x"),
            trace.get_tracer_provider() is pyvisor_worker._otel.active().provider,
        ]


@expose
def stream_spans(n):
    for i in range(n):  # a span per resumption: each runs in the stream's context
        with TRACER.start_as_current_span("user.stream"):
            pass
        yield i


@expose(threads=1)
def stream_spans_threaded(n):
    for i in range(n):
        with TRACER.start_as_current_span("user.stream.threaded"):
            pass
        yield i


@expose
async def stream_spans_async(n):
    for i in range(n):
        with TRACER.start_as_current_span("user.stream.async"):
            await asyncio.sleep(0)
        yield i


@expose
def otel_state(_):
    return {
        "loaded": "opentelemetry" in sys.modules,
        "enabled": pyvisor_worker.tracer().enabled,
    }


@expose
def noop_api(_):
    """The tracer's API works (and does nothing) without tracing."""
    with pyvisor_worker.tracer().start_as_current_span("x", attributes={"a": 1}) as span:
        span.set_attribute("a", 1)
        span.add_event("e")
        span.record_exception(ValueError("v"))
        recording = span.is_recording()
    other = pyvisor_worker.tracer().start_span("y")
    other.set_status(None)
    other.end()
    return [recording, helper(7)]


if __name__ == "__main__":
    run_worker()
'''


# ---------------------------------------------------------------------- receivers


def _value(any_value: Any) -> Any:
    which = any_value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, which)


def _attrs(key_values: Any) -> Dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in key_values}


class Collected:
    """Spans received, flattened to dicts."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: List[Dict[str, Any]] = []
        self.requests = 0

    def add(self, request: Any) -> None:
        spans = []
        for rs in request.resource_spans:
            resource = _attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(
                        {
                            "name": s.name,
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent_span_id": s.parent_span_id.hex(),
                            "trace_state": s.trace_state,
                            "kind": s.kind,
                            "attributes": _attrs(s.attributes),
                            "start": s.start_time_unix_nano,
                            "end": s.end_time_unix_nano,
                            "scope": ss.scope.name,
                            "resource": resource,
                        }
                    )
        with self.lock:
            self.requests += 1
            self.spans.extend(spans)

    def named(self, name: str) -> List[Dict[str, Any]]:
        with self.lock:
            return [s for s in self.spans if s["name"] == name]

    def one(self, name: str, trace_id: str) -> Dict[str, Any]:
        """The one span called ``name`` in trace ``trace_id``."""
        found = [s for s in self.named(name) if s["trace_id"] == trace_id]
        assert len(found) == 1, f"{len(found)} spans {name!r} in trace {trace_id}: {self.spans}"
        return found[0]


def _decode(body: bytes, encoding: Optional[str]) -> bytes:
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    return body


def start_http_receiver() -> Tuple[Collected, str, Callable[[], None]]:
    """An OTLP/HTTP receiver on 127.0.0.1: (collected, base URL, stop)."""
    collected = Collected()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path != "/v1/traces":
                self.send_error(404)
                return
            request = ExportTraceServiceRequest()
            request.ParseFromString(_decode(body, self.headers.get("Content-Encoding")))
            collected.add(request)
            out = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="otlp-http", daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return collected, f"http://127.0.0.1:{server.server_address[1]}", stop


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _clean_otel_env(mp: pytest.MonkeyPatch) -> None:
    """The workers inherit this process's environment: drop any OTEL_* set outside."""
    for key in list(os.environ):
        if key.startswith("OTEL_") or key == "PYVISOR_PARENT_SERVICE_NAME":
            mp.delenv(key)


def _write(directory: Path) -> Path:
    path = directory / "traced_worker.py"
    path.write_text(textwrap.dedent(WORKER))
    return path


def _assert_timed(reply: Reply, sent_ns: int, received_ns: int) -> None:
    """The reply carries a function span inside the call's wall-clock window."""
    assert reply.span is not None, reply
    span_id, start_ns, end_ns = reply.span
    assert 0 < span_id < 2**64
    assert sent_ns <= start_ns <= end_ns <= received_ns


# ---------------------------------------------------------------------- OTLP/HTTP, one worker


class HttpRun:
    def __init__(self) -> None:
        self.ids: Dict[str, int] = {}
        self.replies: Dict[str, Reply] = {}
        self.sent: Dict[str, int] = {}
        self.received: Dict[str, int] = {}
        self.pid = 0
        self.status: Optional[int] = None
        self.collected: Collected = Collected()


TRACED = {  # key -> trace id of its traceparent
    "echo": TRACE_ID,
    "fail": "1" * 32,
    "nested": "2" * 32,
    "async": "3" * 32,
    "threaded": "4" * 32,
    "captured": "e" * 32,
    "global": "7" * 32,
    "tracestate": "8" * 32,
    "not_sampled": "9" * 32,
    "unserializable": "a" * 32,
    "unknown": "b" * 32,
    "stream": "c" * 32,
    "stream_threaded": "d" * 32,
    "stream_async": "f" * 32,
}


@pytest.fixture(scope="module")
def http_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpRun]:
    """One worker exporting over OTLP/HTTP: it serves every kind of call, then shuts down
    gracefully (the spans are only exported by the flush at exit: the batch delay is 5 s)."""
    run = HttpRun()
    collected, url, stop = start_http_receiver()
    run.collected = collected
    script = _write(tmp_path_factory.mktemp("otel-http"))
    with pytest.MonkeyPatch.context() as mp:
        _clean_otel_env(mp)
        parent = FakeParent.spawn(
            script,
            worker_id="otel-worker",
            run_id="otel-run",
            env={
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_ENDPOINT": url,
                "OTEL_SERVICE_NAME": "pyvisor-test",
                "PYVISOR_PARENT_SERVICE_NAME": "pyvisor-test",
            },
        )
    try:
        run.pid = parent.pid
        ids = run.ids

        def call(key: str, fn: str, payload: Any = None, **kwargs: Any) -> None:
            run.sent[key] = time.time_ns()
            ids[key] = parent.call(fn, payload, **kwargs)

        def wait(*keys: str) -> None:
            for key in keys:
                run.replies[key] = parent.reply_for(ids[key])
                run.received[key] = time.time_ns()

        call("echo", "echo", 1, attempt=2, traceparent=traceparent(), tracestate="vendor=v1")
        call("fail", "fail", "boom", traceparent=traceparent(TRACED["fail"]))
        call("nested", "nested", 3, traceparent=traceparent(TRACED["nested"]))
        # The same function without a traceparent, after a traced call on the same thread.
        call("root", "nested", 30)
        call("async", "async_nested", 4, traceparent=traceparent(TRACED["async"]))
        call("async_root", "async_nested", 40)
        call("threaded", "threaded_nested", 5, traceparent=traceparent(TRACED["threaded"]))
        call("captured", "captured_context", 6, traceparent=traceparent(TRACED["captured"]))
        call("threaded_root", "threaded_nested", 50)
        call("global", "global_api_span", None, traceparent=traceparent(TRACED["global"]))
        call(
            "tracestate",
            "nested",
            8,
            traceparent=traceparent(TRACED["tracestate"]),
            tracestate="vendor=v1,other=x",
        )
        call(
            "not_sampled", "nested", 9, traceparent=traceparent(TRACED["not_sampled"], flags="00")
        )
        call("malformed", "nested", 10, traceparent="00-not-a-traceparent")
        call(
            "unserializable",
            "unserializable",
            None,
            traceparent=traceparent(TRACED["unserializable"]),
        )
        call("unknown", "no_such_function", None, traceparent=traceparent(TRACED["unknown"]))
        call("state", "otel_state")
        wait(*list(ids))

        # Streams (their items: two each).
        for key, fn in [
            ("stream", "stream_spans"),
            ("stream_threaded", "stream_spans_threaded"),
            ("stream_async", "stream_spans_async"),
        ]:
            run.sent[key] = time.time_ns()
            ids[key] = parent.stream(fn, 2, credit=8, traceparent=traceparent(TRACED[key]))
            result = parent.stream_result(ids[key])
            assert result.items == [0, 1], (key, result)
            run.replies[key] = result.reply
            run.received[key] = time.time_ns()

        # A running async call, cancelled.
        call("async_cancel", "async_wait", 30, traceparent=traceparent("5" * 32))
        time.sleep(0.1)
        parent.cancel(ids["async_cancel"])
        wait("async_cancel")
        # A plain call cancelled while queued behind a slow one.
        call("slow", "sleep", 0.3)
        call("queued_cancel", "echo", 6, traceparent=traceparent("6" * 32))
        parent.cancel(ids["queued_cancel"])
        wait("queued_cancel", "slow")

        parent.shutdown(grace_ms=5000)
        run.status = parent.wait(timeout=15)
    finally:
        parent.close()
        stop()
    yield run


def test_http_worker_served_and_exited_cleanly(http_run: HttpRun) -> None:
    assert http_run.status == 0
    failing = ("fail", "unserializable", "unknown", "async_cancel", "queued_cancel")
    for key, reply in http_run.replies.items():
        if key in failing:
            assert not reply.ok, key
        else:
            assert reply.ok, (key, reply.error)
    assert http_run.replies["state"].value == {"loaded": True, "enabled": True}
    assert http_run.replies["async_cancel"].error["kind"] == "cancelled"
    assert http_run.replies["queued_cancel"].error["kind"] == "cancelled"
    assert http_run.collected.requests >= 1


@pytest.mark.parametrize(
    "key",
    ["echo", "fail", "nested", "async", "threaded", "global", "not_sampled", "malformed",
     "unserializable", "async_cancel"],
)
def test_traced_calls_report_their_function_span(http_run: HttpRun, key: str) -> None:
    _assert_timed(http_run.replies[key], http_run.sent[key], http_run.received[key])


def test_span_ids_are_distinct(http_run: HttpRun) -> None:
    ids = [r.span[0] for r in http_run.replies.values() if r.span is not None]
    assert len(ids) >= 10
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize(
    "key", ["root", "async_root", "threaded_root", "state", "slow", "unknown", "queued_cancel"]
)
def test_calls_without_traceparent_or_that_never_ran_have_no_span(
    http_run: HttpRun, key: str
) -> None:
    assert http_run.replies[key].span is None


def test_error_replies_after_the_function_ran(http_run: HttpRun) -> None:
    err = http_run.replies["fail"].error
    assert err["kind"] == "exception" and err["type"] == "__main__.MyError"
    assert "raise MyError(message)" in err["traceback"]
    assert "pyvisor_worker" not in err["traceback"]  # the adapter's own frame is left out
    assert http_run.replies["unserializable"].error["kind"] == "unserializable"
    assert http_run.replies["unknown"].error["kind"] == "unknown_function"


def test_the_worker_exports_no_span_per_call(http_run: HttpRun) -> None:
    names = {s["name"] for s in http_run.collected.spans}
    assert not [n for n in names if n.startswith("pyvisor.worker")], names
    assert names <= {
        "user.inline",
        "user.decorated",
        "user.async",
        "user.async.task",
        "user.threaded",
        "user.captured",
        "user.global",
        "user.stream",
        "user.stream.threaded",
        "user.stream.async",
    }, names


@pytest.mark.parametrize(
    "key, user_span",
    [
        ("nested", "user.inline"),
        ("nested", "user.decorated"),
        ("async", "user.async"),
        ("threaded", "user.threaded"),
        ("captured", "user.captured"),
        ("tracestate", "user.inline"),
    ],
)
def test_user_spans_are_children_of_the_function_span(
    http_run: HttpRun, key: str, user_span: str
) -> None:
    reply = http_run.replies[key]
    child = http_run.collected.one(user_span, TRACED[key])
    assert child["parent_span_id"] == span_id_hex(reply)
    assert child["scope"] == "pyvisor_worker"
    assert child["kind"] == SPAN_KIND_INTERNAL
    # Made while the function ran.
    _, start_ns, end_ns = reply.span  # type: ignore[misc]
    assert start_ns <= child["start"] <= child["end"] <= end_ns
    if user_span == "user.inline":
        assert child["attributes"] == {"user.value": reply.value}


@pytest.mark.parametrize(
    "key, user_span",
    [
        ("stream", "user.stream"),
        ("stream_threaded", "user.stream.threaded"),
        ("stream_async", "user.stream.async"),
    ],
)
def test_spans_made_in_a_stream_are_children_of_its_span(
    http_run: HttpRun, key: str, user_span: str
) -> None:
    reply = http_run.replies[key]
    assert reply.ok and reply.value == 2
    _assert_timed(reply, http_run.sent[key], http_run.received[key])
    children = [s for s in http_run.collected.named(user_span) if s["trace_id"] == TRACED[key]]
    assert len(children) == 2  # one per resumption: each ran in the stream's context
    _, start_ns, end_ns = reply.span  # type: ignore[misc]
    for child in children:
        assert child["parent_span_id"] == span_id_hex(reply)
        assert start_ns <= child["start"] <= child["end"] <= end_ns


def test_tasks_created_by_an_async_function_see_its_span(http_run: HttpRun) -> None:
    child = http_run.collected.one("user.async.task", TRACED["async"])
    assert child["parent_span_id"] == span_id_hex(http_run.replies["async"])


def test_user_spans_carry_the_calls_tracestate(http_run: HttpRun) -> None:
    assert http_run.collected.one("user.inline", TRACED["tracestate"])["trace_state"] == (
        "vendor=v1,other=x"
    )
    assert http_run.collected.one("user.inline", TRACED["nested"])["trace_state"] == ""


def test_the_parents_sampling_decision_is_followed(http_run: HttpRun) -> None:
    """Flags 00: the user's spans are not sampled (the default sampler follows the parent)."""
    assert not [s for s in http_run.collected.spans if s["trace_id"] == TRACED["not_sampled"]]


def test_the_adapters_provider_is_the_global_one(http_run: HttpRun) -> None:
    reply = http_run.replies["global"]
    assert reply.value == [TRACED["global"], span_id_hex(reply), True]


def test_spans_of_the_global_api_are_exported_under_the_function_span(http_run: HttpRun) -> None:
    """What ``opentelemetry-instrumentation-*`` packages do: ``trace.get_tracer(...)``."""
    reply = http_run.replies["global"]
    span = http_run.collected.one("user.global", TRACED["global"])
    assert span["parent_span_id"] == span_id_hex(reply)
    assert span["scope"] == "user"
    assert span["resource"]["service.name"] == "pyvisor-test-worker"


@pytest.mark.parametrize(
    "key, user_span, value",
    [
        ("root", "user.inline", 30),
        ("malformed", "user.inline", 10),
        ("async_root", "user.async", None),
        ("threaded_root", "user.threaded", None),
    ],
)
def test_user_spans_without_a_valid_traceparent_are_roots(
    http_run: HttpRun, key: str, user_span: str, value: Any
) -> None:
    traced = set(TRACED.values())
    roots = [s for s in http_run.collected.named(user_span) if s["trace_id"] not in traced]
    if value is not None:
        roots = [s for s in roots if s["attributes"].get("user.value") == value]
    assert len(roots) == 1, http_run.collected.named(user_span)
    assert roots[0]["parent_span_id"] == ""
    assert roots[0]["trace_id"] != "0" * 32


def test_resource_names_the_worker(http_run: HttpRun) -> None:
    resource = http_run.collected.one("user.inline", TRACED["nested"])["resource"]
    # OTEL_SERVICE_NAME equals the parent's: "-worker" is appended.
    assert resource["service.name"] == "pyvisor-test-worker"
    assert resource["service.instance.id"] == "otel-worker"
    assert resource["pyvisor.worker.id"] == "otel-worker"
    assert resource["pyvisor.run.id"] == "otel-run"
    assert resource["process.pid"] == http_run.pid


# ---------------------------------------------------------------------- other set-ups


#: A worker that installs a global tracer provider of its own before ``run_worker()``.
USER_PROVIDER_WORKER = """
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import pyvisor_worker
from pyvisor_worker import expose, run_worker

MINE = InMemorySpanExporter()
PROVIDER = TracerProvider()
PROVIDER.add_span_processor(SimpleSpanProcessor(MINE))
trace.set_tracer_provider(PROVIDER)


@expose
def spans(_):
    with trace.get_tracer("user").start_as_current_span("user.mine"):
        pass
    with pyvisor_worker.tracer().start_as_current_span("user.adapter"):
        pass
    return {
        "kept": trace.get_tracer_provider() is PROVIDER,
        "mine": [
            [s.name, format(s.context.trace_id, "032x"), format(s.parent.span_id, "016x")]
            for s in MINE.get_finished_spans()
            if s.parent is not None
        ],
    }


if __name__ == "__main__":
    run_worker()
"""


def test_a_global_provider_set_by_the_user_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user's provider stays the global one: spans of the global API go to it (not to the
    worker's exporter) and still nest under the function's span; ``pyvisor_worker.tracer()``
    spans go to the worker's exporter."""
    collected, url, stop = start_http_receiver()
    _clean_otel_env(monkeypatch)
    script = tmp_path / "user_provider.py"
    script.write_text(USER_PROVIDER_WORKER)
    try:
        parent = FakeParent.spawn(
            script,
            env={
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_ENDPOINT": url,
            },
        )
        try:
            reply = parent.reply_for(parent.call("spans", None, traceparent=traceparent()))
            assert reply.ok, reply.error
            parent.shutdown(grace_ms=5000)
            assert parent.wait(timeout=15) == 0
        finally:
            parent.close()
    finally:
        stop()
    assert reply.value == {"kept": True, "mine": [["user.mine", TRACE_ID, span_id_hex(reply)]]}
    assert collected.one("user.adapter", TRACE_ID)["parent_span_id"] == span_id_hex(reply)
    assert not collected.named("user.mine")



def test_grpc_export_and_flush_on_eof(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OTLP/gRPC (the default protocol); the parent closes the socket (EOF: the worker ends
    through os._exit) and the spans are flushed first."""
    grpc = pytest.importorskip("grpc")
    pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc.trace_exporter")
    from concurrent.futures import ThreadPoolExecutor

    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

    collected = Collected()

    class Servicer(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
        def Export(self, request: Any, context: Any) -> Any:
            collected.add(request)
            return ExportTraceServiceResponse()

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        _clean_otel_env(monkeypatch)
        parent = FakeParent.spawn(
            _write(tmp_path),
            worker_id="grpc-worker",
            env={"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{port}"},
            # No preexec_fn, so the child is started without fork(): this process runs a gRPC
            # server, and gRPC's at-fork handlers restart its poller in a forked child, where
            # subprocess then closes the poller's epoll descriptor: the child aborts (SIGABRT,
            # "epoll_wait error: Bad file descriptor") before it even execs the worker.
            parent_death_signal=False,
        )
        try:
            ok = parent.reply_for(parent.call("nested", 1, traceparent=traceparent()))
            bad = parent.reply_for(parent.call("fail", "grpc boom", traceparent=traceparent()))
            assert ok.ok and not bad.ok
            assert bad.span is not None
        finally:
            status = parent.close(timeout=15)
        assert status == 0
    finally:
        server.stop(None)
    child = collected.one("user.inline", TRACE_ID)
    assert child["parent_span_id"] == span_id_hex(ok)
    assert child["resource"]["service.name"] == "pyvisor-worker"
    assert child["resource"]["service.instance.id"] == "grpc-worker"
    assert collected.one("user.decorated", TRACE_ID)["parent_span_id"] == span_id_hex(ok)


def test_spans_are_flushed_when_user_code_exits_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    collected, url, stop = start_http_receiver()
    _clean_otel_env(monkeypatch)
    try:
        parent = FakeParent.spawn(
            _write(tmp_path),
            env={
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_ENDPOINT": url,
            },
        )
        try:
            ok = parent.reply_for(parent.call("nested", 1, traceparent=traceparent("c" * 32)))
            assert ok.ok
            parent.call("span_then_exit", 3, traceparent=traceparent("d" * 32))
            assert parent.wait(timeout=15) == 3
        finally:
            parent.close()
    finally:
        stop()
    assert collected.one("user.inline", "c" * 32)["parent_span_id"] == span_id_hex(ok)
    last = collected.one("user.before_exit", "d" * 32)
    # A child of the exiting call's function span (whose reply never came).
    assert last["parent_span_id"] not in ("", PARENT_SPAN_ID, span_id_hex(ok))


def test_spans_are_flushed_when_sigterm_ends_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an external SIGTERM the worker ends by SIGTERM itself, and exports first."""
    collected, url, stop = start_http_receiver()
    _clean_otel_env(monkeypatch)
    try:
        parent = FakeParent.spawn(
            _write(tmp_path),
            env={
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_ENDPOINT": url,
            },
        )
        try:
            ok = parent.reply_for(parent.call("nested", 1, traceparent=traceparent("e" * 32)))
            assert ok.ok
            os.kill(parent.pid, signal.SIGTERM)
            assert parent.wait(timeout=15) == -signal.SIGTERM
        finally:
            parent.close()
    finally:
        stop()
    assert collected.one("user.inline", "e" * 32)["parent_span_id"] == span_id_hex(ok)


def test_unreachable_collector_never_blocks_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clean_otel_env(monkeypatch)
    parent = FakeParent.spawn(
        _write(tmp_path),
        env={
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{_free_port()}",
        },
    )
    try:
        assert parent.invoke("otel_state") == {"loaded": True, "enabled": True}
        for i in range(20):
            reply = parent.reply_for(parent.call("nested", i, traceparent=traceparent()))
            assert reply.value == i and reply.span is not None
        assert not parent.reply_for(parent.call("fail", "x", traceparent=traceparent())).ok
        started = time.monotonic()
        parent.shutdown(grace_ms=1000)
        assert parent.wait(timeout=15) == 0
        elapsed = time.monotonic() - started
    finally:
        parent.close()
    # The flush gives up after about 2 s although the exporter would retry for 10 s.
    assert elapsed < 5.0, elapsed


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ""},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_SDK_DISABLED": "true"},
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:9",
            "OTEL_TRACES_EXPORTER": "none",
        },
    ],
    ids=["no-endpoint", "sdk-disabled", "exporter-none"],
)
def test_without_endpoint_opentelemetry_is_not_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: Dict[str, str]
) -> None:
    _clean_otel_env(monkeypatch)
    with FakeParent.spawn(_write(tmp_path), env=env) as parent:
        assert parent.invoke("otel_state") == {"loaded": False, "enabled": False}
        assert parent.invoke("noop_api") == [False, 7]
        # Traced calls still report their function span (the parent records it).
        sent = time.time_ns()
        reply = parent.reply_for(parent.call("nested", 1, traceparent=traceparent()))
        _assert_timed(reply, sent, time.time_ns())
        reply = parent.reply_for(parent.call("async_nested", 2, traceparent=traceparent()))
        assert reply.ok and reply.span is not None
        # Still not imported after the tracer API and the traced path were used.
        assert parent.invoke("otel_state") == {"loaded": False, "enabled": False}
        parent.shutdown()
        assert parent.wait() == 0
