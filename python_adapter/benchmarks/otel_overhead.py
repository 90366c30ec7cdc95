"""Per-call cost of tracing in the worker: the same echo worker, calls with and without a
``traceparent``, tracing (the `otel` extra and an OTLP endpoint) off and on.

Sequential calls through ``FakeParent`` (one in flight). A call with a ``traceparent`` is timed
and its reply carries ``[span_id, start_ns, end_ns]`` (the parent records the function's span);
with tracing on, a non-recording span is also made current while the function runs. The echo
function makes no spans of its own, so the receiver (a minimal one in this process, over
OTLP/HTTP, or OTLP/gRPC when ``grpcio`` is installed) should get none. Reported: p50 and mean
wall time per call, the worker's CPU time per call (from /proc), and the spans received after
the worker's graceful shutdown. On a small machine the wall times of separate workers can
differ by several microseconds with where the scheduler puts them; the worker CPU column is
the steadier measure of what tracing adds.

    python benchmarks/otel_overhead.py [N]      # needs pip install -e '.[otel]'
"""

from __future__ import annotations

import os
import statistics
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
    """CPU time of all the process's threads: from ``schedstat`` (nanoseconds; threads that
    ended are not counted, the worker's threads live as long as it) or else ``stat`` (ticks)."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    except OSError:
        pass
    if total:
        return total / 1e9
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


class Config:
    """One worker and the calls it gets; samples accumulate over the rounds."""

    def __init__(
        self,
        label: str,
        script: str,
        env: Dict[str, str],
        tp: Optional[str],
        counter: Optional[Counter],
    ) -> None:
        self.label = label
        self.tp = tp
        self.counter = counter
        self.parent = FakeParent.spawn(script, env=env)
        self.samples: List[float] = []
        self.cpu = 0.0
        for _ in range(200):  # warm-up
            self.parent.reply_for(self.parent.call("echo", 1, traceparent=tp))

    def run(self, n: int) -> None:
        parent, tp, samples, perf = self.parent, self.tp, self.samples, time.perf_counter
        cpu0 = cpu_seconds(parent.pid)
        for i in range(n):
            t = perf()
            reply = parent.reply_for(parent.call("echo", i, traceparent=tp))
            samples.append(perf() - t)
        self.cpu += cpu_seconds(parent.pid) - cpu0
        assert (reply.span is None) == (tp is None), reply

    def stop(self) -> None:
        try:
            self.parent.shutdown()
            self.parent.wait(30)
        finally:
            self.parent.close()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    rounds = 10  # the configurations take turns, n / rounds calls at a time (drift hits all)
    off = {"OTEL_EXPORTER_OTLP_ENDPOINT": "", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ""}
    configs: List[Config] = []
    stops: List[Callable[[], None]] = []
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "worker.py")
        with open(script, "w") as f:
            f.write(WORKER)
        try:
            configs.append(Config("off, no traceparent", script, off, None, None))
            configs.append(Config("off, traceparent", script, off, SAMPLED, None))
            http_counter = Counter()
            url, stop = http_receiver(http_counter)
            stops.append(stop)
            http = dict(
                off, OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf", OTEL_EXPORTER_OTLP_ENDPOINT=url
            )
            configs.append(Config("http, no traceparent", script, http, None, http_counter))
            configs.append(Config("http, sampled", script, http, SAMPLED, http_counter))
            configs.append(
                Config("http, parent not sampled", script, http, NOT_SAMPLED, http_counter)
            )
            grpc_counter = Counter()
            receiver = grpc_receiver(grpc_counter)
            if receiver is not None:
                url, stop = receiver
                stops.append(stop)
                grpc_env = dict(
                    off, OTEL_EXPORTER_OTLP_PROTOCOL="grpc", OTEL_EXPORTER_OTLP_ENDPOINT=url
                )
                configs.append(Config("grpc, sampled", script, grpc_env, SAMPLED, grpc_counter))
            for _ in range(rounds):
                for config in configs:
                    config.run(n // rounds)
        finally:
            for config in configs:
                config.stop()
            for stop in stops:
                stop()

    base = configs[0]
    base_p50 = statistics.median(base.samples)
    calls = len(base.samples)
    print(f"{calls} sequential echo calls per configuration, each in its own worker")
    for c in configs:
        p50 = statistics.median(c.samples)
        cpu = c.cpu / len(c.samples) * 1e6
        base_cpu = base.cpu / calls * 1e6
        spans = "" if c.counter is None else f"{c.counter.spans} spans received (receiver total)"
        print(
            f"{c.label:26s} p50 {p50 * 1e6:6.1f} us ({(p50 / base_p50 - 1) * 100:+5.1f}%)  "
            f"mean {statistics.fmean(c.samples) * 1e6:6.1f} us  "
            f"worker CPU {cpu:5.1f} us/call ({cpu - base_cpu:+5.1f})  {spans}"
        )


if __name__ == "__main__":
    main()
