"""The graph IR: op nodes and the edges between them, printed like a jaxpr.

Each node's ordered `inputs` tuple is the truth; the edges are derived from
it, one per pair of nodes (`mul(x, x)` is one edge, two operands), kept as
dicts of users and of operands, as a `networkx.DiGraph` keeps them (`g.nx`
gives one, for networkx's algorithms). Walks are deterministic (`topo`:
networkx's `lexicographical_topological_sort` order) so dumps and cache keys
are stable.

`Builder` is how graphs are grown: by the front end, by autodiff and by VJP
rules, which read like maths thanks to `Value`'s operators.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

from .errors import ShapeMismatch, SnetShapeError, SnetTypeError, Span
from .types import TensorType

F32_MAX = 3.4028234663852886e38     # the largest finite float32


@dataclass
class Node:
    id: int
    op: "Op"  # noqa: F821 (structc.ops.base.Op; imported lazily to keep layers one-way)
    inputs: tuple[int, ...]
    attrs: dict[str, Any]
    type: TensorType
    span: Span | None = None

    @property
    def shape(self):
        return self.type.shape


@dataclass
class Group:
    """Nodes lowered together as one kernel (set by the `fuse` pass).

    `anchor` is the node whose loop nest the others ride in (a matmul, a
    reduction, or the first elementwise node); `outputs` are the members
    whose values must be stored because something outside the group reads them.
    """
    id: int
    kind: str
    members: list[int]
    anchor: int
    outputs: list[int] = field(default_factory=list)
    #: members that sum a member over the whole iteration space (a loss)
    reductions: list[int] = field(default_factory=list)
    #: a cell's gate math (an `lstm_gates` or `lstm_state` member) run as the
    #: epilogue of this group's product of its gates (`fuse`, rule 7)
    gate: int | None = None


class Graph:
    def __init__(self, name: str = "model"):
        self.name = name
        # node -> {user: None} and node -> {operand: None}: a DiGraph's `_succ` and `_pred`,
        # without networkx (~0.16 s to import, and most of the passes' time in its calls)
        self._succ: dict[int, dict[int, None]] = {}
        self._pred: dict[int, dict[int, None]] = {}
        self.nodes: dict[int, Node] = {}
        self.inputs: dict[str, int] = {}    # inputs and targets, by name
        self.params: dict[str, int] = {}
        self.outputs: dict[str, int] = {}   # ordered: what an entry point returns
        self.groups: list[Group] = []
        self._ids = itertools.count()
        self._order: list[int] | None = None    # `topo`, kept until the edges change

    # -- growing ---------------------------------------------------------
    def add(self, op, inputs: Iterable[int] = (), attrs: dict | None = None,
            span: Span | None = None, type: TensorType | None = None) -> int:
        inputs = tuple(inputs)
        attrs = dict(attrs or {})
        if type is None:
            try:
                type = op.infer(*(self.nodes[i].type for i in inputs), **attrs)
            except ShapeMismatch as e:
                raise SnetShapeError(f"{op.name}: {e}", span) from None
        nid = next(self._ids)
        self.nodes[nid] = Node(nid, op, inputs, attrs, type, span)
        self._succ[nid], self._pred[nid] = {}, {}
        self._order = None
        for i in inputs:
            self._link(i, nid)
        return nid

    def _link(self, a: int, b: int) -> None:
        """The edge a -> b (`verify` finds an operand that is not a node); callers reset `_order`."""
        if a not in self._succ:
            self._succ[a], self._pred[a] = {}, {}
        self._succ[a][b] = None
        self._pred[b][a] = None

    def set_inputs(self, nid: int, inputs: tuple[int, ...]) -> None:
        node = self.nodes[nid]
        self._order = None
        for i in set(node.inputs) - set(inputs):
            del self._succ[i][nid], self._pred[nid][i]
        node.inputs = tuple(inputs)
        for i in inputs:
            self._link(i, nid)

    def replace_uses(self, old: int, new: int) -> None:
        self.replace_all_uses({old: new})

    def replace_all_uses(self, new_of: dict[int, int]) -> None:
        """`replace_uses(old, new)` for every pair, each user relinked once: an
        optimizer's update reads every gradient, and relinking it per replaced
        gradient was quadratic in the layers."""
        for u in dict.fromkeys(u for old in new_of for u in self._succ[old]):     # in order, once each
            self.set_inputs(u, tuple(new_of.get(i, i) for i in self.nodes[u].inputs))
        if not new_of.keys().isdisjoint(self.outputs.values()):    # scanned in C: an output per parameter
            for k, v in self.outputs.items():
                if v in new_of:
                    self.outputs[k] = new_of[v]

    def remove(self, nid: int) -> None:
        self._order = None
        for u in self._succ.pop(nid):
            del self._pred[u][nid]
        for i in self._pred.pop(nid):
            del self._succ[i][nid]
        del self.nodes[nid]

    # -- reading ---------------------------------------------------------
    def topo(self) -> list[int]:
        """The nodes in topological order, the smallest ready id first (the order
        of `nx.lexicographical_topological_sort`)."""
        if self._order is None:
            self._order = _ordered(self._succ, self._pred)
            if self._order is None:
                raise ValueError("graph has a cycle")
        return list(self._order)

    def users(self, nid: int) -> list[int]:
        return sorted(self._succ[nid])

    def ancestors(self, nid: int) -> set[int]:
        """Every node `nid` is computed from (`nx.ancestors`)."""
        return self.reachable([nid], backwards=True) - {nid}

    def reachable(self, sources: Iterable[int], backwards: bool = False) -> set[int]:
        """The sources and every node reachable from them: along the edges to
        their users, or `backwards` to their operands. One walk for them all."""
        edges = self._pred if backwards else self._succ
        seen, todo = set(sources), list(sources)
        while todo:
            for i in edges[todo.pop()]:
                if i not in seen:
                    seen.add(i)
                    todo.append(i)
        return seen

    @property
    def nx(self):
        """The edges as a new `networkx.DiGraph`, for networkx's algorithms
        (drawing, exports); changing it changes nothing here."""
        import networkx as nx
        g = nx.DiGraph()
        g.add_nodes_from(self._succ)
        g.add_edges_from((a, b) for a, users in self._succ.items() for b in users)
        return g

    def live_roots(self) -> set[int]:
        """Nodes that must survive DCE: outputs and the model's interface."""
        return set(self.outputs.values()) | set(self.params.values()) | set(self.inputs.values())

    def copy(self) -> "Graph":
        g = Graph(self.name)
        g._succ = {k: dict(v) for k, v in self._succ.items()}
        g._pred = {k: dict(v) for k, v in self._pred.items()}
        # Node(...) rather than dataclasses.replace: a compile copies every graph several times
        g.nodes = {k: Node(n.id, n.op, n.inputs, dict(n.attrs), n.type, n.span) for k, n in self.nodes.items()}
        g.inputs, g.params, g.outputs = dict(self.inputs), dict(self.params), dict(self.outputs)
        g.groups = [replace(gr, members=list(gr.members), outputs=list(gr.outputs), reductions=list(gr.reductions))
                    for gr in self.groups]
        g._ids = itertools.count(max(self.nodes, default=-1) + 1)
        g._order = self._order
        return g

    def group_of(self) -> dict[int, Group]:
        return {m: gr for gr in self.groups for m in gr.members}

    def verify(self) -> None:
        """Structural invariants every pass must keep."""
        self._order = _ordered(self._succ, self._pred)     # what the next pass's `topo` reads
        assert self._order is not None, "graph has a cycle"
        pred = self._pred
        for nid, node in self.nodes.items():
            into = pred.get(nid, ())
            for i in node.inputs:
                assert i in self.nodes, f"%{nid} reads missing %{i}"
                assert i in into, f"edge %{i}->%{nid} missing"
        for name, nid in {**self.outputs, **self.params, **self.inputs}.items():
            assert nid in self.nodes, f"{name} points at missing %{nid}"

    def __str__(self) -> str:
        return format_graph(self)


def _ordered(succ: dict, pred: dict) -> list[int] | None:
    """Kahn's algorithm over the edges (users and operands of each node), a heap
    of ready node ids: nodes are ints, so this is networkx's lexicographical
    order. None when there is a cycle."""
    waiting = {v: len(p) for v, p in pred.items()}
    ready = [v for v, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        v = heapq.heappop(ready)
        order.append(v)
        for u in succ[v]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    return order if len(order) == len(waiting) else None


def format_attr(v: Any) -> str:
    if isinstance(v, Graph):
        return f"<graph {v.name}>"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def format_node(node: Node) -> str:
    attrs = node.op.describe(node.attrs)
    args = ", ".join(f"%{i}" for i in node.inputs)
    text = f"%{node.id} = {node.op.name}{f'[{attrs}]' if attrs else ''}({args}) : {node.type}"
    if node.span is not None:
        text = f"{text:<72}  # {node.span.file.rsplit('/', 1)[-1]}:{node.span.line}:{node.span.col}"
    return text


def format_graph(g: Graph) -> str:
    """One node a line; after fusion, each group as a block in execution
    order, its stored outputs listed in the header."""
    lines = [f"graph {g.name} {{"]
    if not g.groups:
        lines += ["  " + format_node(g.nodes[nid]) for nid in g.topo()]
    else:
        grouped = g.group_of()
        lines += ["  " + format_node(g.nodes[nid]) for nid in g.topo() if nid not in grouped]
        for gr in g.groups:
            outs = ", ".join(f"%{m}" for m in gr.outputs)
            sums = f", reduces to {', '.join(f'%{m}' for m in gr.reductions)}" if gr.reductions else ""
            lines.append(f"  group {gr.id} ({gr.kind}{sums}) -> {outs} {{")
            lines += ["    " + format_node(g.nodes[m]) for m in gr.members]
            lines.append("  }")
    for name, nid in g.outputs.items():
        lines.append(f"  return {name} = %{nid}")
    # sub-graphs held by nodes (a recursion's node case, its VJP), each once
    seen: set[int] = set()
    for nid in g.topo():
        for key, v in sorted(g.nodes[nid].attrs.items()):
            if isinstance(v, Graph) and id(v) not in seen:
                seen.add(id(v))
                lines.append(f"  where %{nid}.{key} =")
                lines += ["    " + line for line in format_graph(v).splitlines()]
    lines.append("}")
    return "\n".join(lines)


class Value:
    """A handle on a node while building, with operators that add op nodes."""
    __slots__ = ("b", "id")

    def __init__(self, b: "Builder", nid: int):
        self.b, self.id = b, nid

    @property
    def node(self) -> Node:
        return self.b.graph.nodes[self.id]

    @property
    def type(self) -> TensorType:
        return self.node.type

    @property
    def shape(self):
        return self.node.type.shape

    def __add__(self, o): return self.b.add(self, o)
    def __radd__(self, o): return self.b.add(o, self)
    def __sub__(self, o): return self.b.sub(self, o)
    def __rsub__(self, o): return self.b.sub(o, self)
    def __mul__(self, o): return self.b.mul(self, o)
    def __rmul__(self, o): return self.b.mul(o, self)
    def __truediv__(self, o): return self.b.div(self, o)
    def __rtruediv__(self, o): return self.b.div(o, self)
    def __neg__(self): return self.b.neg(self)
    def __matmul__(self, o): return self.b.matmul(self, o)

    def __repr__(self) -> str:
        return f"Value(%{self.id}: {self.type})"


class Builder:
    """Adds nodes to a graph; `b.relu(x)`, `b.matmul(a, w, tb=True)`, `x * y`.

    Every node added gets the builder's current `span`, so nodes made while
    differentiating a source expression still point at that expression.
    """

    def __init__(self, graph: Graph, span: Span | None = None, vector_width: int = 16):
        self.graph = graph
        self.span = span
        self.vector_width = vector_width    # the target's lanes, for the rewrites that depend on it (legalize)

    def value(self, nid: int) -> Value:
        return Value(self, nid)

    def const(self, v: float, dtype: str = "f32") -> Value:
        from .ops import REGISTRY
        if dtype == "f32" and not abs(v) <= F32_MAX:     # it would be inf (or NaN) in the native code
            raise SnetTypeError("number too large for f32 (the largest is about 3.4e38)", self.span)
        return Value(self, self.graph.add(REGISTRY["const"], (), {"value": float(v), "dtype": dtype},
                                          self.span))

    def _as_value(self, x) -> Value:
        if isinstance(x, Value):
            return x
        if isinstance(x, (int, float)):
            return self.const(x)
        raise TypeError(f"not a graph value: {x!r}")

    def apply(self, opname: str, *args, **attrs) -> Value:
        from .ops import REGISTRY
        op = REGISTRY[opname]
        ids = [self._as_value(a).id for a in args]
        return Value(self, self.graph.add(op, ids, attrs, self.span))

    def __getattr__(self, opname: str):
        from .ops import REGISTRY
        if opname not in REGISTRY:
            raise AttributeError(opname)
        return lambda *args, **attrs: self.apply(opname, *args, **attrs)
