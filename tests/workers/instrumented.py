"""Test worker that calls a library instrumented through OpenTelemetry's global API, as the
``opentelemetry-instrumentation-*`` packages are: the library takes its tracer from
``opentelemetry.trace.get_tracer`` when it is imported (before ``run_worker()`` sets tracing
up) and never hears of pyvisor. Needs the adapter's ``otel`` extra."""

from opentelemetry import trace

from pyvisor_worker import expose, run_worker


class InstrumentedClient:
    """Stands for an instrumented library (an HTTP or database client)."""

    _tracer = trace.get_tracer("instrumented.client", "1.0")

    def lookup(self, key):
        with self._tracer.start_as_current_span("client.lookup") as span:
            span.set_attribute("client.key", key)
            # A nested span through a tracer fetched at call time.
            with trace.get_tracer("instrumented.db").start_as_current_span("db.query"):
                return key.upper()


CLIENT = InstrumentedClient()


@expose
def lookup(key):
    return CLIENT.lookup(key)


if __name__ == "__main__":
    run_worker()
