"""Test worker whose module-level code never finishes (a model load that hangs)."""

import sys
import time

print("loading the model from /models/huge.bin ...", file=sys.stderr, flush=True)
time.sleep(3600)
