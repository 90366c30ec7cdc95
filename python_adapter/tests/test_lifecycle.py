"""Start, shutdown, EOF, bad environments and the watchdog."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import pytest

from pyvisor_worker.testing import FakeParent, Reply, WorkerExited

from conftest import KITCHEN_SINK, SpawnFn


def _env_without_pyvisor() -> Dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PYVISOR_")}


def _process_gone(pid: int) -> bool:
    """True once pid no longer exists or is a zombie (reparented and not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def _watchdog_of(pid: int) -> Optional[int]:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and comm.startswith("pyvisor-watch"):
            return int(entry)
    return None


def test_eof_makes_the_worker_exit_0_even_with_a_call_running(worker: FakeParent) -> None:
    worker.call("sleep", 30)
    time.sleep(0.2)
    worker.sock.close()
    assert worker.wait(timeout=10) == 0


#: The error of a call that arrived after shutdown began: it never ran (the parent may route it
#: to another worker).
REFUSED = {
    "kind": "refused",
    "type": "WorkerShuttingDown",
    "message": "the worker is shutting down; the call did not run",
}


def _assert_refused(reply: Reply) -> None:
    assert not reply.ok, reply
    assert {k: reply.error[k] for k in REFUSED} == REFUSED
    assert reply.error["traceback"] is None and reply.span is None


def _wait_running(worker: FakeParent, call_id: int, timeout: float = 10.0) -> None:
    """Until the worker reports ``call_id`` as running (pong's in_progress)."""
    deadline = time.monotonic() + timeout
    nonce = 0
    while time.monotonic() < deadline:
        nonce += 1
        worker.ping(nonce)
        in_progress = worker.pong_for(nonce)["in_progress"]
        if any(c[0] == call_id and c[2] == "running" for c in in_progress):
            return
        time.sleep(0.01)
    raise AssertionError(f"call {call_id} never reported running")


def _first_refused(worker: FakeParent, timeout: float = 10.0) -> Reply:
    """Send quick async calls until one is refused (the worker has begun shutting down); the
    ones accepted before that must succeed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = worker.reply_for(worker.call("async_sleep", 0))
        if reply.ok:
            assert reply.value == "slept"
            continue
        return reply
    raise AssertionError("the worker never began shutting down")


@pytest.mark.parametrize("to_group", [False, True], ids=["to-worker", "to-group"])
def test_sigterm_drains_then_the_worker_ends_by_sigterm(worker: FakeParent, to_group: bool) -> None:
    """A SIGTERM without a ``shutdown`` message is someone else's kill: the calls in flight
    finish, later calls are refused (they never ran), and the worker then dies by SIGTERM
    itself, so that the parent does not blame the calls for an exit of its own."""
    call_id = worker.call("sleep", 2.0)
    _wait_running(worker, call_id)
    if to_group:  # the watchdog gets it too, and must not kill the worker for it
        os.killpg(worker.pid, signal.SIGTERM)
    else:
        os.kill(worker.pid, signal.SIGTERM)
    _assert_refused(_first_refused(worker))
    # Every kind of call is refused, a plain one included (it would queue behind the sleep).
    for function, payload in (("echo", "too late"), ("thread_sleep", 0), ("async_sleep", 0)):
        _assert_refused(worker.reply_for(worker.call(function, payload)))
    reply = worker.reply_for(call_id, timeout=10)
    assert reply.ok and reply.value == 2.0
    assert worker.wait(timeout=10) == -signal.SIGTERM
    assert "Traceback" not in worker.stderr_text()


def test_idle_sigterm_ends_the_worker_by_sigterm_at_once(worker: FakeParent) -> None:
    started = time.monotonic()
    os.kill(worker.pid, signal.SIGTERM)
    assert worker.wait(timeout=10) == -signal.SIGTERM
    assert time.monotonic() - started < 4.0  # not the 5 s grace


def test_sigterm_grace_expires_and_the_worker_ends_by_sigterm(worker: FakeParent) -> None:
    call_id = worker.call("sleep", 60)
    _wait_running(worker, call_id)
    os.kill(worker.pid, signal.SIGTERM)
    assert worker.wait(timeout=20) == -signal.SIGTERM
    assert "grace expired" in worker.stderr_text()


def test_sigterm_after_a_shutdown_message_still_exits_0(worker: FakeParent) -> None:
    """The parent's own sequence (``shutdown``, then SIGTERM to the group): a requested exit."""
    call_id = worker.call("sleep", 2.0)
    _wait_running(worker, call_id)
    worker.shutdown(grace_ms=10_000)
    _assert_refused(worker.reply_for(worker.call("echo", "too late")))
    os.killpg(worker.pid, signal.SIGTERM)
    assert worker.reply_for(call_id, timeout=10).value == 2.0
    assert worker.wait(timeout=10) == 0


def test_a_shutdown_message_during_a_sigterm_drain_makes_it_the_parents(
    worker: FakeParent,
) -> None:
    call_id = worker.call("sleep", 2.0)
    _wait_running(worker, call_id)
    os.kill(worker.pid, signal.SIGTERM)
    _assert_refused(_first_refused(worker))
    worker.shutdown(grace_ms=10_000)
    assert worker.reply_for(call_id, timeout=10).value == 2.0
    assert worker.wait(timeout=10) == 0


def test_shutdown_message_lets_calls_in_flight_finish(worker: FakeParent) -> None:
    inline = worker.call("sleep", 0.8)
    threaded = worker.call("thread_sleep", 0.8)
    async_ = worker.call("async_sleep", 0.8)
    _wait_running(worker, inline)
    worker.shutdown(grace_ms=10_000)
    for function, payload in (("echo", "too late"), ("thread_sleep", 0), ("async_sleep", 0)):
        _assert_refused(worker.reply_for(worker.call(function, payload)))
    assert worker.reply_for(inline, timeout=10).value == 0.8
    assert worker.reply_for(threaded, timeout=10).value == 0.8
    assert worker.reply_for(async_, timeout=10).value == "slept"
    assert worker.wait(timeout=10) == 0


def test_shutdown_grace_expires(worker: FakeParent) -> None:
    worker.call("sleep", 30)
    time.sleep(0.1)
    started = time.monotonic()
    worker.shutdown(grace_ms=300)
    assert worker.wait(timeout=10) == 0
    assert time.monotonic() - started < 8
    assert "grace expired" in worker.stderr_text()


def test_idle_shutdown_is_prompt(worker: FakeParent) -> None:
    worker.shutdown(grace_ms=5000)
    assert worker.wait(timeout=5) == 0


def test_sys_exit_in_a_function_ends_the_worker(worker: FakeParent) -> None:
    worker.call("exit_with", 7)
    with pytest.raises(WorkerExited):
        worker.recv()
    assert worker.wait() == 7


def test_import_error_shows_the_traceback(spawn: SpawnFn) -> None:
    with pytest.raises(WorkerExited) as info:
        spawn("import definitely_not_a_module_xyz\n")
    assert "No module named 'definitely_not_a_module_xyz'" in str(info.value)
    assert "Traceback (most recent call last)" in str(info.value)


def test_exception_at_import_exits_nonzero(write_script: Callable[..., Path]) -> None:
    script = write_script("raise RuntimeError('model failed to load')\n")
    parent = FakeParent.spawn(script, wait_hello=False)
    status = parent.wait()
    parent.sock.close()
    assert status not in (0, 2, 3)
    assert "RuntimeError: model failed to load" in parent.stderr_text()
    assert "Traceback (most recent call last)" in parent.stderr_text()


@pytest.mark.parametrize("fd", [None, "not-a-number", "987"])
def test_launcher_without_pyvisor_exits_2(write_script: Callable[..., Path], fd: Optional[str]) -> None:
    script = write_script(KITCHEN_SINK)
    env = _env_without_pyvisor()
    if fd is not None:
        env["PYVISOR_FD"] = fd
    proc = subprocess.run(
        [sys.executable, "-m", "pyvisor_worker", str(script)],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert b"this is a pyvisor worker; start it through pyvisor" in proc.stderr


def test_fd_that_is_not_a_socket_exits_2(write_script: Callable[..., Path]) -> None:
    script = write_script(KITCHEN_SINK)
    r, w = os.pipe()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pyvisor_worker", str(script)],
            env={**_env_without_pyvisor(), "PYVISOR_FD": str(r)},
            pass_fds=(r,),
            capture_output=True,
            timeout=30,
        )
    finally:
        os.close(r)
        os.close(w)
    assert proc.returncode == 2
    assert b"not a socket" in proc.stderr


def test_run_worker_outside_pyvisor_exits_2(write_script: Callable[..., Path]) -> None:
    script = write_script(KITCHEN_SINK)
    proc = subprocess.run(
        [sys.executable, str(script)],
        env=_env_without_pyvisor(),
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert b"this is a pyvisor worker; start it through pyvisor" in proc.stderr


def test_script_without_run_worker_is_served(spawn: SpawnFn, write_script: Callable[..., Path]) -> None:
    write_script("def helper(x):\n    return x * 2\n", "sibling.py")
    parent = spawn(
        """
        import sys
        from pyvisor_worker import expose
        from sibling import helper   # the script's directory is on sys.path

        ARGS = sys.argv[1:]

        @expose
        def double(x):
            return helper(x)

        @expose
        def args(_):
            return ARGS
        """,
        name="only_functions.py",
    )
    assert parent.invoke("double", 21) == 42
    assert parent.invoke("args") == []


def test_script_arguments(write_script: Callable[..., Path]) -> None:
    script = write_script(
        """
        import sys
        from pyvisor_worker import expose

        @expose
        def argv(_):
            return sys.argv
        """,
        "args.py",
    )
    with FakeParent.spawn(script, "--flag", "value") as parent:
        assert parent.invoke("argv") == [str(script), "--flag", "value"]


def test_module_launch(write_script: Callable[..., Path], tmp_path: Path) -> None:
    write_script(
        """
        from pyvisor_worker import expose, run_worker

        @expose(idempotent=True)
        def where(_):
            return __name__

        if __name__ == "__main__":
            run_worker()
        """,
        "my_worker_mod.py",
    )
    with FakeParent.spawn(module="my_worker_mod", cwd=tmp_path) as parent:
        where = {"name": "where", "idempotent": True, "kind": "inline", "threads": 0, "stream": False}
        assert where in parent.hello["functions"]
        assert parent.invoke("where") == "__main__"
    assert parent.proc.returncode == 0


def test_watchdog_holds_nothing_of_the_worker(worker: FakeParent) -> None:
    watchdog = None
    assert _wait_until(lambda: _watchdog_of(worker.pid) is not None, 10)
    watchdog = _watchdog_of(worker.pid)
    assert watchdog is not None
    assert os.getpgid(watchdog) == worker.pid
    fds = os.listdir(f"/proc/{watchdog}/fd")
    assert sorted(fds) == ["0", "1", "2"]
    for fd in fds:
        assert os.readlink(f"/proc/{watchdog}/fd/{fd}") == "/dev/null"
    # and it goes away with the worker
    worker.sock.close()
    assert worker.wait() == 0
    assert _wait_until(lambda: _process_gone(watchdog), 10)


def test_watchdog_kills_subprocesses_of_a_killed_worker(worker: FakeParent) -> None:
    child = worker.invoke("spawn_sleep")
    assert not _process_gone(child)
    os.kill(worker.pid, signal.SIGKILL)
    assert worker.wait() == -signal.SIGKILL
    assert _wait_until(lambda: _process_gone(child), 15), f"sleep {child} outlived its worker"


def test_script_that_ignores_sigterm_keeps_ignoring_it(spawn: SpawnFn) -> None:
    parent = spawn(
        """
        import signal
        from pyvisor_worker import expose, run_worker

        signal.signal(signal.SIGTERM, signal.SIG_IGN)

        @expose
        def echo(x):
            return x

        run_worker()
        """
    )
    os.kill(parent.pid, signal.SIGTERM)
    time.sleep(0.3)
    assert parent.invoke("echo", "still accepting") == "still accepting"


def test_max_frame_too_small_for_hello_exits_3(write_script: Callable[..., Path]) -> None:
    parent = FakeParent.spawn(write_script(KITCHEN_SINK), max_frame=256, wait_hello=False)
    assert parent.wait() == 3
    parent.sock.close()
    assert "hello" in parent.stderr_text()
