"""The worker of examples/streaming.rs: a text "model" that streams its tokens, as a language
model does, from a plain generator and from an async one."""

import asyncio
import time

from pyvisor_worker import expose, run_worker

WORDS = "the quick brown fox jumps over the lazy dog".split()


@expose(idempotent=True)
def generate(prompt: str):
    """Yields one token at a time; the reader sees each as soon as it is made."""
    for i in range(len(WORDS)):
        time.sleep(0.01)  # the "model" computing the next token
        yield WORDS[(len(prompt) + i) % len(WORDS)]


@expose
async def countdown(n: int):
    """An async generator: its ``finally`` runs when the reader stops early."""
    try:
        for i in range(n, 0, -1):
            await asyncio.sleep(0.01)
            yield i
    finally:
        print("countdown closed", flush=True)


if __name__ == "__main__":
    run_worker()
