"""Stream throughput: items per second of ``yield i`` (small ints) with credit W.

A minimal parent (a raw socketpair, no FakeParent bookkeeping) starts a worker exposing the
same generator inline, with ``threads=1`` and as an async generator, calls it as a stream of N
items with initial credit W, and grants credit back for every item it has read, after each
``recv`` (as a prompt parent would). Prints items/s per kind (best of REPEAT).

    python benchmarks/stream_throughput.py [N] [W] [REPEAT]
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time

import msgpack

HEADER = struct.Struct(">I")

WORKER = textwrap.dedent(
    """
    from pyvisor_worker import expose, run_worker

    @expose
    def count(n):
        for i in range(n):
            yield i

    @expose(threads=1)
    def count_threads(n):
        for i in range(n):
            yield i

    @expose
    async def count_async(n):
        for i in range(n):
            yield i

    if __name__ == "__main__":
        run_worker()
    """
)


def frame(message: object) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def run_stream(sock: socket.socket, call_id: int, function: str, n: int, window: int) -> float:
    """Stream n items; returns the seconds from the call to its reply."""
    unpack = msgpack.Unpacker(raw=False)  # fed frame bodies only
    begin = time.perf_counter()
    sock.sendall(frame([9, call_id, 1, function, None, None, None, {"stream": window}, n]))
    buf = bytearray()
    expected = 0
    while True:
        data = sock.recv(1 << 20)
        if not data:
            raise SystemExit("the worker closed its socket")
        buf += data
        pos = 0
        got = 0
        end = len(buf)
        done = False
        while end - pos >= 4:
            (size,) = HEADER.unpack_from(buf, pos)
            if end - pos - 4 < size:
                break
            unpack.feed(buf[pos + 4 : pos + 4 + size])
            msg = unpack.unpack()
            pos += 4 + size
            if msg[0] == 10 and msg[1] == call_id:
                if msg[3] != expected or msg[4] != expected:
                    raise SystemExit(f"item out of order: {msg!r} (expected {expected})")
                expected += 1
                got += 1
            elif msg[0] == 2 and msg[1] == call_id:
                if not msg[3] or msg[5] != n or expected != n:
                    raise SystemExit(f"bad end: {msg!r} after {expected} items")
                done = True
        del buf[:pos]
        if done:
            return time.perf_counter() - begin
        if got:
            sock.sendall(frame([11, call_id, got]))


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    window = int(sys.argv[2]) if len(sys.argv) > 2 else 256
    repeat = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "worker.py")
        with open(script, "w") as f:
            f.write(WORKER)
        parent, child = socket.socketpair()
        env = dict(os.environ)
        env.update(
            PYVISOR_FD=str(child.fileno()),
            PYVISOR_WORKER_ID="bench",
            PYVISOR_PROTOCOL="2",
            PYVISOR_MAX_FRAME=str(64 << 20),
            PYVISOR_BEAT_INTERVAL_MS="60000",
            PYVISOR_RUN_ID="bench",
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyvisor_worker", script], pass_fds=(child.fileno(),), env=env
        )
        child.close()
        (size,) = HEADER.unpack(parent.recv(4, socket.MSG_WAITALL))
        parent.recv(size, socket.MSG_WAITALL)  # hello
        call_id = 0
        print(f"{n} items of `yield i`, credit W={window}, best of {repeat}:")
        for function in ("count", "count_threads", "count_async"):
            best = float("inf")
            for _ in range(repeat):
                call_id += 1
                best = min(best, run_stream(parent, call_id, function, n, window))
            print(f"  {function:14s} {n / best:12,.0f} items/s")
        parent.close()
        proc.wait(10)


if __name__ == "__main__":
    main()
