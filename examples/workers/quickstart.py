"""The worker behind examples/quickstart.rs.

Module-level code runs once per process, before the worker says hello: load models here.
"""

import asyncio

from pyvisor_worker import Context, expose, run_worker

WEIGHTS = {"bias": 0.5, "scale": 2.0}  # stands in for an expensive model load


@expose(idempotent=True)
def predict(features: dict) -> dict:
    """A pure function of its input: safe to retry after a crash."""
    score = sum(features.get("values", [])) * WEIGHTS["scale"] + WEIGHTS["bias"]
    return {"id": features.get("id"), "score": score}


@expose
def divide(args: list) -> float:
    a, b = args
    return a / b  # b == 0 raises ZeroDivisionError, which comes back as a typed error


@expose
async def slow_echo(value: object, ctx: Context) -> object:
    await asyncio.sleep(0.05)
    return {"value": value, "attempt": ctx.attempt}


if __name__ == "__main__":
    run_worker()
