"""Per-call cost of tracing (the `otel` extra): the same worker with tracing off and on.

Sequential calls through ``FakeParent`` (one in flight), each with a ``traceparent``; the
tracing-on workers export over OTLP/HTTP to a minimal receiver in this process (it counts
spans, it does not decode them), or over OTLP/gRPC to one when ``grpcio`` is installed.
Reported: wall time per call and the worker's CPU time per call (from /proc), and the spans
the receiver got after the worker's graceful shutdown.

    python benchmarks/otel_overhead.py [N]      # needs pip install -e '.[otel]'
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional, Tuple

from pyvisor_worker.testing import FakeParent

WORKER = """
from pyvisor_worker import expose

@expose
def echo(x):
    return x
"""

SAMPLED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
NOT_SAMPLED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Counter:
    def __init__(self) -> None:
        self.spans = 0
        self.requests = 0
        self.lock = threading.Lock()

    def add(self, request: Any) -> None:
        n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        with self.lock:
            self.spans += n
            self.requests += 1


def http_receiver(counter: Counter) -> Tuple[str, Callable[[], None]]:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            request = ExportTraceServiceRequest()
            request.ParseFromString(self.rfile.read(int(self.headers["Content-Length"])))
            counter.add(request)
            out = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return f"http://127.0.0.1:{server.server_address[1]}", stop


def grpc_receiver(counter: Counter) -> Optional[Tuple[str, Callable[[], None]]]:
    try:
        from concurrent.futures import ThreadPoolExecutor

        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceResponse,
        )
    except ImportError:
        return None

    class Servicer(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
        def Export(self, request: Any, context: Any) -> Any:
            counter.add(request)
            return ExportTraceServiceResponse()

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return f"http://127.0.0.1:{port}", lambda: server.stop(None)


def measure(script: str, env: Dict[str, str], n: int, tp: Optional[str]) -> Tuple[float, float]:
    parent = FakeParent.spawn(script, env=env)
    try:
        for _ in range(200):  # warm-up
            parent.reply_for(parent.call("echo", 1, traceparent=tp))
        cpu0 = cpu_seconds(parent.pid)
        t0 = time.perf_counter()
        for i in range(n):
            parent.reply_for(parent.call("echo", i, traceparent=tp))
        wall = (time.perf_counter() - t0) / n * 1e6
        cpu = (cpu_seconds(parent.pid) - cpu0) / n * 1e6
        parent.shutdown()
        parent.wait(30)
    finally:
        parent.close()
    return wall, cpu


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    off = {"OTEL_EXPORTER_OTLP_ENDPOINT": "", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ""}
    rows: List[Tuple[str, float, float, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "worker.py")
        with open(script, "w") as f:
            f.write(WORKER)
        wall, cpu = measure(script, off, n, SAMPLED)
        rows.append(("tracing off", wall, cpu, ""))

        counter = Counter()
        url, stop = http_receiver(counter)
        http = dict(
            off, OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf", OTEL_EXPORTER_OTLP_ENDPOINT=url
        )
        try:
            for label, tp in (
                ("http, sampled", SAMPLED),
                ("http, parent not sampled", NOT_SAMPLED),
            ):
                before = counter.spans
                wall, cpu = measure(script, http, n, tp)
                rows.append((label, wall, cpu, f"{counter.spans - before} spans received"))
        finally:
            stop()

        counter = Counter()
        receiver = grpc_receiver(counter)
        if receiver is not None:
            url, stop = receiver
            grpc_env = dict(
                off, OTEL_EXPORTER_OTLP_PROTOCOL="grpc", OTEL_EXPORTER_OTLP_ENDPOINT=url
            )
            try:
                wall, cpu = measure(script, grpc_env, n, SAMPLED)
                rows.append(("grpc, sampled", wall, cpu, f"{counter.spans} spans received"))
            finally:
                stop()

    base_wall, base_cpu = rows[0][1], rows[0][2]
    print(f"{n} sequential calls with a traceparent, each configuration in its own worker")
    for label, wall, cpu, note in rows:
        print(
            f"{label:26s} {wall:7.1f} us/call wall ({wall - base_wall:+6.1f})  "
            f"{cpu:6.1f} us/call worker CPU ({cpu - base_cpu:+6.1f})  {note}"
        )


if __name__ == "__main__":
    main()
