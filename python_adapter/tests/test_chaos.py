"""Chaos points: armed from the parent, they fire once at the chosen place."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pyvisor_worker.testing import FakeParent, WorkerExited

SCRIPT = textwrap.dedent(
    """
    from pyvisor_worker import chaos, expose, run_worker

    done = []

    @expose
    def work(x):
        chaos.point("before")
        done.append(x)
        chaos.point("after")
        return len(done)

    run_worker()
    """
)


def _script(tmp_path: Path) -> Path:
    p = tmp_path / "worker.py"
    p.write_text(SCRIPT)
    return p


def test_unarmed_points_do_nothing_and_an_armed_kill_fires_once_at_its_point(tmp_path: Path) -> None:
    with FakeParent.spawn(_script(tmp_path)) as parent:
        assert parent.invoke("work", 1) == 1
        assert parent.invoke("__pyvisor_chaos_arm", ["after", "alloc:1"]) is True
        assert parent.invoke("work", 2) == 2  # alloc fires after the side effect, call succeeds
        assert parent.invoke("work", 3) == 3  # and only once
        assert parent.invoke("__pyvisor_chaos_arm", ["before", "kill"]) is True
        call_id = parent.call("work", 4)
        with pytest.raises(WorkerExited):
            parent.reply_for(call_id)
        assert parent.wait() == -9


def test_bad_actions_are_refused(tmp_path: Path) -> None:
    with FakeParent.spawn(_script(tmp_path)) as parent:
        reply = parent.reply_for(parent.call("__pyvisor_chaos_arm", ["after", "explode"]))
        assert not reply.ok
        assert "unknown chaos action" in reply.error["message"]
