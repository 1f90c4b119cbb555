"""The gradient arena summed over ranks that share one machine, through shared memory.

Between two local MPICH ranks an in-place `Allreduce` of a tree model's 29 KB arena
took 14 us in a loop and 25-30 us inside a training step (its buffers are cold by
then). Here every rank copies its arena into its own slot of an MPI shared-memory
window, one `Barrier` says every slot is written, and every rank adds the slots up
itself, in rank order, so that every rank gets the same bits. Two slots per rank,
used in turn: a rank may write step s+1's slot while a slower one still reads step
s's, and cannot reach step s+2's write before every rank has passed step s+1's
`Barrier`, that is, finished reading step s.

Only where every rank of the communicator is on one machine (`MPI.COMM_TYPE_SHARED`)
and the slots they read add up to at most `MAX_READ` bytes: every rank reads every
slot, where MPICH's `Allreduce` of a large buffer moves about two. Between 2 ranks
(a loop of sums, MPICH 4) the shared sum took 8.4 / 12.9 / 40-44 / 186-213 / 813 us
against the `Allreduce`'s 14.6 / 22 / 46 / 175-178 / 559 us at 29 KB / 67 KB / 256 KB /
1 MB / 4 MB. Elsewhere `DataParallel` keeps the `Allreduce`.
"""
from __future__ import annotations

import numpy as np

from ._runtime import add_arenas

#: the most bytes of slots a rank reads in one sum (its size times the ranks)
MAX_READ = 2**20


class SharedSum:
    """`sum(arena)`: `arena` (float32) replaced by its sum over the ranks of `comm`.
    Collective, like `Allreduce`: every rank calls it the same number of times."""

    def __init__(self, MPI, comm, size: int):
        self._comm = comm
        self.rank, self.ranks = comm.Get_rank(), comm.Get_size()
        self._win = MPI.Win.Allocate_shared(2 * size * 4, 4, comm=comm)
        self._win.Lock_all(MPI.MODE_NOCHECK)            # one passive epoch: `Sync` orders the stores
        slots = [np.frombuffer(self._win.Shared_query(r)[0], np.float32, 2 * size).reshape(2, size)
                 for r in range(self.ranks)]
        self._turns = [[s[turn] for s in slots] for turn in (0, 1)]     # every rank's slot of each turn
        self._turn = 0

    def __call__(self, arena: np.ndarray) -> None:
        slots = self._turns[self._turn]
        self._turn ^= 1
        np.copyto(slots[self.rank], arena)
        self._win.Sync()
        self._comm.Barrier()
        self._win.Sync()
        add_arenas(arena, slots)

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
