"""Count what the adapter executes per inline call: Python-level function calls and the
attribute lookups, global lookups and calls among the bytecodes executed (opcode tracing).

Timing benchmarks (``overhead.py``) are noisy; these counts are exact and compare two versions
of the adapter instruction for instruction. The worker traces its serving threads with
``threading.settrace`` (the sentinel's polling loop and the control thread are left out) and a
built-in-free function ``__counts`` returns the running totals; the per-call figures are the
difference between a snapshot before and after N calls, minus the same difference with no
call in between.

    python benchmarks/hotpath_ops.py [N]     # the adapter on sys.path (PYTHONPATH picks another)

``HOTPATH_BY_FUNCTION=1`` also breaks the opcodes down by function.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
from typing import Any, Dict, List

import msgpack

HEADER = struct.Struct(">I")

WORKER = textwrap.dedent(
    """
    import dis
    import os
    import sys
    import threading
    from collections import Counter

    from pyvisor_worker import expose, run_worker

    COUNTS = Counter()
    # The sentinel's poll loop and the control thread run on timers, not per call.
    SKIP = {"_watch", "watch", "_try_flush", "try_flush", "_control", "control", "_beat"}
    OPNAME = dis.opname
    KEEP = {
        "LOAD_ATTR": "attr_load",
        "LOAD_METHOD": "attr_load",
        "STORE_ATTR": "attr_store",
        "LOAD_GLOBAL": "global_load",
        "CALL": "call",
        "CALL_FUNCTION": "call",
        "CALL_METHOD": "call",
        "CALL_FUNCTION_KW": "call",
        "CALL_FUNCTION_EX": "call",
    }

    BY_FUNCTION = bool(os.environ.get("HOTPATH_BY_FUNCTION"))

    def local(frame, event, arg):
        if event == "opcode":
            name = KEEP.get(OPNAME[frame.f_code.co_code[frame.f_lasti]])
            if name is not None:
                COUNTS[name] += 1
            COUNTS["opcodes"] += 1
            if BY_FUNCTION:
                COUNTS["opcodes:" + frame.f_code.co_name] += 1
        return local

    def trace(frame, event, arg):
        code = frame.f_code
        if code.co_name in SKIP or code.co_name == "__counts":
            return None
        if event == "call":
            COUNTS["python_calls"] += 1
        frame.f_trace_opcodes = True
        return local

    @expose
    def echo(x):
        return x

    @expose(name="__counts")
    def __counts(_):
        return dict(COUNTS)

    threading.settrace(trace)
    run_worker()
    """
)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "worker.py")
        with open(script, "w") as f:
            f.write(WORKER)
        parent, child = socket.socketpair()
        env = dict(os.environ, PYVISOR_FD=str(child.fileno()), PYVISOR_BEAT_INTERVAL_MS="3600000")
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyvisor_worker", script],
            pass_fds=(child.fileno(),),
            env=env,
            start_new_session=True,
        )
        child.close()
        client = _Client(parent)
        client.recv_one()  # hello
        for _ in range(50):  # warm-up
            client.call("echo", 1)
        for label, depth in (("sequential", 1), ("pipelined x16", 16)):
            empty = client.delta(lambda: None)
            batches = n // depth
            busy = client.delta(lambda: [client.calls("echo", 42, depth) for _ in range(batches)])
            calls = batches * depth
            per_call = {k: (busy.get(k, 0) - empty.get(k, 0)) / calls for k in sorted(busy)}
            totals = {k: v for k, v in per_call.items() if ":" not in k}
            print(f"{label:14s} per call: " + "  ".join(f"{k} {v:.2f}" for k, v in totals.items()))
            for k, v in per_call.items():
                if ":" in k and v:
                    print(f"    {k:40s} {v:7.2f}")
        parent.close()
        proc.wait()


class _Client:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.next_id = 1
        self.pack = msgpack.Packer(use_bin_type=True).pack

    def recv_one(self) -> List[Any]:
        while True:
            if len(self.buf) >= 4:
                (size,) = HEADER.unpack_from(self.buf, 0)
                if len(self.buf) >= 4 + size:
                    msg: List[Any] = msgpack.unpackb(self.buf[4 : 4 + size], raw=False)
                    self.buf = self.buf[4 + size :]
                    return msg
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError
            self.buf += data

    def calls(self, function: str, payload: Any, count: int) -> List[Any]:
        out = []
        for _ in range(count):
            body = self.pack([1, self.next_id, 1, function, None, None, None, payload])
            out.append(HEADER.pack(len(body)) + body)
            self.next_id += 1
        self.sock.sendall(b"".join(out))
        replies = []
        while len(replies) < count:
            msg = self.recv_one()
            if msg[0] == 2:
                assert msg[3], msg
                replies.append(msg[5])
        return replies

    def call(self, function: str, payload: Any) -> Any:
        return self.calls(function, payload, 1)[0]

    def delta(self, work: Any) -> Dict[str, int]:
        before = self.call("__counts", None)
        work()
        after = self.call("__counts", None)
        return {k: after.get(k, 0) - before.get(k, 0) for k in after}


if __name__ == "__main__":
    main()
