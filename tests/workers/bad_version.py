"""Test worker that speaks a protocol version pyvisor does not."""

import os
import struct
import time

import msgpack
from pyvisor_worker._config import current_config

body = msgpack.packb([0, {"protocol": 99, "pid": os.getpid(), "adapter": "0", "python": "3", "functions": []}])
os.write(current_config().fd, struct.pack(">I", len(body)) + body)
time.sleep(3600)
