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

from pyvisor_worker.testing import FakeParent, WorkerExited

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


@pytest.mark.parametrize("to_group", [False, True], ids=["to-worker", "to-group"])
def test_sigterm_lets_the_call_in_flight_finish(worker: FakeParent, to_group: bool) -> None:
    call_id = worker.call("sleep", 1.0)
    time.sleep(0.2)
    if to_group:  # the watchdog gets it too, and must not kill the worker for it
        os.killpg(worker.pid, signal.SIGTERM)
    else:
        os.kill(worker.pid, signal.SIGTERM)
    time.sleep(0.2)
    late = worker.call("echo", "too late")
    late_reply = worker.reply_for(late)
    assert late_reply.error["kind"] == "internal"
    assert late_reply.error["message"] == "worker is shutting down"
    reply = worker.reply_for(call_id, timeout=10)
    assert reply.ok and reply.value == 1.0
    assert worker.wait(timeout=10) == 0


def test_shutdown_message_lets_calls_in_flight_finish(worker: FakeParent) -> None:
    inline = worker.call("sleep", 0.8)
    threaded = worker.call("thread_sleep", 0.8)
    async_ = worker.call("async_sleep", 0.8)
    time.sleep(0.1)
    worker.shutdown(grace_ms=10_000)
    late = worker.call("echo", "too late")
    assert worker.reply_for(late).error["kind"] == "internal"
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
        assert {"name": "where", "idempotent": True, "kind": "inline", "threads": 0} in parent.hello[
            "functions"
        ]
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
