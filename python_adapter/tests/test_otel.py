"""Tracing with the `otel` extra: real workers export their spans to a receiver in the test.

Skipped when the extra is not installed. The receivers are written here: an OTLP/HTTP one (a
``http.server`` decoding ``ExportTraceServiceRequest``) and, when ``grpcio`` is there, an
OTLP/gRPC one (``TraceServiceServicer`` from ``opentelemetry-proto``).
"""

from __future__ import annotations

import gzip
import os
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

from pyvisor_worker.testing import FakeParent  # noqa: E402

ExportTraceServiceRequest = trace_service_pb2.ExportTraceServiceRequest
ExportTraceServiceResponse = trace_service_pb2.ExportTraceServiceResponse

SPAN_KIND_SERVER = 2
STATUS_UNSET = 0
STATUS_ERROR = 2

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"


def traceparent(trace_id: str = TRACE_ID, span_id: str = PARENT_SPAN_ID) -> str:
    return f"00-{trace_id}-{span_id}-01"


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
def exit_with(code):
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
    with pyvisor_worker.tracer().start_as_current_span("user.async"):
        await asyncio.sleep(0)
    return x


@expose
async def async_wait(seconds):
    await asyncio.sleep(seconds)
    return "done"


@expose(threads=2)
def threaded_nested(x):
    span = pyvisor_worker.tracer().start_span("user.threaded")
    span.end()
    return x


@expose
def global_provider_span(_):
    """A span from the user's own (global) provider nests under the call's span too."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider())
    with trace.get_tracer("user").start_as_current_span("user.global") as span:
        parent = span.parent
        return [
            format(span.get_span_context().trace_id, "032x"),
            None if parent is None else format(parent.span_id, "016x"),
        ]


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
                            "events": [(e.name, _attrs(e.attributes)) for e in s.events],
                            "status_code": s.status.code,
                            "status_message": s.status.message,
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

    def call_span(self, call_id: int) -> Dict[str, Any]:
        with self.lock:
            found = [s for s in self.spans if s["attributes"].get("pyvisor.call.id") == call_id]
        assert len(found) == 1, f"{len(found)} spans for call {call_id}: {self.spans}"
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


# ---------------------------------------------------------------------- OTLP/HTTP, one worker


class HttpRun:
    def __init__(self) -> None:
        self.ids: Dict[str, int] = {}
        self.replies: Dict[str, Any] = {}
        self.pid = 0
        self.status: Optional[int] = None
        self.collected: Collected = Collected()


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
            ids[key] = parent.call(fn, payload, **kwargs)

        call("echo", "echo", 1, attempt=2, traceparent=traceparent(), tracestate="vendor=v1")
        call("root", "echo", 2)  # no traceparent: a root span
        call("fail", "fail", "boom", traceparent=traceparent("1" * 32))
        call("nested", "nested", 3, traceparent=traceparent("2" * 32))
        call("async", "async_nested", 4, traceparent=traceparent("3" * 32))
        call("threaded", "threaded_nested", 5, traceparent=traceparent("4" * 32))
        call("global", "global_provider_span", None, traceparent=traceparent("7" * 32))
        call("state", "otel_state")
        for key in list(ids):
            run.replies[key] = parent.reply_for(ids[key])

        # A running async call, cancelled.
        call("async_cancel", "async_wait", 30, traceparent=traceparent("5" * 32))
        time.sleep(0.1)
        parent.cancel(ids["async_cancel"])
        run.replies["async_cancel"] = parent.reply_for(ids["async_cancel"])
        # A plain call cancelled while queued behind a slow one.
        call("slow", "sleep", 0.3)
        call("queued_cancel", "echo", 6, traceparent=traceparent("6" * 32))
        parent.cancel(ids["queued_cancel"])
        run.replies["queued_cancel"] = parent.reply_for(ids["queued_cancel"])
        run.replies["slow"] = parent.reply_for(ids["slow"])

        parent.shutdown(grace_ms=5000)
        run.status = parent.wait(timeout=15)
    finally:
        parent.close()
        stop()
    yield run


def test_http_worker_served_and_exited_cleanly(http_run: HttpRun) -> None:
    assert http_run.status == 0
    for key, reply in http_run.replies.items():
        if key in ("fail", "async_cancel", "queued_cancel"):
            assert not reply.ok, key
        else:
            assert reply.ok, (key, reply.error)
    assert http_run.replies["state"].value == {"loaded": True, "enabled": True}
    assert http_run.replies["async_cancel"].error["kind"] == "cancelled"
    assert http_run.replies["queued_cancel"].error["kind"] == "cancelled"
    assert http_run.collected.requests >= 1


def test_call_span_continues_the_parents_trace(http_run: HttpRun) -> None:
    span = http_run.collected.call_span(http_run.ids["echo"])
    assert span["name"] == "pyvisor.worker echo"
    assert span["trace_id"] == TRACE_ID
    assert span["parent_span_id"] == PARENT_SPAN_ID
    assert span["trace_state"] == "vendor=v1"
    assert span["kind"] == SPAN_KIND_SERVER
    assert span["scope"] == "pyvisor_worker"
    assert span["status_code"] == STATUS_UNSET
    assert span["attributes"] == {
        "rpc.system": "pyvisor",
        "rpc.method": "echo",
        "pyvisor.call.id": http_run.ids["echo"],
        "pyvisor.call.attempt": 2,
        "pyvisor.worker.id": "otel-worker",
        "process.pid": http_run.pid,
    }


def test_resource_names_the_worker(http_run: HttpRun) -> None:
    resource = http_run.collected.call_span(http_run.ids["echo"])["resource"]
    # OTEL_SERVICE_NAME equals the parent's: "-worker" is appended.
    assert resource["service.name"] == "pyvisor-test-worker"
    assert resource["service.instance.id"] == "otel-worker"
    assert resource["pyvisor.worker.id"] == "otel-worker"
    assert resource["pyvisor.run.id"] == "otel-run"
    assert resource["process.pid"] == http_run.pid


def test_call_without_traceparent_is_a_root_span(http_run: HttpRun) -> None:
    span = http_run.collected.call_span(http_run.ids["root"])
    assert span["name"] == "pyvisor.worker echo"
    assert span["parent_span_id"] == ""
    assert span["trace_id"] not in (TRACE_ID, "0" * 32)


def test_exception_is_recorded_with_error_status(http_run: HttpRun) -> None:
    span = http_run.collected.call_span(http_run.ids["fail"])
    assert span["name"] == "pyvisor.worker fail"
    assert span["trace_id"] == "1" * 32
    assert span["parent_span_id"] == PARENT_SPAN_ID
    assert span["status_code"] == STATUS_ERROR
    assert span["status_message"] == "__main__.MyError"
    assert span["attributes"]["error.type"] == "__main__.MyError"
    events = [attrs for name, attrs in span["events"] if name == "exception"]
    assert len(events) == 1
    assert events[0]["exception.message"] == "boom"
    assert "MyError" in events[0]["exception.type"]
    assert "raise MyError(message)" in events[0]["exception.stacktrace"]
    assert http_run.replies["fail"].error["type"] == "__main__.MyError"


@pytest.mark.parametrize(
    "key, user_span",
    [
        ("nested", "user.inline"),
        ("nested", "user.decorated"),
        ("async", "user.async"),
        ("threaded", "user.threaded"),
    ],
)
def test_user_spans_are_children_of_the_call_span(
    http_run: HttpRun, key: str, user_span: str
) -> None:
    call_span = http_run.collected.call_span(http_run.ids[key])
    spans = http_run.collected.named(user_span)
    children = [s for s in spans if s["trace_id"] == call_span["trace_id"]]
    assert len(children) == 1, http_run.collected.named(user_span)
    assert children[0]["parent_span_id"] == call_span["span_id"]
    assert children[0]["scope"] == "pyvisor_worker"
    if user_span == "user.inline":
        assert children[0]["attributes"] == {"user.value": 3}


def test_spans_of_the_users_global_provider_nest_too(http_run: HttpRun) -> None:
    call_span = http_run.collected.call_span(http_run.ids["global"])
    assert call_span["trace_id"] == "7" * 32
    assert http_run.replies["global"].value == ["7" * 32, call_span["span_id"]]


@pytest.mark.parametrize(
    "key, function", [("async_cancel", "async_wait"), ("queued_cancel", "echo")]
)
def test_cancelled_calls_have_error_status(http_run: HttpRun, key: str, function: str) -> None:
    span = http_run.collected.call_span(http_run.ids[key])
    assert span["name"] == f"pyvisor.worker {function}"
    assert span["parent_span_id"] == PARENT_SPAN_ID
    assert span["status_code"] == STATUS_ERROR
    assert span["status_message"] == "cancelled"
    assert span["attributes"]["error.type"] == "cancelled"
    assert not [name for name, _ in span["events"] if name == "exception"]


# ---------------------------------------------------------------------- other set-ups


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
        )
        try:
            ok = parent.call("nested", 1, traceparent=traceparent())
            bad = parent.call("fail", "grpc boom", traceparent=traceparent())
            assert parent.reply_for(ok).ok
            assert not parent.reply_for(bad).ok
        finally:
            status = parent.close(timeout=15)
        assert status == 0
    finally:
        server.stop(None)
    span = collected.call_span(ok)
    assert span["name"] == "pyvisor.worker nested"
    assert (span["trace_id"], span["parent_span_id"]) == (TRACE_ID, PARENT_SPAN_ID)
    assert span["resource"]["service.name"] == "pyvisor-worker"
    assert span["resource"]["service.instance.id"] == "grpc-worker"
    child = collected.named("user.inline")
    assert len(child) == 1 and child[0]["parent_span_id"] == span["span_id"]
    failed = collected.call_span(bad)
    assert failed["status_code"] == STATUS_ERROR
    assert [name for name, _ in failed["events"]] == ["exception"]


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
            ok = parent.call("echo", 1, traceparent=traceparent())
            assert parent.reply_for(ok).ok
            bye = parent.call("exit_with", 3, traceparent=traceparent())
            assert parent.wait(timeout=15) == 3
        finally:
            parent.close()
    finally:
        stop()
    assert collected.call_span(ok)["status_code"] == STATUS_UNSET
    span = collected.call_span(bye)
    assert span["name"] == "pyvisor.worker exit_with"
    assert span["status_code"] == STATUS_ERROR
    assert span["attributes"]["error.type"] == "SystemExit"


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
            assert parent.invoke("echo", i) == i
        assert not parent.reply_for(parent.call("fail", "x")).ok
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
        # Still not imported after the tracer API was used.
        assert parent.invoke("otel_state") == {"loaded": False, "enabled": False}
        parent.shutdown()
        assert parent.wait() == 0
