"""One core for a one-thread measurement, the same for every framework.

JAX computes on threads of its own while Python dispatches, and XLA's
threading flags do not bind them: its "one thread" Tree-LSTM step ran in
6.8 ms using the second core too, 7.3 ms on one (stop 28). So a one-thread
run is pinned to one core: a worker process before it starts (`pinned`,
for `subprocess.run`), or the calling thread while the run lasts (`one_core`;
threads it starts meanwhile inherit the core). More threads run as they are.
"""
from __future__ import annotations

import os
from contextlib import contextmanager


def _can_pin(threads: int) -> bool:
    return threads == 1 and hasattr(os, "sched_setaffinity")


def pinned(threads: int) -> dict:
    """`subprocess.run`'s keywords for a worker of `threads` threads: one core for one."""
    if not _can_pin(threads):
        return {}
    core = min(os.sched_getaffinity(0))
    return {"preexec_fn": lambda: os.sched_setaffinity(0, {core})}


@contextmanager
def one_core(threads: int):
    """This thread (and the threads it starts) on one core while a one-thread run lasts."""
    if not _can_pin(threads):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
