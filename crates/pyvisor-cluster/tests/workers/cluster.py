"""Functions for the multi-node tests (crates/pyvisor-cluster/tests/remote.rs, trace.rs): each
answers with the node it ran on (`PYVISOR_NODE`, set by pyvisor-cluster-node)."""

import os
import time

from pyvisor_worker import expose, tracer

NODE = os.environ.get("PYVISOR_NODE", "?")


@expose(idempotent=True)
def where(x):
    """[node, x]: where the call ran."""
    return [NODE, x]


@expose(idempotent=True)
def slow_where(args):
    """[node, x] after `seconds`."""
    x, seconds = args
    time.sleep(seconds)
    return [NODE, x]


@expose
def record(token):
    """Not idempotent: appends `NODE TOKEN` to the side-effect log, then takes 100 ms more
    before it answers (so a node killed meanwhile has run calls it never answered)."""
    with open(os.environ["SIDE_LOG"], "a", encoding="utf-8") as f:
        f.write(f"{NODE} {token}\n")
    time.sleep(0.1)
    return NODE


@expose(idempotent=True)
def traced_where(x):
    """[node, x], after a span of its own (`user.step`, exported by the worker when tracing is
    active: a child of the function's span); raises ValueError when x is "fail"."""
    with tracer().start_as_current_span("user.step") as span:
        span.set_attribute("step.input", str(x))
    if x == "fail":
        raise ValueError("asked to fail")
    return [NODE, x]


@expose
def patient_record(args, ctx):
    """Not idempotent: after `seconds` appends `NODE TOKEN` to the side-effect log, unless the
    call is cancelled first (then it writes nothing)."""
    token, seconds = args
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        if ctx.cancelled:
            return "cancelled"
        time.sleep(0.01)
    with open(os.environ["SIDE_LOG"], "a", encoding="utf-8") as f:
        f.write(f"{NODE} {token}\n")
    return NODE


@expose(idempotent=True)
def where_pid(x):
    """[node, worker pid, x]."""
    return [NODE, os.getpid(), x]


def _log(line):
    with open(os.environ["SIDE_LOG"], "a", encoding="utf-8") as f:
        f.write(f"{NODE} {line}\n")


@expose
def marked_record(args):
    """Not idempotent: appends `NODE start TOKEN` to the side-effect log, then after `seconds`
    `NODE TOKEN`."""
    token, seconds = args
    _log(f"start {token}")
    time.sleep(seconds)
    _log(token)
    return NODE


@expose(idempotent=True)
def marked_where(args):
    """[node, x] after `seconds`; appends `NODE start X` to the side-effect log first (at each
    attempt)."""
    x, seconds = args
    _log(f"start {x}")
    time.sleep(seconds)
    return [NODE, x]
