"""The worker behind examples/idempotency.rs: a non-idempotent function (it "charges" an
order), exposed without ``idempotent=True``; the caller makes it safe with idempotency keys.
"""

import os
import time

from pyvisor_worker import expose, run_worker

CHARGES = 0  # per process; the parent's idempotency keys make one charge per key


@expose
def charge(order: dict) -> dict:
    global CHARGES
    CHARGES += 1
    time.sleep(0.2)  # a slow payment provider
    return {"order": order["id"], "amount": order["amount"], "charged_by": os.getpid()}


@expose
def refund(order: dict) -> dict:
    raise ValueError(f"order {order['id']} was never charged")


if __name__ == "__main__":
    run_worker()
