"""Data-parallel training's gradient sum, an embedding's rows only where some rank's step wrote them.

A table's gradient is zero outside the rows the step looked up, and the
training entry's scatter keeps the runtime's record of those rows
(`ops/embedding.py`). Summed whole, a 20,000 x 256 table is 20 MB a rank
every step, and so was each pass over the arena around the sum (weighing,
dividing, the update): 2 ranks took 15.8 ms a step of a tree network that one
process trained in 13.4. Here the ranks first take the union of their
records (one `Allreduce` of a byte a row), then sum a packed buffer: the
arena's other gradients, the union's rows of each table, and the four floats
after the gradients (`DataParallel`'s count, loss and check). The sums go back
to their places; every other row is zero on every rank already (no rank's
step wrote it since its last zeroing). Each rank's record becomes the union,
so that its next step zeroes those rows, and the update entry, which reads
the record (`compiler.update_graph`'s spans), visits them alone.

A rank that has no record of a table (its arena was handed out: `Net.grads`)
makes that table whole in the union for every rank, and then keeps zeroing
it whole itself, as before.
"""
from __future__ import annotations

import numpy as np

from ._runtime import rows_copy

#: tables of at least this many bytes are summed by rows (below it a dense sum of the
#: table costs about what the union's extra `Allreduce` does); tests lower it
SPARSE_SUM_BYTES = 1 << 20


def row_tables(net) -> list[dict]:
    """The parameters whose gradient keeps a record of its rows (`compiler.row_tables`),
    each {name, offset, rows, width}; none for a library compiled before they were listed."""
    names = set(net.meta.get("row_tables") or ())
    return [{"name": p["name"], "offset": p["offset"], "rows": p["shape"][0], "width": p["shape"][1]}
            for p in net.meta["params"] if p["name"] in names]


class RowSum:
    """`pack()` -> the buffer to sum (collective: the ranks' union of records,
    which each table's record becomes); `unpack(buffer)` puts the summed buffer
    back into the arena. The buffer ends as the arena does: the gradients,
    then the 4 floats after them; where the union holds most of the rows, it
    is the arena itself (summed whole, as every rank decides alike)."""

    def __init__(self, net, comm, MPI, tables: list[dict]):
        self._comm, self._MPI = comm, MPI
        arena = net._grad_arena
        self._arena = arena
        n = len(arena) - 4
        self._tables, self._gaps, at = [], [], 0     # (view, its address); the gradients between them
        for t in sorted(tables, key=lambda t: t["offset"]):
            view = arena[t["offset"]:t["offset"] + t["rows"] * t["width"]].reshape(t["rows"], t["width"])
            self._tables.append((view, view.ctypes.data))
            if t["offset"] > at:
                self._gaps.append(slice(at, t["offset"]))
            at = t["offset"] + view.size
        if n > at:
            self._gaps.append(slice(at, n))
        self._dense = sum(s.stop - s.start for s in self._gaps)
        # a flag per table (1: some rank has no record of it) and its rows' bytes
        self._marks = np.zeros(len(self._tables) + sum(v.shape[0] for v, _ in self._tables), np.uint8)
        self._rows: list[np.ndarray] = []
        self.packed = 0                     # sums of a packed buffer so far (the others: the arena)
        self._space = np.empty(0, np.float32)     # the packed buffers' memory, grown as needed (kept:
        # a fresh 1 MB array each step cost its pages' faults, ~0.1 ms a step of a 100,000 x 128 table's)

    def _union(self) -> list[np.ndarray]:
        """Each table's rows written by some rank's last step (collective); each
        record becomes that union now, before the sum writes those rows, so that
        it holds whatever happens next (a sum of the arena that then raises, on
        a settings mismatch, leaves the other ranks' rows in it)."""
        marks, at = self._marks, len(self._tables)
        for k, (view, address) in enumerate(self._tables):
            mine = marks[at:at + view.shape[0]]
            if rows_copy(address, mine, False):
                marks[k] = 0
            else:                       # no record: any row may hold something
                marks[k] = 1
                mine[:] = 1
            at += view.shape[0]
        self._comm.Allreduce(self._MPI.IN_PLACE, marks, op=self._MPI.MAX)
        union, at = [], len(self._tables)
        for k, (view, address) in enumerate(self._tables):
            rows = view.shape[0]
            theirs = marks[at:at + rows]
            if marks[k]:
                theirs[:] = 1
            rows_copy(address, theirs, True)    # none: this rank zeroes the table whole anyway
            # bytes 0 or 1: as bools (numpy's nonzero of uint8 took 175 us for 100,000 rows, 16 as bool)
            union.append(np.arange(rows) if marks[k] else np.flatnonzero(theirs.view(bool)))
            at += rows
        return union

    def pack(self) -> np.ndarray:
        self._rows = self._union()
        size = self._dense + sum(len(r) * v.shape[1] for r, (v, _) in zip(self._rows, self._tables)) + 4
        if 2 * size > len(self._arena):
            # most rows: the arena itself (a table's first step, whose record marks every row,
            # would otherwise keep a buffer as large as the arena for the rest of the run)
            return self._arena
        self.packed += 1
        if len(self._space) < size:
            self._space = np.empty(size + size // 4, np.float32)
        buffer = self._space[:size]
        at = 0
        for s in self._gaps:
            buffer[at:at + s.stop - s.start] = self._arena[s]
            at += s.stop - s.start
        for rows, (view, _) in zip(self._rows, self._tables):
            part = buffer[at:at + len(rows) * view.shape[1]].reshape(len(rows), view.shape[1])
            np.take(view, rows, axis=0, out=part)
            at += part.size
        buffer[at:] = self._arena[-4:]
        return buffer

    def unpack(self, buffer: np.ndarray) -> None:
        if buffer is self._arena:       # summed in place
            return
        at = 0
        for s in self._gaps:
            self._arena[s] = buffer[at:at + s.stop - s.start]
            at += s.stop - s.start
        for rows, (view, _) in zip(self._rows, self._tables):
            view[rows] = buffer[at:at + len(rows) * view.shape[1]].reshape(len(rows), view.shape[1])
            at += len(rows) * view.shape[1]
        self._arena[-4:] = buffer[at:]
