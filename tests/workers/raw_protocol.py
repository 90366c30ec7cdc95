"""A hostile worker that speaks the wire protocol by hand (no adapter), to misbehave on purpose.

RAW_MODE selects the misbehaviour:
- ``batch_then_exit``: read ``RAW_BATCH`` calls, answer them all in one write, exit at once.
- ``double_hello``: send a second hello (with another function table) on the first call.
- ``deaf``: keep beating, but stop reading the socket after the first call (never answer it).
- ``bad_hello``: a hello whose function table is not a list (a mistyped field).
- ``stall_prefix``: on a call whose payload is ``"stall"``, send a length prefix announcing ``PYVISOR_MAX_FRAME``
  bytes and a few bytes of body, then nothing more (no beat can follow inside a frame).
- ``flood``: beat as fast as the socket takes it, and answer calls meanwhile.
- ``started_then_exit``: announce the ``call_options`` and ``started`` capabilities; on a
  ``call_options`` asking for ``ack_start``, write ``RAW_BEATS`` beats and the ``started`` in
  one write, append the payload to ``RAW_LOG`` (the call "ran") and exit at once: the
  acknowledgement is still unread in the socket when the process is gone.
- ``stream_overrun``, ``stream_skip``, ``stream_bad_count``: announce the ``stream`` capability
  and a generator ``gen``; on a stream call, send more items than the credit allows (then
  wait), skip a sequence number, or end with a count that is not the items sent.
- ``oob_*``: announce the ``oob`` capability and answer ``echo`` of an int ``n`` with ``n``
  bytes in a memfd passed out of band (an ``fds`` message and its fd in one ``sendmsg``, then
  the reply referencing buffer 0): ``oob_reply`` seals it properly; ``oob_unsealed`` does not
  seal it; ``oob_short`` announces twice its length; ``oob_many`` passes 17 fds at once;
  ``oob_unclaimed`` passes fds with plain replies and no ``fds`` message; ``oob_repeat``
  references its one buffer a thousand times (asking the parent for a thousand copies).
"""

import os
import socket
import struct
import sys
import threading
import time

import array
import fcntl

import msgpack
from pyvisor_worker._config import current_config

# The start environment, as the adapter's launcher read it (it hides PYVISOR_FD from the script).
config = current_config()
sock = socket.socket(fileno=config.fd)
interval = config.beat_interval_ms / 1000
mode = os.environ.get("RAW_MODE", "")
lock = threading.Lock()
if mode in ("batch_then_exit", "started_then_exit"):
    # Room in the socket for the whole answer, so that the process can be gone while every
    # byte of it still waits to be read (SO_SNDBUFFORCE needs privileges; SO_SNDBUF is capped).
    for opt in (32, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 64 << 20)
            break
        except OSError:
            pass


def send(msg):
    body = msgpack.packb(msg, use_bin_type=True)
    with lock:
        sock.sendall(struct.pack(">I", len(body)) + body)


def recv_exact(n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            sys.exit(0)
        buf += chunk
    return buf


def read_frame():
    (n,) = struct.unpack(">I", recv_exact(4))
    return msgpack.unpackb(recv_exact(n), raw=False)


def beats():
    seq = 0
    while True:
        seq += 1
        send([4, {"seq": seq, "rss": 1 << 20, "in_progress": [], "served": 0}])
        time.sleep(interval)


def hello(functions):
    streams = mode.startswith("stream_")
    send([0, {
        "protocol": config.protocol or 2,
        "pid": os.getpid(),
        "adapter": "raw",
        "python": "3",
        "functions": [
            {"name": f, "idempotent": False, "kind": "inline", "threads": 0, "stream": streams and f == "gen"}
            for f in functions
        ],
        "capabilities": ["call_options", "started"] if mode == "started_then_exit" else (["call_options", "stream"] if streams else (["oob"] if mode.startswith("oob_") and not os.environ.get("RAW_NO_OOB") else [])),
    }])


def flood():
    seq = 0
    while True:
        seq += 1
        send([4, {"seq": seq, "rss": 1 << 20, "in_progress": [], "served": 0}])


if mode == "bad_hello":
    send([0, {"protocol": config.protocol or 2, "pid": os.getpid(), "adapter": "raw", "python": "3", "functions": 5}])
    time.sleep(3600)
hello(["echo", "gen"] if mode.startswith("stream_") else ["echo"])
threading.Thread(target=flood if mode == "flood" else beats, daemon=True).start()

batch = []
while True:
    msg = read_frame()
    if msg[0] == 5:  # ping
        send([6, msg[1], {"seq": 0, "rss": 1 << 20, "in_progress": [], "served": 0}])
        continue
    if mode == "started_then_exit" and msg[0] == 9 and msg[7].get("ack_start"):
        frames = []
        for seq in range(int(os.environ.get("RAW_BEATS", "10000"))):
            body = msgpack.packb([4, {"seq": seq, "rss": 1 << 20, "in_progress": [], "served": 0}])
            frames.append(struct.pack(">I", len(body)) + body)
        body = msgpack.packb([8, msg[1], msg[2]])
        frames.append(struct.pack(">I", len(body)) + body)
        with lock:
            sock.sendall(b"".join(frames))
        # The acknowledgement is written: the call "runs" (as the adapter orders them).
        fd = os.open(os.environ["RAW_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, f"{msg[8]}\n".encode())
        os.close(fd)
        os._exit(0)
    if mode.startswith("stream_") and msg[0] == 9 and "stream" in msg[7]:
        call_id, attempt, credit = msg[1], msg[2], msg[7]["stream"]
        if mode == "stream_overrun":
            seqs = range(credit + 5)
        elif mode == "stream_skip":
            seqs = [0, 2]
        else:
            seqs = [0, 1]
        for seq in seqs:
            send([10, call_id, attempt, seq, seq])
        if mode == "stream_bad_count":
            send([2, call_id, attempt, True, None, 3])
        continue
    if msg[0] != 1:
        continue
    call_id, attempt, function, payload = msg[1], msg[2], msg[3], msg[7]
    if mode.startswith("oob_"):
        n = int(payload)
        fd = os.memfd_create(f"raw-{mode}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.write(fd, bytes(i % 251 for i in range(n)))
        if mode != "oob_unsealed":
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        ref = msgpack.ExtType(80, (0).to_bytes(4, "big"))
        value = [ref] * 1000 if mode == "oob_repeat" else ref
        reply = msgpack.packb([2, call_id, attempt, True, None, value], use_bin_type=True)
        reply = struct.pack(">I", len(reply)) + reply
        fds = [fd] * (17 if mode == "oob_many" else 1)
        if mode == "oob_unclaimed":
            data = reply
        else:
            announce = msgpack.packb([12, [2 * n if mode == "oob_short" else n]])
            data = struct.pack(">I", len(announce)) + announce + reply
        with lock:
            sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        os.close(fd)
        continue
    if mode == "batch_then_exit":
        batch.append((call_id, attempt, payload))
        if len(batch) == int(os.environ.get("RAW_BATCH", "100")):
            out = b""
            for c, a, p in batch:
                body = msgpack.packb([2, c, a, True, None, p], use_bin_type=True)
                out += struct.pack(">I", len(body)) + body
            with lock:
                sock.sendall(out)
            os._exit(0)
        continue
    if mode == "double_hello":
        hello(["echo", "evil"])
    if mode == "stall_prefix" and payload == "stall":
        with lock:
            sock.sendall(struct.pack(">I", config.max_frame) + b"\x92\x02")
            while True:  # the lock stays taken: the beats stop too
                time.sleep(3600)
    if mode == "deaf":
        # Beats go on; the socket is never read again.
        while True:
            time.sleep(3600)
    send([2, call_id, attempt, True, None, payload])
