"""The worker of examples/jaeger_trace.rs: a traced function with a nested span and a chaos point."""

from pyvisor_worker import chaos, expose, run_worker, tracer


@expose(idempotent=True)
def score(features: dict) -> dict:
    chaos.point("before_scoring")
    with tracer().start_as_current_span("feature engineering"):
        total = sum(features.get("values", []))
    return {"score": total * 2.0}


if __name__ == "__main__":
    run_worker()
