"""Node orders that keep a graph's edges near its diagonal: reverse Cuthill–McKee.

At two threads each thread aggregates a contiguous range of destination rows. A
source row the other thread's kernels wrote comes from the other core's cache: on a
graph numbered at random half of the gathered rows do. Numbered so that most edges
join nearby rows, each thread mostly gathers rows it wrote itself. The benchmark
GNN's model on a ring-like graph of 2,000 nodes (each edge within 20 places),
numbered at random against renumbered by this order: 1 thread 1.86 -> 1.80 ms,
2 threads 1.09 -> 0.97 ms (`benchmarks/bench_locality.py`). On a graph with no
locality to find (uniform random edges) no order helps.

Cuthill–McKee is a breadth-first search over the graph with its edges taken both
ways, started at a node of least degree and visiting each node's unvisited
neighbours by increasing degree; reversed, it leaves fewer edges far from the
diagonal. Each graph of a batch is ordered within its own rows, so a batch's graphs
stay where they are, one after the other.
"""
from __future__ import annotations

import numpy as np


def locality_order(arrays, num_nodes: int) -> np.ndarray:
    """The reverse Cuthill–McKee order of a graph's rows, graph by graph: int64
    [nodes], entry i the row that is to come i-th. `arrays`: a Graph's index
    arrays (of them it reads CSR by destination, `ptr` and `src`, and `gptr`)."""
    ptr, nbr = _undirected(arrays, num_nodes)
    degree = np.diff(ptr)
    gptr = np.asarray(arrays["gptr"], np.int64)
    seen = np.zeros(num_nodes, bool)
    order = np.empty(num_nodes, np.int64)
    for a, b in zip(gptr[:-1].tolist(), gptr[1:].tolist()):
        rows = np.arange(a, b)
        found = a
        for start in rows[np.lexsort((rows, degree[a:b]))].tolist():     # least degree first, then id
            if seen[start]:
                continue
            found = _search(start, ptr, nbr, degree, seen, order, found, a, b)
        order[a:b] = order[a:b][::-1].copy()
    return order


def _undirected(arrays, n: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR of the graph with every edge taken both ways, no self loops, no repeats."""
    from .ops.message import _rows_of
    src = np.asarray(arrays["src"], np.int64)
    dst = _rows_of(arrays["ptr"]).astype(np.int64)
    u, v = np.concatenate([src, dst]), np.concatenate([dst, src])
    keep = u != v
    pairs = np.sort(u[keep] * n + v[keep])
    first = np.ones(min(1, pairs.size), bool)                       # the first pair, if any, is new
    pairs = pairs[np.append(first, pairs[1:] != pairs[:-1])]        # np.unique's hashing: 1.3 s at 2M pairs
    u, v = pairs // n, pairs % n
    return np.searchsorted(u, np.arange(n + 1)), v


def _search(start, ptr, nbr, degree, seen, order, found, a, b) -> int:
    """Breadth-first from `start` within rows [a, b), a level at a time: each node's
    new neighbours by degree, after those of the nodes before it in its level (a node
    two of them reach goes with the first); writes the nodes into `order` from
    `found` on; returns where it stopped."""
    seen[start] = True
    order[found] = start
    level, found = np.array([start]), found + 1
    while level.size:
        first, counts = ptr[level], degree[level]
        ends = np.cumsum(counts)
        at = np.arange(ends[-1]) - np.repeat(ends - counts - first, counts)    # every neighbour's place in nbr
        near, parent = nbr[at], np.repeat(np.arange(level.size), counts)
        new = ~seen[near] & (near >= a) & (near < b)
        near, parent = near[new], parent[new]
        near = near[np.lexsort((degree[near], parent))]        # stable: equal degrees by id (nbr's order)
        _, once = np.unique(near, return_index=True)
        level = near[np.sort(once)]
        seen[level] = True
        order[found:found + level.size] = level
        found += level.size
    return found
