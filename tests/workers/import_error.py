"""Test worker that fails at import, after recording when it started."""

import os
import time

log = os.environ.get("START_LOG")
if log:
    with open(log, "a") as f:
        f.write(f"{time.time()}\n")

raise RuntimeError("model file is missing: /models/does-not-exist.bin")
