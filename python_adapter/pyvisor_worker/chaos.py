"""Chaos points: let a fault-injection test kill, stop or bloat a worker at a chosen place.

Put ``chaos.point("after_side_effect")`` in a function; a test arms that point from Rust
(``pool.chaos().arm("after_side_effect", ChaosAction::Kill)``) and the next call that reaches
it performs the action, once. Unarmed points cost one dictionary lookup under a lock.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Dict, List, Sequence

__all__ = ["point", "arm", "ACTIONS"]

#: Actions a point can perform: ``kill`` (SIGKILL itself), ``stop`` (SIGSTOP itself),
#: ``alloc:MIB`` (allocate and touch MIB mebibytes, kept until the process ends).
ACTIONS = ("kill", "stop", "alloc:MIB")

_lock = threading.Lock()
_armed: Dict[str, str] = {}
_hoard: List[bytes] = []


def _check(action: str) -> None:
    if action in ("kill", "stop"):
        return
    if action.startswith("alloc:") and action[6:].isdigit():
        return
    raise ValueError(f"unknown chaos action {action!r}; expected one of {', '.join(ACTIONS)}")


def arm(name: str, action: str) -> None:
    """Make the next pass through point ``name`` perform ``action``."""
    _check(action)
    with _lock:
        _armed[name] = action


def point(name: str) -> None:
    """A place where an armed fault happens (once); does nothing when unarmed."""
    with _lock:
        action = _armed.pop(name, None)
    if action is None:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    else:
        _hoard.append(b"\x01" * (int(action[6:]) << 20))


def _arm_from_parent(args: Sequence[str]) -> bool:
    """Built-in ``__pyvisor_chaos_arm``: ``[point, action]``."""
    if not isinstance(args, (list, tuple)) or len(args) != 2:
        raise ValueError("expected [point, action]")
    name, action = args
    arm(str(name), str(action))
    return True
