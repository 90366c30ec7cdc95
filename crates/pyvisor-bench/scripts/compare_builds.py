#!/usr/bin/env python3
"""Compare two builds of pyvisor on the call path, alternating them in one run.

Usage: compare_builds.py OLD_BENCH OLD_PYTHON NEW_BENCH NEW_PYTHON [ROUNDS]

With PIN_CPU=N in the environment, every child (bench, workers, floor) runs on CPU N only
(`taskset`): slower, but without the scheduler's placement lottery between rounds.

Each round runs `pyvisor-bench --only sequential` once with the old build (and the old
adapter's interpreter), then once with the new one, so both see the same machine state. Prints
per-round figures and the medians: sequential p50 (µs; lower is better) and pipelined
throughput (calls/s; higher is better), each also as a ratio to the raw floor measured in the
same child, and the new build's speed relative to the old (≥ 1 means faster).

With ROWS="substring[;substring…]" (and ONLY=scenario, e.g. ONLY=payloads) it compares those
rows of that scenario instead: each row's pyvisor figure (lower is better: latencies) and its
ratio to the floor, old against new, e.g.
ONLY=payloads ROWS="1 MiB (floor with;10 KiB" compare_builds.py … 8
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile


def run(bench: str, python: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    pin = os.environ.get("PIN_CPU")
    prefix = ["taskset", "-c", pin] if pin else []
    subprocess.run(
        [*prefix, bench, "--only", "sequential", "--json", out, "--python", python],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with open(out) as f:
        rows = {r["scenario"]: r for r in json.load(f)["rows"]}
    os.unlink(out)
    seq = next(r for k, r in rows.items() if k.startswith("sequential p50 (1 worker"))
    pipe = next(r for k, r in rows.items() if k.startswith("pipelined throughput"))
    return {"seq": seq["pyvisor"], "seq_floor": seq["floor"], "pipe": pipe["pyvisor"], "pipe_floor": pipe["floor"]}


def run_rows(bench: str, python: str, only: str, wanted: list) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    pin = os.environ.get("PIN_CPU")
    prefix = ["taskset", "-c", pin] if pin else []
    subprocess.run(
        [*prefix, bench, "--only", only, "--json", out, "--python", python],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with open(out) as f:
        rows = json.load(f)["rows"]
    os.unlink(out)
    found = {}
    for w in wanted:
        r = next(r for r in rows if w in r["scenario"])
        found[w] = (r["pyvisor"], r["pyvisor"] / r["floor"])
    return found


def compare_rows(old_bench: str, old_py: str, new_bench: str, new_py: str, rounds: int) -> int:
    only = os.environ.get("ONLY", "payloads")
    wanted = [w for w in os.environ["ROWS"].split(";") if w]
    old, new = [], []
    for i in range(rounds):
        o = run_rows(old_bench, old_py, only, wanted)
        n = run_rows(new_bench, new_py, only, wanted)
        old.append(o)
        new.append(n)
        print(f"round {i + 1}/{rounds}: " + "; ".join(f"{w}: old {o[w][0]:.1f} new {n[w][0]:.1f}" for w in wanted), flush=True)
    print()
    print(f"medians over {rounds} alternating rounds (lower is better)")
    for w in wanted:
        vo = statistics.median(x[w][0] for x in old)
        vn = statistics.median(x[w][0] for x in new)
        ro = statistics.median(x[w][1] for x in old)
        rn = statistics.median(x[w][1] for x in new)
        paired = statistics.median(o[w][0] / n[w][0] for o, n in zip(old, new))
        print(f"{w}: old {vo:.1f} ({ro:.2f}× floor), new {vn:.1f} ({rn:.2f}× floor); new speed vs old {vo / vn:.2f}× (paired {paired:.2f}×)")
    return 0


def main() -> int:
    if len(sys.argv) < 5:
        print(__doc__)
        return 2
    old_bench, old_py, new_bench, new_py = sys.argv[1:5]
    rounds = int(sys.argv[5]) if len(sys.argv) > 5 else 8
    if os.environ.get("ROWS"):
        return compare_rows(old_bench, old_py, new_bench, new_py, rounds)
    old, new = [], []
    for i in range(rounds):
        o = run(old_bench, old_py)
        n = run(new_bench, new_py)
        old.append(o)
        new.append(n)
        print(
            f"round {i + 1}/{rounds}: sequential p50 old {o['seq']:.1f} µs new {n['seq']:.1f} µs; "
            f"pipelined old {o['pipe']:.0f} new {n['pipe']:.0f} calls/s",
            flush=True,
        )
    med = lambda xs, k: statistics.median(x[k] for x in xs)  # noqa: E731
    seq_o, seq_n = med(old, "seq"), med(new, "seq")
    pipe_o, pipe_n = med(old, "pipe"), med(new, "pipe")
    seq_ro = statistics.median(x["seq"] / x["seq_floor"] for x in old)
    seq_rn = statistics.median(x["seq"] / x["seq_floor"] for x in new)
    pipe_ro = statistics.median(x["pipe"] / x["pipe_floor"] for x in old)
    pipe_rn = statistics.median(x["pipe"] / x["pipe_floor"] for x in new)
    print()
    print(f"medians over {rounds} alternating rounds")
    print(f"sequential p50: old {seq_o:.1f} µs ({seq_ro:.2f}× floor), new {seq_n:.1f} µs ({seq_rn:.2f}× floor); new speed vs old {seq_o / seq_n:.2f}×")
    print(f"pipelined: old {pipe_o:.0f} calls/s ({pipe_ro:.2f}× floor), new {pipe_n:.0f} calls/s ({pipe_rn:.2f}× floor); new speed vs old {pipe_n / pipe_o:.2f}×")
    paired_seq = statistics.median(o["seq"] / n["seq"] for o, n in zip(old, new))
    paired_pipe = statistics.median(n["pipe"] / o["pipe"] for o, n in zip(old, new))
    print(f"paired by round (median of new/old speed): sequential {paired_seq:.2f}×, pipelined {paired_pipe:.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
