"""The gradient arena summed over ranks that share one machine, through shared memory.

Between two local MPICH ranks an in-place `Allreduce` of a tree model's 29 KB arena
took 14 us in a loop and 25-30 us inside a training step (its buffers are cold by
then). Here every rank copies its arena into its own slot of an MPI shared-memory
window and raises its flag to the sum's number; once every flag has reached that
number, every rank adds the slots up itself, in rank order, so that every rank gets
the same bits: one native call (`_runtime.shm_sum`), where an MPI `Barrier` between
the copy and the adds cost 2.8 us of a 8.5 us sum on a Zen 4 (stop 32). Two slots
per rank, used in turn: a rank may write sum s+1's slot while a slower one still
reads sum s's, and cannot reach sum s+2's write before every rank has raised its
flag for s+1, that is, finished reading sum s.

Only where every rank of the communicator is on one machine (`MPI.COMM_TYPE_SHARED`)
and the slots they read add up to at most `MAX_READ` bytes: every rank reads every
slot, where MPICH's `Allreduce` of a large buffer moves about two. Between 2 ranks
(a loop of sums, MPICH 4) the shared sum took 8.4 / 12.9 / 40-44 / 186-213 / 813 us
against the `Allreduce`'s 14.6 / 22 / 46 / 175-178 / 559 us at 29 KB / 67 KB / 256 KB /
1 MB / 4 MB. Elsewhere `DataParallel` keeps the `Allreduce`.
"""
from __future__ import annotations

import numpy as np

from ._runtime import shm_sum

#: the most bytes of slots a rank reads in one sum (its size times the ranks)
MAX_READ = 2**20
#: floats before a rank's two slots: its flag (a uint64) on a cache line of its own
HEADER = 16


class SharedSum:
    """`sum(arena)`: `arena` (float32, at most `size` floats, the same length on every
    rank) replaced by its sum over the ranks of `comm`. Collective, like `Allreduce`:
    every rank calls it the same number of times."""

    def __init__(self, MPI, comm, size: int):
        self.rank, self.ranks = comm.Get_rank(), comm.Get_size()
        slot = -(-size // HEADER) * HEADER              # floats a slot takes: whole cache lines
        self._win = MPI.Win.Allocate_shared((HEADER + 2 * slot) * 4, 4, comm=comm)
        self._win.Lock_all(MPI.MODE_NOCHECK)            # one passive epoch, for `Free`'s sake
        parts = [np.frombuffer(self._win.Shared_query(r)[0], np.float32, HEADER + 2 * slot) for r in range(self.ranks)]
        self._flags = [p[:2].view(np.uint64) for p in parts]          # each rank's: the last sum it wrote
        self._turns = [[p[at:at + size] for p in parts] for at in (HEADER, HEADER + slot)]
        self._flags[self.rank][0] = 0
        self._count = 0                                  # sums made
        comm.Barrier()                                   # every flag is 0 before any rank raises its own

    def __call__(self, arena: np.ndarray) -> None:
        self._count += 1
        slots = self._turns[self._count & 1]
        if len(arena) < len(slots[0]):      # a packed arena (`structc.rowsum`): the slots' first floats
            slots = [slot[:len(arena)] for slot in slots]
        shm_sum(arena, slots, self._flags, self.rank, self._count)

    def free(self) -> None:
        """Release the window (collective)."""
        self._win.Unlock_all()
        self._win.Free()


def shared_sum(MPI, comm, size: int) -> SharedSum | None:
    """A `SharedSum` of `size` floats if every rank of `comm` (two or more) shares
    this machine's memory and their slots are at most `MAX_READ` bytes, else None.
    Collective."""
    if comm.Get_size() < 2 or 4 * size * comm.Get_size() > MAX_READ:
        return None
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        together = node.Get_size() == comm.Get_size()
    finally:
        node.Free()
    return SharedSum(MPI, comm, size) if together else None
