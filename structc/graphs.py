"""Graphs as inputs: from networkx or edge-index arrays to the arrays native code reads.

    g = structc.Graph(edge_index, x=features)            # edge_index: int [2, edges], source row first
    g = structc.Graph.from_networkx(G, x="x")            # node features from an attribute or an array
    b = structc.batch([g1, g2, g3])                      # a disjoint union; graph ids per node
    net.train_step(g=b, y=labels, lr=0.1)

A `Graph` is built (and checked) once: indices in range, dtypes, feature
shapes. It holds CSR by destination (`ptr`, `src`), the transposed CSR
(`ptr_t`, `dst_t`, `eid_t`: edges grouped by source), edge types in both
orders, and the node ranges of the graphs of a batch, all int32 and
read-only, so every later call just passes them on. Edges are kept in CSR
order internally; `Graph.order` maps those positions back to the edges as
given (edge features are permuted along with them).

`Binder` is the hook `structc.model.Net` calls per call: it turns the value
given for a graph input (a `Graph`, a networkx graph, a dict of arrays, or a
list of those to batch) into the model's arrays and size symbols, checking it
against the declared `graph(features=..., edge_features=..., edge_types=...)`.
A networkx graph is read on every call: its edges and attributes are
fingerprinted, and only when they differ from the last call's is it
converted again (so changing a feature or rewiring an edge is seen). A dict
or a list is converted on every call, so convert those once with
`Graph(...)` / `batch(...)` yourself.

`g.reordered()` keeps the nodes in rows of locality order (`structc.locality`);
`Binder` moves per-node inputs and outputs between node order and row order, and
turns node ids given as inputs (`h[pick]`) into rows, so callers never see the rows.

A `Graph` cannot be changed once checked: its attributes cannot be set and
its index arrays are read-only views of immutable bytes (numpy refuses to
make them writeable), so what native code reads is what was checked.
"""
from __future__ import annotations

import hashlib
import struct
import threading
import weakref
from types import MappingProxyType
from typing import Iterable, Mapping

import numpy as np

from . import _runtime
from .forest import _positions

_I32_MAX = np.iinfo(np.int32).max
_SIZES = struct.Struct("=7q")          # a Graph's `_sizes`: 7 int64 in native order, as numpy writes them


def _readonly(a: np.ndarray) -> np.ndarray:
    """A read-only copy that cannot be made writeable again: a view of an
    immutable bytes object (numpy lets the owner of data flip the flag back)."""
    a = np.ascontiguousarray(a)
    return np.frombuffer(a.tobytes(), a.dtype).reshape(a.shape)


# A Graph keeps its int32 index arrays as the rows of two sealed blocks, so that
# a batch joins each block with one concatenation:
#   per edge  [_EDGE_ROWS, edges]: `order` is there too (`Graph.order` is an int64
#             copy); the types only where they were given;
#   per node  [_NODE_ROWS, nodes + 1]: the pointers, and `graph` padded with the
#             graph count; `gnode` is `nptr` without its last entry.
# `gptr` is on its own. Field `_edges` is the first block, `_nodes` the second
# without its last column (in a batch a part's last pointers are the next's first).
_EDGE_ROWS = ("src", "dst_t", "eid_t", "order", "type", "type_t")
_NODE_ROWS = ("ptr", "ptr_t", "nptr", "graph")


def _sealed_arrays(a: Mapping[str, np.ndarray], order: np.ndarray, num_graphs: int) -> dict:
    """The fields `_edges`, `_nodes`, `arrays` and `order` of a Graph from its
    index arrays and edge order (values already checked to fit int32)."""
    rows = [a["src"], a["dst_t"], a["eid_t"], order] + [a[r] for r in ("type", "type_t") if r in a]
    edges = np.array(rows, np.int32).reshape(len(rows), -1)
    nodes = np.array([a["ptr"], a["ptr_t"], a["nptr"], np.append(a["graph"], num_graphs)], np.int32)
    return _fields(edges, nodes, np.asarray(a["gptr"], np.int32))


def _fields(edges: np.ndarray, nodes: np.ndarray, gptr: np.ndarray) -> dict:
    """The blocks sealed (immutable bytes underneath: numpy refuses to make a view
    of them writeable), `arrays`, read-only views of their rows, and `order`."""
    edges, nodes = _readonly(edges), _readonly(nodes)
    n = nodes.shape[1] - 1
    arrays = dict(zip(_EDGE_ROWS, edges))
    arrays.update(zip(_NODE_ROWS, nodes))
    arrays.update(graph=nodes[3, :n], gnode=nodes[2, :n], gptr=_readonly(gptr))
    order = _readonly(arrays.pop("order").astype(np.int64))
    return {"_edges": edges, "_nodes": nodes[:, :n], "arrays": arrays, "order": order}


def _ints(value, what: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.size == 0 and arr.dtype.kind in "iufb":      # an empty list is fine whatever numpy made of it
        return arr.astype(np.int64).reshape(arr.shape)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{what} must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.max() > _I32_MAX:      # uint64 above 2**63 would wrap to negative
        raise ValueError(f"{what}: {int(arr.max())} is out of range (at most {_I32_MAX})")
    return arr.astype(np.int64, copy=False)


def _floats(value, what: str, rows: int, per: str = "node") -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{what} must be numbers, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] != rows:
        raise ValueError(f"{what} must have shape [{rows}, features] (one row per {per}), got {arr.shape}")
    with np.errstate(over="ignore"):
        f32 = arr.astype(np.float32)
    if not np.all(np.isfinite(f32)):        # after the cast: float64 beyond float32's range becomes inf
        raise ValueError(f"{what} contain NaN or infinity in float32 (features are float32: at most "
                         f"{np.finfo(np.float32).max:.6g} in magnitude)")
    return _readonly(f32)


class Graph:
    """A graph, or a batch of graphs, ready to be passed to a compiled model."""

    #: None, or (after `reordered`) which of the graph's nodes each row holds: native
    #: code sees the rows, callers the nodes (`Binder` permutes node inputs and outputs)
    node_order = None

    def __setattr__(self, name, value):
        # Checked once, when built: it must stay as checked (build another, or use with_features).
        raise AttributeError(f"a Graph is immutable (cannot set '{name}'); build a new one")

    def _set(self, **fields) -> None:
        if "arrays" in fields:
            fields["arrays"] = MappingProxyType(dict(fields["arrays"]))
        self.__dict__.update(fields)
        # what Binder made of this graph, per declaration: made again after any change
        self.__dict__["_bound"] = {}
        # What batch() reads of a part, as int64 bytes (it joins those of all parts):
        # nodes, edges, graphs, feature widths (-1 for none), edge rows, largest edge type.
        widths = [-1 if v is None else v.shape[1] for v in (self.x, self.edge_x)]
        self.__dict__["_sizes"] = _SIZES.pack(self.num_nodes, self.num_edges, self.num_graphs, *widths,
                                              len(self._edges), self.max_type)

    def __reduce__(self):
        # pickle and copy rebuild through _restore, which seals the arrays again (in new blocks)
        fields = {k: v for k, v in self.__dict__.items() if k not in ("_edges", "_nodes", "_sizes", "_bound")}
        return (_restore, ({**fields, "arrays": dict(self.arrays)},))

    def __init__(self, edge_index, *, num_nodes: int | None = None, x=None, edge_x=None, edge_type=None,
                 graph_id=None, num_graphs: int | None = None):
        ei = _ints(edge_index, "edge_index")
        if ei.size == 0:
            ei = np.zeros((2, 0), np.int64)
        if ei.ndim != 2 or ei.shape[0] != 2:
            raise ValueError(f"edge_index must have shape [2, edges] (sources, then destinations), got {ei.shape}")
        src, dst = ei
        if num_nodes is None:
            if x is not None:
                num_nodes = len(np.asarray(x))
            elif graph_id is not None:
                num_nodes = len(np.asarray(graph_id))
            else:
                num_nodes = int(ei.max()) + 1 if ei.size else 0
        n, m = _count(num_nodes, "num_nodes"), ei.shape[1]
        if n < 1:
            raise ValueError("a graph needs at least one node")
        if n >= _I32_MAX or m >= _I32_MAX:
            raise ValueError(f"graph too large for 32-bit indices: {n} nodes, {m} edges")
        if m and (ei.min() < 0 or ei.max() >= n):
            bad = int(np.flatnonzero((ei < 0).any(axis=0) | (ei >= n).any(axis=0))[0])
            raise ValueError(f"edge {bad} ({int(src[bad])} -> {int(dst[bad])}) has a node index outside "
                             f"[0, {n})")
        order = np.argsort(dst, kind="stable")
        src_c, dst_c = src[order], dst[order]
        order_t = np.argsort(src_c, kind="stable")
        a = {"ptr": _pointers(dst, n), "src": src_c, "ptr_t": _pointers(src, n), "dst_t": dst_c[order_t],
             "eid_t": order_t}
        xv = None if x is None else _floats(x, "node features x", n)
        ex = None if edge_x is None else _readonly(_floats(edge_x, "edge features edge_x", m, "edge")[order])
        max_type = -1
        if edge_type is not None:
            t = _ints(edge_type, "edge_type").reshape(-1)
            if t.shape != (m,):
                raise ValueError(f"edge_type must have one entry per edge ({m}), got shape {t.shape}")
            if m and (t.min() < 0 or t.max() >= _I32_MAX):
                bad = int(t.min()) if t.min() < 0 else int(t.max())
                raise ValueError(f"edge type {bad} is out of range [0, {_I32_MAX})")
            max_type = int(t.max()) if m else -1
            a["type"] = t[order]
            a["type_t"] = a["type"][order_t]
        if graph_id is None:
            gid = np.zeros(n, np.int64)
        else:
            gid = _ints(graph_id, "graph_id").reshape(-1)
            if gid.shape != (n,):
                raise ValueError(f"graph_id must have one entry per node ({n}), got shape {gid.shape}")
            if n and (gid.min() < 0 or np.any(np.diff(gid) < 0)):
                raise ValueError("graph_id must be non-negative and sorted: each graph's nodes together, "
                                 "graphs in order (structc.batch builds such a union)")
            if n and gid.max() >= _I32_MAX:
                raise ValueError(f"graph_id {int(gid.max())} is too large for 32-bit indices")
        k = int(gid.max()) + 1 if n else 0
        if num_graphs is not None:
            if _count(num_graphs, "num_graphs") < k:
                raise ValueError(f"num_graphs is {num_graphs}, but graph_id goes up to {k - 1}")
            if num_graphs >= _I32_MAX:
                raise ValueError(f"num_graphs {num_graphs} is too large for 32-bit indices")
            k = num_graphs
        k = max(k, 1)
        a["gptr"] = _pointers(gid, k)
        a["gnode"] = np.arange(n)
        a["nptr"] = np.arange(n + 1)
        a["graph"] = gid
        self._set(num_nodes=n, num_edges=m, num_graphs=k, x=xv, edge_x=ex, max_type=max_type,
                  **_sealed_arrays(a, order, k))

    # -- other constructors ------------------------------------------------------
    @classmethod
    def from_networkx(cls, G, *, x="x", edge_x="edge_attr", edge_type="edge_type") -> "Graph":
        """Nodes in `G.nodes` order; an undirected edge becomes two directed ones
        (a self loop stays one). `x`, `edge_x`, `edge_type` are attribute names
        (read when every node / edge has it, none when none has; some having it is a
        ValueError naming those without), arrays (in `G.nodes` / `G.edges` order), or None."""
        return cls(**_networkx_parts(G, x, edge_x, edge_type))

    def with_features(self, x=None, edge_x=None) -> "Graph":
        """The same structure with other features (nodes' in node order, edges' in the
        order given)."""
        other = object.__new__(Graph)
        other.__dict__.update(self.__dict__)
        other.__dict__["_bound"] = {}       # never this graph's bindings, which hold its features
        if x is not None:
            x = _floats(x, "node features x", self.num_nodes)
            other._set(x=x if self.node_order is None else _readonly(x[self.node_order]))
        if edge_x is not None:
            other._set(edge_x=_readonly(_floats(edge_x, "edge features edge_x", self.num_edges, "edge")[self.order]))
        return other

    @property
    def edge_index(self) -> np.ndarray:
        """[2, edges] in CSR order (by destination's row), as node ids."""
        ei = self._row_edges()
        return ei if self.node_order is None else self.node_order[ei]

    def _row_edges(self) -> np.ndarray:
        """[2, edges] in CSR order, as rows."""
        from .ops.message import _rows_of
        return np.stack([self.arrays["src"], _rows_of(self.arrays["ptr"])])

    def reordered(self) -> "Graph":
        """The same graph with its nodes in rows of reverse Cuthill–McKee order, each
        graph of a batch within its own rows (`structc.locality`): faster message
        passing at two threads or more on a graph whose edges mostly join nearby
        nodes, whatever their numbering. A model's inputs and outputs per node
        (targets, masks, predictions) stay in node order, as do `edge_index` and
        `with_features(x=...)`; only summation order, so the last bits, may differ.
        The graph's own arrays are by row: `g.x[i]` is node `g.node_order[i]`'s."""
        from .locality import locality_order
        return self._renumbered(locality_order(self.arrays, self.num_nodes))

    def _renumbered(self, rows: np.ndarray) -> "Graph":
        """This graph with its row i holding what row rows[i] holds now."""
        n, m = self.num_nodes, self.num_edges
        place = np.empty(n, np.int64)
        place[rows] = np.arange(n)                  # a row's new place
        given = np.empty((2, m), np.int64)          # the edges as given, in new rows
        given[:, self.order] = place[self._row_edges()]
        in_given = {}
        for name, value in (("edge_x", self.edge_x), ("edge_type", self.arrays.get("type"))):
            if value is not None:
                in_given[name] = np.empty_like(value)
                in_given[name][self.order] = value
        new = Graph(given, num_nodes=n, x=None if self.x is None else self.x[rows],
                    graph_id=self.arrays["graph"][rows], num_graphs=self.num_graphs, **in_given)
        nodes = np.arange(n) if self.node_order is None else self.node_order
        new._set(node_order=_readonly(nodes[rows]))
        return new

    def __repr__(self) -> str:
        feats = f", x: {self.x.shape[1]} features" if self.x is not None else ""
        return (f"<structc.Graph {self.num_graphs} graph{'s' if self.num_graphs != 1 else ''}, "
                f"{self.num_nodes} nodes, {self.num_edges} edges{feats}"
                f"{', reordered' if self.node_order is not None else ''}>")


def _restore(fields: dict) -> Graph:
    """A Graph from the fields `__reduce__` gave (unpickling, copying)."""
    g = object.__new__(Graph)
    arrays = fields["arrays"]
    if any(np.asarray(v).dtype != np.int32 for v in arrays.values()):
        raise ValueError("a pickled Graph's index arrays must be int32")
    blocks = _sealed_arrays(arrays, fields["order"], len(arrays["gptr"]) - 1)
    sealed = {k: _readonly(v) if isinstance(v, np.ndarray) else v for k, v in fields.items() if k not in blocks}
    g._set(**sealed, **blocks)
    return g


def _networkx_parts(G, x="x", edge_x="edge_attr", edge_type="edge_type") -> dict:
    """Graph's arguments, read from a networkx graph (see Graph.from_networkx)."""
    nodes = list(G.nodes)
    if not nodes:
        raise ValueError("a graph needs at least one node")
    index = {v: k for k, v in enumerate(nodes)}
    edges = list(G.edges(keys=True, data=True)) if G.is_multigraph() else list(G.edges(data=True))
    data = [e[-1] for e in edges]
    src = np.array([index[e[0]] for e in edges], np.int64)
    dst = np.array([index[e[1]] for e in edges], np.int64)
    pick = np.arange(len(edges))
    if not G.is_directed():
        back = np.flatnonzero(src != dst)
        src, dst = np.concatenate([src, dst[back]]), np.concatenate([dst, src[back]])
        pick = np.concatenate([pick, back])

    def attribute(spec, table, what: str, names, given: str):
        """The attribute `spec` of every item of `table` (None: of none); some having it
        and others not is refused, naming those without."""
        if spec is None:
            return None
        if isinstance(spec, str):
            lacking = [k for k, d in enumerate(table) if spec not in d]
            if not lacking:
                return np.array([d[spec] for d in table]) if table else None
            if len(lacking) < len(table):
                shown = ", ".join(repr(names(k)) for k in lacking[:5]) + (", ..." if len(lacking) > 5 else "")
                raise ValueError(f"attribute {spec!r} is on {len(table) - len(lacking)} of the graph's {len(table)} "
                                 f"{what}s, not on {what}{'s' if len(lacking) > 1 else ''} {shown}; give every "
                                 f"{what} one, or pass {given}=None to read none")
            return None
        return np.asarray(spec)

    xv = attribute(x, [G.nodes[v] for v in nodes], "node", nodes.__getitem__, "x")
    ex = attribute(edge_x, data, "edge", lambda k: edges[k][:2], "edge_x")
    et = attribute(edge_type, data, "edge", lambda k: edges[k][:2], "edge_type")
    if ex is not None and len(ex) == len(edges):
        ex = np.asarray(ex)[pick]
    if et is not None and len(et) == len(edges):
        et = np.asarray(et)[pick]
    return {"edge_index": np.stack([src, dst]), "num_nodes": len(nodes), "x": xv, "edge_x": ex, "edge_type": et}


def _count(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {v!r}")
    return int(v)


def _pointers(rows: np.ndarray, n: int) -> np.ndarray:
    ptr = np.zeros(n + 1, np.int64)
    if len(rows):
        np.cumsum(np.bincount(rows, minlength=n), out=ptr[1:])
    return ptr


def batch(graphs: Iterable) -> Graph:
    """The disjoint union of graphs (Graph or networkx), node ids offset in
    order; graph k's nodes get graph id k (a batch inside counts as its graphs).

    The result is the Graph the union's edges would build, CSR order included.
    The parts are checked Graphs (or become ones here), so their entries need no
    second look, only the totals: each block of the union's index arrays is one
    concatenation of the parts' blocks plus their offsets, sealed once."""
    parts = [as_graph(g) for g in graphs]
    if not parts:
        raise ValueError("cannot batch an empty list of graphs")
    if len(parts) == 1:
        return parts[0]
    sizes = np.frombuffer(b"".join([p._sizes for p in parts]), np.int64).reshape(len(parts), -1)
    _check_batchable(sizes)
    counts = sizes[:, :3]
    n, m, k = (int(t) for t in counts.sum(axis=0))
    if n >= _I32_MAX or m >= _I32_MAX or k >= _I32_MAX:
        raise ValueError(f"batch too large for 32-bit indices: {n} nodes, {m} edges, {k} graphs")
    first = (np.cumsum(counts, axis=0) - counts).astype(np.int32)     # each part's first node, edge, graph
    edges = np.concatenate([p._edges for p in parts], axis=1)
    # src and dst_t count nodes, eid_t and order edges; the types stay as they are
    edges[:4] += np.repeat(first[:, [0, 0, 1, 1]].T, counts[:, 1], axis=1)
    nodes = np.empty((4, n + 1), np.int32)
    np.concatenate([p._nodes for p in parts], axis=1, out=nodes[:, :n])
    # ptr and ptr_t count edges, nptr nodes, graph graphs
    nodes[:, :n] += np.repeat(first[:, [1, 1, 0, 2]].T, counts[:, 0], axis=1)
    nodes[:, n] = (m, m, n, k)
    gptr = np.zeros(k + 1, np.int32)
    np.cumsum(np.bincount(nodes[3, :n], minlength=k), out=gptr[1:])     # the nodes of each graph
    x = _readonly(np.concatenate([p.x for p in parts])) if parts[0].x is not None else None
    edge_x = _readonly(np.concatenate([p.edge_x for p in parts])) if parts[0].edge_x is not None else None
    union = object.__new__(Graph)
    union._set(num_nodes=n, num_edges=m, num_graphs=k, x=x, edge_x=edge_x, max_type=int(sizes[:, 6].max()),
               **_fields(edges, nodes, gptr))
    if any(p.node_order is not None for p in parts):     # each part's rows hold its nodes, offset
        union._set(node_order=_readonly(np.concatenate(
            [(np.arange(p.num_nodes) if p.node_order is None else p.node_order) + f
             for p, f in zip(parts, first[:, 0].astype(np.int64))])))
    return union


class GraphPool:
    """Graphs checked once and batched many times (a data set's items):
    `pool.take(items)` is `batch([graphs[k] for k in items])`, the same Graph
    bit for bit, assembled in C from blocks joined once here (each item's rows
    copied with its offsets in the union: a batch's cost follows its nodes and
    edges). The graphs must carry the same kinds of data."""

    __slots__ = ("graphs", "_counts", "_starts", "_max_type", "_edges", "_nodes", "_x", "_edge_x")

    def __init__(self, graphs: Iterable):
        parts = [as_graph(g) for g in graphs]
        if not parts:
            raise ValueError("cannot batch an empty list of graphs")
        if any(p.node_order is not None for p in parts):
            raise ValueError("a GraphPool takes graphs in node order: pool the graphs as they are, and "
                             "reorder a batch (pool.take(items).reordered()) if it is worth it")
        sizes = np.frombuffer(b"".join([p._sizes for p in parts]), np.int64).reshape(len(parts), -1)
        _check_batchable(sizes)
        self.graphs = parts
        self._counts = np.ascontiguousarray(sizes[:, :3])              # nodes, edges, graphs of each
        self._starts = np.cumsum(self._counts, axis=0) - self._counts   # where each one's rows are here
        self._max_type = np.ascontiguousarray(sizes[:, 6])
        self._edges = np.concatenate([p._edges for p in parts], axis=1)
        self._nodes = np.concatenate([p._nodes for p in parts], axis=1)
        self._x = np.concatenate([p.x for p in parts]) if parts[0].x is not None else None
        self._edge_x = np.concatenate([p.edge_x for p in parts]) if parts[0].edge_x is not None else None

    def __len__(self) -> int:
        return len(self.graphs)

    def take(self, items) -> Graph:
        """The disjoint union of these items, in this order (`batch` of them)."""
        idx = _indices(items, len(self.graphs))
        if len(idx) == 1:
            return self.graphs[idx[0]]
        return self._assembled(idx)

    def take_many(self, batches) -> list[Graph]:
        """`[self.take(items) for items in batches]`, every batch checked before any
        is made (an epoch's batches, a chunk at a time)."""
        checked = [_indices(b, len(self.graphs)) for b in batches]
        return [self.graphs[idx[0]] if len(idx) == 1 else self._assembled(idx) for idx in checked]

    def _assembled(self, idx: np.ndarray) -> Graph:
        """The union of items `idx` (checked), its blocks made in C (runtime/sc_pools.c:
        each item's rows copied plus its offsets in the union, as `batch` makes them)."""
        edges, nodes, gptr, order, x, edge_x, n, m, k, max_type = _runtime.graph_take(
            self._counts, self._starts, self._edges, self._nodes, idx, self._x, self._edge_x, self._max_type)
        edges = np.frombuffer(edges, np.int32).reshape(len(self._edges), m)
        nodes = np.frombuffer(nodes, np.int32).reshape(4, n + 1)
        arrays = dict(zip(_EDGE_ROWS, edges))
        arrays.update(zip(_NODE_ROWS, nodes))
        arrays.update(graph=nodes[3, :n], gnode=nodes[2, :n], gptr=np.frombuffer(gptr, np.int32))
        del arrays["order"]
        union = object.__new__(Graph)
        union._set(num_nodes=n, num_edges=m, num_graphs=k,
                   x=np.frombuffer(x, np.float32).reshape(n, self._x.shape[1]) if x is not None else None,
                   edge_x=(np.frombuffer(edge_x, np.float32).reshape(m, self._edge_x.shape[1])
                           if edge_x is not None else None),
                   max_type=max_type, _edges=edges, _nodes=nodes[:, :n], arrays=arrays,
                   order=np.frombuffer(order, np.int64))
        return union


def _indices(items, size: int) -> np.ndarray:
    """`items` as int64 positions in a pool of `size` (a clear error otherwise; the C
    side checks each against the pool, so only a single item is checked here)."""
    idx = _positions(items, "cannot batch an empty list of items")
    if len(idx) == 1 and not 0 <= idx[0] < size:
        raise ValueError(f"item {int(idx[0])} is outside the pool's [0, {size})")
    return idx


def _check_batchable(sizes: np.ndarray) -> None:
    """Do the parts carry the same kinds of data (features of one width, edge
    types or not)? `sizes`: the parts' `_sizes`, one row each."""
    for what, widths in (("x", sizes[:, 3]), ("edge_x", sizes[:, 4])):
        if widths.min() < 0 <= widths.max():
            raise ValueError(f"cannot batch graphs where only some have {what}")
        if widths.min() != widths.max():
            raise ValueError(f"cannot batch graphs whose {what} differ in width")
    if sizes[:, 5].min() != sizes[:, 5].max():
        raise ValueError("cannot batch graphs where only some have edge types")


# -- from what a user passes to what native code reads -----------------------------

_NX_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _fingerprint(parts: dict) -> bytes | None:
    """A digest of everything a Graph is built from (None when some part is not
    plain numbers, e.g. objects, which cannot be hashed by their bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for key, value in parts.items():
        arr = None if value is None else np.asarray(value)
        if arr is not None and arr.dtype.kind not in "biuf":
            return None
        h.update(repr((key, None if arr is None else (arr.dtype.str, arr.shape))).encode())
        if arr is not None:
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.digest()


def _from_networkx_cached(G) -> Graph:
    """G converted, reusing the last conversion when G still reads the same:
    edges, node order and attributes are read and fingerprinted on every call,
    so a change made in place (a feature, a rewired edge) is never missed."""
    parts = _networkx_parts(G)
    key = _fingerprint(parts)
    try:
        hit = _NX_CACHE.get(G)
    except TypeError:                       # not weakly referenceable: no cache
        return Graph(**parts)
    if hit is not None and key is not None and hit[0] == key:
        return hit[1]
    g = Graph(**parts)
    _NX_CACHE[G] = (key, g)
    return g


def as_graph(value) -> Graph:
    """A Graph from a Graph, a networkx graph (cached while unchanged), a dict
    of Graph's arguments, or a list of graphs (batched)."""
    if isinstance(value, Graph):
        return value
    if hasattr(value, "is_directed") and hasattr(value, "nodes"):
        return _from_networkx_cached(value)
    if isinstance(value, Mapping):
        return Graph(**value)
    if isinstance(value, (list, tuple)):
        return batch(value)
    raise TypeError(f"expected a graph: a structc.Graph, a networkx graph, a dict of Graph's arguments "
                    f"or a list of graphs, got {type(value).__name__}")


class _GraphSpec:
    """One graph input's declaration, with what binding a Graph to it needs
    worked out once (its arrays' names, its size symbols, the cache key)."""

    __slots__ = ("spec", "name", "roles", "dims", "key")

    def __init__(self, spec: dict):
        self.spec, self.name = spec, spec["name"]
        self.roles = tuple(spec["arrays"].items())          # (role, input name), "x" and "e" included
        sizes = spec["sizes"]
        self.dims = (sizes["nodes"], sizes["edges"], sizes["graphs"], sizes["nodes"] + "+1", sizes["graphs"] + "+1")
        self.key = (self.name, spec["features"], spec["edge_features"], spec["edge_types"], self.roles, self.dims)

    def bind(self, g: "Graph") -> tuple[dict, dict]:
        """The model's arrays and sizes for graph `g`, checked and made once per
        Graph: a Graph never changes (a changed one is a new object), and the
        arrays handed out are views of its own that no caller holds, so nobody
        can reshape or retype what was checked (numpy lets anyone set `.shape`
        or `.dtype` on a read-only array in place)."""
        bound = g._bound.get(self.key)
        if bound is None:
            Binder._check(self.spec, g)
            have = dict(g.arrays, x=g.x, e=g.edge_x)
            arrays = {name: (None if have[role] is None else have[role].view())
                      for role, name in self.roles if role in have}
            # Sizes from the checked arrays themselves, which nothing can change.
            nodes, edges, graphs = (len(g.arrays["gnode"]), len(g.arrays["src"]), len(g.arrays["gptr"]) - 1)
            bound = g._bound[self.key] = (arrays, dict(zip(self.dims, (nodes, edges, graphs, nodes + 1,
                                                                        graphs + 1))))
        return bound


def _rows_in(value, order: np.ndarray, name: str, per: str) -> np.ndarray:
    """`value`'s rows in `order` (the input `name` has one row per `per`)."""
    arr = np.asarray(value)
    if arr.ndim == 0 or arr.shape[0] != len(order):
        raise ValueError(f"input '{name}': expected one row per {per} ({len(order)}), got shape {arr.shape}")
    return arr[order]


def _rows_of_nodes(value, g: Graph):
    """Node ids `value` as the rows of reordered graph `g` that hold those nodes; an id
    that is not a node stays as it is, for the call's index check to refuse."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu":
        return value                        # not ids: the call's input checks say so
    place = g._bound.get("rows of nodes")
    if place is None:
        place = np.empty(g.num_nodes, np.int64)
        place[g.node_order] = np.arange(g.num_nodes)
        g._bound["rows of nodes"] = place
    inside = (arr >= 0) & (arr < g.num_nodes)
    return np.where(inside, place[np.where(inside, arr, 0)], arr).astype(arr.dtype)


def _edges_in_given_order(g: Graph) -> bool:
    """Whether native code keeps `g`'s edges in the order they were given (sorted by
    destination), worked out once per graph."""
    same = g._bound.get("edges in given order")
    if same is None:
        same = g._bound["edges in given order"] = bool(np.array_equal(g.order, np.arange(len(g.order))))
    return same


class Binder:
    """Expands graph inputs in a call's keyword arguments (the `Net` hook)."""

    def __init__(self, specs: list[dict], inputs: list[dict] = (), outputs: dict | None = None,
                 index_inputs: Mapping[str, list] | None = None, ids_as_values=(), positions=()):
        self.specs = specs
        self._bound = [_GraphSpec(s) for s in specs]
        self.internal = frozenset(name for s in specs for name in s["arrays"].values())
        #: inputs this binder makes from Graphs: views no caller holds, of data nothing can change,
        #: so a value seen (and checked) before is still as checked (`Net._bind` skips them then)
        self.sealed = self.internal
        # Per-edge inputs and outputs are in the order the edges were given; native
        # code keeps edges in CSR order, so their rows are permuted on the way in and out.
        edges = {s["sizes"]["edges"]: s["name"] for s in specs}
        self.edge_inputs = {i["name"]: edges[i["shape"][0]] for i in inputs
                            if i["kind"] != "graph" and i["shape"] and i["shape"][0] in edges}
        self.edge_outputs = {o["name"]: edges[o["shape"][0]] for o in (outputs or [])
                             if o["shape"] and o["shape"][0] in edges}
        # Per-node ones are in node order; a reordered graph's rows are not (`Graph.reordered`).
        nodes = {s["sizes"]["nodes"]: s["name"] for s in specs}
        arrays = [i for i in inputs if i["kind"] != "graph"]
        self.node_inputs = {i["name"]: nodes[i["shape"][0]] for i in arrays if i["shape"] and i["shape"][0] in nodes}
        self.node_outputs = {o["name"]: nodes[o["shape"][0]] for o in (outputs or [])
                             if o["shape"] and o["shape"][0] in nodes}
        # nodes along another axis: no permutation is worked out for those, so a reordered graph is refused
        self._nodes_inside = {x["name"]: nodes[d] for x in arrays + list(outputs or []) for d in x["shape"][1:]
                              if d in nodes}
        # Integer inputs whose values pick rows of node tensors (`h[pick]`: `compiler.index_inputs`) hold
        # node ids, which become rows on the way in; one that also picks other rows, or whose values are
        # also used otherwise (arithmetic, an output: `compiler.row_id_uses`), cannot, so a
        # reordered graph is refused for it (and a data set keeps the graph in node order).
        picks = {name: [nodes[r] for r in rows if r in nodes] for name, rows in (index_inputs or {}).items()}
        self.node_ids = {name: of[0] for name, of in picks.items()
                         if len(of) == len(index_inputs[name]) == 1 and name not in ids_as_values}
        self._ids_mixed = {name: (of, "are also used as values (arithmetic, an output or labels)"
                                  if name in ids_as_values else "pick other rows too")
                           for name, of in picks.items() if of and name not in self.node_ids}
        # positions computed along the nodes (`argmax` over them: `compiler.computed_positions`) are rows,
        # which are not the nodes of a reordered graph; along the edges, places in CSR order, which are
        # the edges as given only when those were sorted by destination
        self._node_positions = {nodes[d]: d for d in positions if d in nodes}
        self._edge_positions = {edges[d]: d for d in positions if d in edges}
        self._local = threading.local()     # the graphs of this thread's current call

    @classmethod
    def from_meta(cls, meta: dict) -> "Binder | None":
        specs = meta.get("graphs") or []
        outputs = [o for e in meta.get("entries", {}).values() for o in e["outputs"]]
        if not specs:
            return None
        ids = {name: list(rows) for name, rows in meta.get("index_inputs", {}).items()}
        for name, uses in meta.get("index_inputs_in_part", {}).items():     # a block of the input is ids
            ids.setdefault(name, []).extend(rows for rows, _ in uses if rows not in ids.get(name, ()))
        return cls(specs, meta.get("inputs", []), outputs, ids, meta.get("index_inputs_as_values", ()),
                   meta.get("computed_positions", ()))

    def needs_node_order(self, graph: str) -> bool:
        """Whether an input or output has `graph`'s nodes along an axis other than its
        first: `expand` then refuses that graph reordered (`Graph.reordered`)."""
        return (graph in self._nodes_inside.values() or graph in self._node_positions
                or any(graph in of for of, _ in self._ids_mixed.values()))

    def expand(self, given: Mapping[str, object], dims: dict) -> dict:
        if not self.internal.isdisjoint(given):
            name = next(n for n in given if n in self.internal)
            raise TypeError(f"'{name}' is built by structc: pass the whole graph as {name.split('.', 1)[0]}=...")
        out = dict(given)
        last = self._local.graphs = {}
        for spec in self._bound:
            name = spec.name
            if name not in out:
                raise TypeError(f"missing input '{name}': expected a graph (structc.Graph, a networkx graph, "
                                "or a list of graphs)")
            value = out.pop(name)
            try:
                g = value if value.__class__ is Graph else as_graph(value)
            except (TypeError, ValueError) as e:
                raise type(e)(f"input '{name}': {e}") from None
            arrays, sizes = spec.bind(g)
            out.update(arrays)
            dims.update(sizes)
            last[name] = g
        for name, graph in self.edge_inputs.items():
            if name in out and out[name] is not None:
                out[name] = _rows_in(out[name], last[graph].order, name, f"edge of '{graph}'")
        for name, graph in self.node_inputs.items():
            order = last[graph].node_order
            if order is not None and name in out and out[name] is not None:
                out[name] = _rows_in(out[name], order, name, f"node of '{graph}'")
        for name, graph in self.node_ids.items():
            if last[graph].node_order is not None and name in out and out[name] is not None:
                out[name] = _rows_of_nodes(out[name], last[graph])
        for name, graph in self._nodes_inside.items():
            if last[graph].node_order is not None:
                raise ValueError(f"'{name}' has {graph}'s nodes along an axis other than its first, which a "
                                 f"reordered graph does not support: pass {graph} in node order (not reordered())")
        for graph, size in self._node_positions.items():
            if last[graph].node_order is not None:
                raise ValueError(f"the model computes positions along {size} (argmax over {graph}'s nodes), "
                                 f"which are rows, and a reordered graph's rows hold other nodes: pass {graph} in "
                                 "node order (not reordered())")
        for graph, size in self._edge_positions.items():
            if not _edges_in_given_order(last[graph]):
                raise ValueError(f"the model computes positions along {size} (argmax over {graph}'s edges), "
                                 f"which are places in structc's edge order (by destination), not the order "
                                 f"{graph}'s edges were given in: give them sorted by destination")
        for name, (graphs, why) in self._ids_mixed.items():
            for graph in graphs:
                if last[graph].node_order is not None:
                    raise ValueError(f"'{name}' holds ids of {graph}'s nodes that {why}, which a reordered graph "
                                     f"does not support (its rows hold other nodes): pass {graph} in node order "
                                     "(not reordered())")
        return out

    def restore(self, outputs: dict) -> dict:
        """Per-edge outputs back in the order the edges were given, per-node ones in
        node order."""
        graphs = self._local.graphs
        for names, order_of in ((self.edge_outputs, lambda g: g.order), (self.node_outputs, lambda g: g.node_order)):
            for name, graph in names.items():
                order = order_of(graphs[graph])
                if name in outputs and order is not None:
                    back = np.empty_like(outputs[name])
                    back[order] = outputs[name]
                    outputs[name] = back
        return outputs

    @staticmethod
    def _check(spec: dict, g: Graph) -> None:
        name = spec["name"]
        for what, want, have, attr in (("node features", spec["features"], g.x, "x"),
                                       ("edge features", spec["edge_features"], g.edge_x, "edge_x")):
            if not want:
                continue
            if have is None:
                raise ValueError(f"input '{name}': the model declares {what} ({want} per "
                                 f"{'node' if attr == 'x' else 'edge'}), the graph has none "
                                 f"(give {attr}=... when building it)")
            if have.shape[1] != want:
                raise ValueError(f"input '{name}': the model declares {want} {what}, the graph has {have.shape[1]}")
        types = spec["edge_types"]
        if types:
            if "type" not in g.arrays:
                raise ValueError(f"input '{name}': the model declares {types} edge types, the graph has none "
                                 "(give edge_type=... when building it)")
            if g.max_type >= types:
                raise ValueError(f"input '{name}': edge type {g.max_type} is out of range [0, {types})")
