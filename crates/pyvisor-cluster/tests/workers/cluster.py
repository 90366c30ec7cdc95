"""Functions for the multi-node tests (crates/pyvisor-cluster/tests/remote.rs): each answers
with the node it ran on (`PYVISOR_NODE`, set by pyvisor-cluster-node)."""

import os
import time

from pyvisor_worker import expose

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
