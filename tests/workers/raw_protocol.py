"""A hostile worker that speaks the wire protocol by hand (no adapter), to misbehave on purpose.

RAW_MODE selects the misbehaviour:
- ``reply_then_exit``: answer the first call with a value of ``payload`` bytes, then exit at
  once (status 0): the reply is in the socket when the process is gone.
- ``deaf``: keep beating, but stop reading the socket after the first call (never answer it).
"""

import os
import socket
import struct
import sys
import threading
import time

import msgpack
from pyvisor_worker._config import current_config

# The start environment, as the adapter's launcher read it (it hides PYVISOR_FD from the script).
config = current_config()
sock = socket.socket(fileno=config.fd)
interval = config.beat_interval_ms / 1000
mode = os.environ.get("RAW_MODE", "")
lock = threading.Lock()


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


send([0, {
    "protocol": config.protocol or 2,
    "pid": os.getpid(),
    "adapter": "raw",
    "python": "3",
    "functions": [
        {"name": "blob", "idempotent": False, "kind": "inline", "threads": 0},
        {"name": "echo", "idempotent": False, "kind": "inline", "threads": 0},
    ],
}])
threading.Thread(target=beats, daemon=True).start()

while True:
    msg = read_frame()
    if msg[0] == 5:  # ping
        send([6, msg[1], {"seq": 0, "rss": 1 << 20, "in_progress": [], "served": 0}])
        continue
    if msg[0] != 1:
        continue
    call_id, attempt, function, payload = msg[1], msg[2], msg[3], msg[7]
    if mode == "reply_then_exit":
        value = b"x" * int(payload) if function == "blob" else payload
        send([2, call_id, attempt, True, None, value])
        os._exit(0)
    if mode == "deaf":
        # Beats go on; the socket is never read again.
        while True:
            time.sleep(3600)
    send([2, call_id, attempt, True, None, payload])
