"""Tracing's activation rules and the no-op tracer: these run with and without the `otel` extra."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict

import pytest

import pyvisor_worker
from pyvisor_worker._otel import (
    NOOP_SPAN,
    parse_traceparent,
    service_name,
    span_protocol,
    tracing_requested,
)
from pyvisor_worker.testing import FakeParent

OTEL_INSTALLED = importlib.util.find_spec("opentelemetry") is not None


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ""}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "TRUE"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "false"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_TRACES_EXPORTER": "otlp"}, True),
    ],
)
def test_tracing_requested(env: Dict[str, str], expected: bool) -> None:
    assert tracing_requested(env) is expected


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, "grpc"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "grpc"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "http/protobuf"),
        (
            {
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            },
            "http/protobuf",
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "",
            },
            "http/protobuf",
        ),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "http/protobuf"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"}, "grpc"),
    ],
)
def test_span_protocol(env: Dict[str, str], expected: str) -> None:
    assert span_protocol(env) == expected


@pytest.mark.parametrize(
    "env, detected, expected",
    [
        ({}, None, "pyvisor-worker"),
        ({}, "unknown_service:python", "pyvisor-worker"),
        ({}, "from-resource-attributes", "from-resource-attributes"),
        ({"OTEL_SERVICE_NAME": "inference"}, "other", "inference"),
        ({"OTEL_SERVICE_NAME": "api", "PYVISOR_PARENT_SERVICE_NAME": "api"}, None, "api-worker"),
        ({"OTEL_SERVICE_NAME": "models", "PYVISOR_PARENT_SERVICE_NAME": "api"}, None, "models"),
        ({"PYVISOR_PARENT_SERVICE_NAME": "pyvisor-worker"}, None, "pyvisor-worker-worker"),
    ],
)
def test_service_name(env: Dict[str, str], detected: str, expected: str) -> None:
    assert service_name(env, detected) == expected


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.mark.parametrize(
    "traceparent, expected",
    [
        (f"00-{TRACE_ID}-00f067aa0ba902b7-01", (int(TRACE_ID, 16), "01")),
        (f"00-{TRACE_ID}-00f067aa0ba902b7-00", (int(TRACE_ID, 16), "00")),
        (f"01-{TRACE_ID}-00f067aa0ba902b7-03-future", (int(TRACE_ID, 16), "03")),
        (f"00-{TRACE_ID}-00f067aa0ba902b7-01-extra", None),  # version 00 has no more fields
        (f"ff-{TRACE_ID}-00f067aa0ba902b7-01", None),
        (f"00-{TRACE_ID.upper()}-00f067aa0ba902b7-01", None),
        (f"00-{'0' * 32}-00f067aa0ba902b7-01", None),
        (f"00-{TRACE_ID}-{'0' * 16}-01", None),
        (f"00-0x{TRACE_ID[2:]}-00f067aa0ba902b7-01", None),
        (f"00-{TRACE_ID[:-1]}-00f067aa0ba902b7-01", None),
        ("", None),
        ("garbage", None),
        (None, None),
        (123, None),
    ],
)
def test_parse_traceparent(traceparent: object, expected: object) -> None:
    assert parse_traceparent(traceparent) == expected


def test_tracer_is_a_no_op_until_activated() -> None:
    tracer = pyvisor_worker.tracer()
    assert tracer is pyvisor_worker.tracer()
    assert tracer.enabled is False
    with tracer.start_as_current_span("x", attributes={"a": 1}) as span:
        assert span is NOOP_SPAN
        span.set_attribute("a", 1)
        span.set_attributes({"b": 2})
        span.add_event("e", {"c": 3})
        span.record_exception(ValueError("v"))
        span.update_name("y")
        assert span.is_recording() is False
    span = tracer.start_span("z")
    span.end()

    @tracer.start_as_current_span("decorated")
    def plain(x: int) -> int:
        return x + 1

    @tracer.start_as_current_span("decorated-async")
    async def coro(x: int) -> int:
        return x + 2

    import asyncio

    assert plain(1) == 2 and plain.__name__ == "plain"
    assert asyncio.run(coro(1)) == 3


def test_exceptions_pass_through_the_no_op_span() -> None:
    with pytest.raises(KeyError):
        with pyvisor_worker.tracer().start_as_current_span("x"):
            raise KeyError("k")


def test_importing_the_adapter_imports_no_opentelemetry() -> None:
    code = (
        "import sys, pyvisor_worker, pyvisor_worker.testing\n"
        "print('opentelemetry' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


WORKER = """
import sys
import pyvisor_worker
from pyvisor_worker import expose

@expose
def state(_):
    with pyvisor_worker.tracer().start_as_current_span("s"):
        pass
    return ["opentelemetry" in sys.modules, pyvisor_worker.tracer().enabled]
"""


@pytest.mark.skipif(OTEL_INSTALLED, reason="checks a worker without the otel extra")
def test_endpoint_without_the_extra_leaves_tracing_off_quietly(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_SDK_DISABLED": ""}
    with FakeParent.spawn(script, env=env) as parent:
        assert parent.invoke("state") == [False, False]
        # A traced call still reports its function span (the parent records it), and the
        # traced path imports nothing either.
        tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        sent = time.time_ns()
        reply = parent.reply_for(parent.call("state", traceparent=tp))
        assert reply.value == [False, False]
        assert reply.span is not None
        span_id, start_ns, end_ns = reply.span
        assert span_id > 0 and sent <= start_ns <= end_ns <= time.time_ns()
        parent.shutdown()
        assert parent.wait() == 0
        assert parent.stderr_text() == ""
