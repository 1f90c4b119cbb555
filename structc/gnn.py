"""Graph inputs in the language: the `graph(...)` type, `g.x` and friends,
aggregation over edges and readout over nodes.

    input  g: graph(features=32, edge_features=4, edge_types=3)
    target y: class[g.nodes] of 4                  # g.nodes, g.edges, g.graphs: sizes per call
    h = g.x                                        # f32[g.nodes, 32]
    m = sum(dense(h, 64) over g.edges)             # Σ over each node's incoming edges
    m = mean(relu(dense(concat(h[g.src], h[g.dst], g.e, axis=1), 64)) over g.edges)
    m = sum(dense(h, 64, per=g.type) over g.edges) # one weight matrix per edge type
    r = max(h over g.nodes)                        # readout: one row per graph

Input: the AST pieces `structc.build` hands over. Output: nodes of the
graph IR, built with the ops of `structc.ops.message`. A graph input becomes
several IR inputs (`g.x`, `g.ptr`, `g.src`, ...: CSR by destination, its
transpose, edge types, the graph of each node), filled per call by
`structc.graphs` from a networkx graph, edge-index arrays or a batch.

A message is a node tensor [g.nodes, F] (read at each edge's source) or an
edge tensor [g.edges, F] (one row per edge). Node messages are never copied
per edge: `sum(x over g.edges)` is one sparse-dense product, and the
`aggregate_first` pass moves a dense layer out of it when that is cheaper.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import syntax as S
from .errors import SnetNameError, SnetShapeError, SnetTypeError, Span
from .graph import Builder, Value
from .types import TensorType

OPTIONS = ("features", "edge_features", "edge_types")
ATTRIBUTES = {
    "x": "node features f32[g.nodes, features]",
    "e": "edge features f32[g.edges, edge_features]",
    "nodes": "the nodes: `sum(h over g.nodes)` is a readout, one row per graph",
    "edges": "the edges: `sum(m over g.edges)` aggregates messages into each edge's destination",
    "graphs": "the graphs of a batch (a size only)",
    "src": "an edge's source: h[g.src] is f32[g.edges, F]",
    "dst": "an edge's destination: h[g.dst] is f32[g.edges, F]",
    "type": "edge types, for per-type weights: dense(h, 64, per=g.type)",
    "in_degree": "incoming edges per node, f32[g.nodes, 1]",
    "out_degree": "outgoing edges per node, f32[g.nodes, 1]",
}
REDUCTIONS = ("sum", "mean", "max")


@dataclass(frozen=True)
class GraphSpec:
    """A declared graph input: its options and the IR inputs it stands for."""
    name: str
    features: int = 0
    edge_features: int = 0
    edge_types: int = 0

    @property
    def sizes(self) -> dict[str, str]:
        g = self.name
        return {"nodes": f"{g}.nodes", "edges": f"{g}.edges", "graphs": f"{g}.graphs"}

    def arrays(self) -> list[tuple[str, TensorType]]:
        """(role, type) of each array the graph arrives as, in call order."""
        n, e, k = (self.sizes[s] for s in ("nodes", "edges", "graphs"))
        out = []
        if self.features:
            out.append(("x", TensorType((n, self.features), "f32")))
        if self.edge_features:
            out.append(("e", TensorType((e, self.edge_features), "f32")))
        out += [("ptr", TensorType((f"{n}+1",), "i32")), ("src", TensorType((e,), "i32")),
                ("ptr_t", TensorType((f"{n}+1",), "i32")), ("dst_t", TensorType((e,), "i32")),
                ("eid_t", TensorType((e,), "i32"))]
        if self.edge_types:
            out += [("type", TensorType((e,), "i32")), ("type_t", TensorType((e,), "i32"))]
        out += [("gptr", TensorType((f"{k}+1",), "i32")), ("gnode", TensorType((n,), "i32")),
                ("nptr", TensorType((f"{n}+1",), "i32")), ("graph", TensorType((n,), "i32"))]
        return out

    def __str__(self) -> str:
        opts = [f"{k}={getattr(self, k)}" for k in OPTIONS if getattr(self, k)]
        return f"graph({', '.join(opts)})"

    def meta(self) -> dict:
        return {"name": self.name, "features": self.features, "edge_features": self.edge_features,
                "edge_types": self.edge_types, "arrays": {role: f"{self.name}.{role}" for role, _ in self.arrays()},
                "sizes": self.sizes}


# -- what names evaluate to --------------------------------------------------

class GraphInput:
    """The value of a graph input's name while building."""

    def __init__(self, mb, spec: GraphSpec, ids: dict[str, int]):
        self.mb, self.spec, self.ids = mb, spec, ids

    def __repr__(self) -> str:
        return f"the graph {self.spec.name}"

    def array(self, b: Builder, role: str) -> Value:
        return b.value(self.ids[role])

    def edges(self, b: Builder) -> list[Value]:
        """The edge relation: rows are destinations, columns sources."""
        return [self.array(b, r) for r in ("ptr", "src", "ptr_t", "dst_t", "eid_t")]

    def membership(self, b: Builder) -> list[Value]:
        """Nodes in graphs: rows are graphs, columns nodes (sorted by graph)."""
        return [self.array(b, r) for r in ("gptr", "gnode", "nptr", "graph", "gnode")]

    def types(self, b: Builder) -> list[Value]:
        return [self.array(b, "type"), self.array(b, "type_t")]

    def snet_attr(self, mb, e: S.Attr):
        g = self.spec.name
        b = Builder(mb.graph, e.span)
        if e.name == "x":
            if not self.spec.features:
                raise SnetTypeError(f"graph {g} has no node features: declare graph(features=...)", e.span)
            return self.array(b, "x")
        if e.name == "e":
            if not self.spec.edge_features:
                raise SnetTypeError(f"graph {g} has no edge features: declare graph(edge_features=...)", e.span)
            return self.array(b, "e")
        if e.name in ("nodes", "edges", "graphs"):
            return Domain(self, e.name)
        if e.name in ("src", "dst"):
            return Endpoint(self, e.name)
        if e.name == "type":
            if not self.spec.edge_types:
                raise SnetTypeError(f"graph {g} has no edge types: declare graph(edge_types=...)", e.span)
            return EdgeTypes(self)
        if e.name in ("in_degree", "out_degree"):
            return b.degree(self.array(b, "ptr" if e.name == "in_degree" else "ptr_t"), power=1.0)
        raise SnetNameError(f"graph {g} has no attribute '{e.name}' (attributes: {', '.join(ATTRIBUTES)})",
                            e.span)


class Domain:
    """g.nodes / g.edges / g.graphs: what `over` ranges over."""

    def __init__(self, graph: GraphInput, kind: str):
        self.graph, self.kind = graph, kind

    def __repr__(self) -> str:
        return f"{self.graph.spec.name}.{self.kind} (something to aggregate over, not a tensor)"


class Endpoint:
    """g.src / g.dst: index a node tensor with it to read it per edge."""

    def __init__(self, graph: GraphInput, end: str):
        self.graph, self.end = graph, end

    def __repr__(self) -> str:
        return f"{self.graph.spec.name}.{self.end} (an index: write h[{self.graph.spec.name}.{self.end}])"

    def snet_index(self, mb, base, e: S.Index):
        g = self.graph.spec
        if not isinstance(base, Value):
            raise SnetTypeError(f"only a node tensor can be read at {g.name}.{self.end}, got {_show(base)}", e.span)
        _node_tensor(base, g, e.span, S.unparse(e))
        b = Builder(mb.graph, e.span)
        return b.gather_edges(*self.graph.edges(b), base, end=self.end)


class EdgeTypes:
    """g.type: the `per=` option of a layer that has one weight per edge type."""

    def __init__(self, graph: GraphInput):
        self.graph = graph

    def __repr__(self) -> str:
        return f"{self.graph.spec.name}.type (edge types: use as dense(h, units, per={self.graph.spec.name}.type))"

    def snet_dense(self, ctx, x, units, *, bias, init, name) -> "TypedMessage":
        """dense(x, units, per=g.type), called by the layer library's `dense`."""
        return typed_dense(ctx, x, units, self, bias=bias, init=init, name=name)


@dataclass
class TypedMessage:
    """dense(x, units, per=g.type): x W_t + b_t for an edge of type t, built
    when it is aggregated (aggregate first, then one matmul with the stacked
    weights)."""
    graph: GraphInput
    x: Value
    w: Value           # [types * in, units]: block t is W_t
    b: Value | None    # [types, units]
    span: Span

    def __repr__(self) -> str:
        return ("a per-edge-type message (dense(..., per=g.type)): aggregate it with "
                "sum(... over g.edges) or mean(... over g.edges)")


class OverArg:
    """The evaluated `value over domain` argument of an aggregation."""

    def __init__(self, value, domain, span: Span):
        self.value, self.domain, self.span = value, domain, span

    def __repr__(self) -> str:
        return "`value over domain` (an argument of sum, mean, max or gat)"

    def snet_edges(self, ctx, layer: str) -> tuple[Value, list[Value]]:
        """For a layer over a graph's edges (`gat(h over g.edges, ...)`): the
        node tensor and the edge relation; what the layer cannot attend over is
        refused here, at the argument's span."""
        domain, value = self.domain, self.value
        if not isinstance(domain, Domain) or domain.kind != "edges":
            raise SnetTypeError(f"{layer} attends over a graph's edges (h over g.edges), got over {_show(domain)}"
                                + ("; for a readout use sum, mean or max over g.nodes"
                                   if isinstance(domain, Domain) else ""), self.span)
        spec = domain.graph.spec
        if isinstance(value, TypedMessage):
            raise SnetTypeError(f"{layer}: per-edge-type weights (dense(..., per=g.type)) are not supported; "
                                f"attend over a node tensor", self.span)
        if isinstance(value, Value) and value.type.rank == 2 and value.shape[0] == spec.sizes["edges"]:
            raise SnetTypeError(f"{layer}: edge tensors (edge features) are not supported; attend over a node "
                                f"tensor f32[{spec.sizes['nodes']}, F]", self.span)
        if not isinstance(value, Value):
            raise SnetTypeError(f"{layer}: attends over a node tensor, got {_show(value)}", self.span)
        _node_tensor(value, spec, self.span, layer)
        return value, domain.graph.edges(ctx.b)


def _show(v) -> str:
    return f"a tensor {v.type}" if isinstance(v, Value) else repr(v)


def _node_tensor(v: Value, spec: GraphSpec, span: Span, what: str) -> int:
    n = spec.sizes["nodes"]
    if v.type.rank != 2 or v.shape[0] != n or not isinstance(v.shape[1], int) or not v.type.is_float:
        raise SnetShapeError(f"{what}: expected a node tensor f32[{n}, features], got {v.type}", span)
    return v.shape[1]


# -- declarations --------------------------------------------------------------

def declare_graph(mb, s: S.InputDecl) -> None:
    """`input g: graph(...)`: the IR inputs, the size symbols, the name."""
    from .build import InputSpec
    from .ops import REGISTRY
    if s.kind != "input":
        raise SnetTypeError("a graph is an input, not a target: declare the labels separately, "
                            "e.g. `target y: class[g.nodes] of 4`", s.type.span)
    values = {}
    for kw in s.type.options:
        if kw.name not in OPTIONS:
            raise SnetTypeError(f"graph has no option '{kw.name}' (options: {', '.join(OPTIONS)})", kw.span)
        if kw.name in values:
            raise SnetTypeError(f"graph option '{kw.name}' is given twice", kw.span)
        v = mb.eval(kw.value)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise SnetTypeError(f"graph option {kw.name} must be a non-negative integer, got {_show(v)}", kw.span)
        values[kw.name] = v
    spec = GraphSpec(s.name, **values)
    ids = {}
    for role, t in spec.arrays():
        name = f"{s.name}.{role}"
        ids[role] = mb.graph.add(REGISTRY["input"], (), {"name": name, "kind": "graph", "type": t, "classes": 0},
                                 s.span, type=t)
        mb.graph.inputs[name] = ids[role]
        mb.inputs[name] = InputSpec(name, "graph", t, 0, s.span)
        mb.symbols.update(d for d in t.shape if isinstance(d, str))
    mb.symbols.update(spec.sizes.values())     # g.graphs too: readouts have a row per graph
    mb.define(s.name, s.name_span, GraphInput(mb, spec, ids), rebind=False)
    mb.graphs[s.name] = spec


def check_size(mb, d: S.Dim) -> None:
    """A dimension written g.nodes must name a size of a graph declared before."""
    base, _, attr = d.value.partition(".")
    value = mb.env.get(base)
    if not isinstance(value, GraphInput):
        what = "not defined yet" if value is None else "not a graph input"
        raise SnetNameError(f"'{d.value}': '{base}' is {what}; sizes like g.nodes belong to a graph input "
                            "declared earlier", d.span)
    if attr not in value.spec.sizes:
        raise SnetNameError(f"'{d.value}': a graph's sizes are {', '.join(f'{base}.{k}' for k in value.spec.sizes)}",
                            d.span)


# -- dense(..., per=g.type) ---------------------------------------------------------

def typed_dense(ctx, x, units, per, *, bias, init, name) -> TypedMessage:
    if not isinstance(per, EdgeTypes):
        raise SnetTypeError(f"dense: per= takes a graph's edge types (per=g.type), got {_show(per)}", ctx.span)
    spec = per.graph.spec
    ctx.expect_tensor(x, "dense")
    width = _node_tensor(x, spec, ctx.span, "dense(..., per=...)")
    units = ctx.expect_int(units, "units")
    layer = ctx.layer_name("dense", name)
    types = spec.edge_types
    w = ctx.param(f"{layer}.w", TensorType((types * width, units)), init)
    b = ctx.param(f"{layer}.b", TensorType((types, units)), "zeros") if ctx.expect_bool(bias, "bias") else None
    return TypedMessage(per.graph, x, w, b, ctx.span)


# -- aggregation -----------------------------------------------------------------------

def aggregate(ctx, func: str, args: list, kwargs: dict, e: S.Call) -> Value:
    """sum / mean / max of `value over domain`."""
    over = args[0] if args else None
    if len(args) != 1 or not isinstance(over, OverArg):
        raise SnetTypeError(f"{func}: write one argument `value over g.edges` (or g.nodes)", e.span)
    if func not in REDUCTIONS:
        raise SnetNameError(f"'{func}' does not aggregate over a graph; use sum, mean or max", e.func_span)
    domain = over.domain
    if not isinstance(domain, Domain) or domain.kind == "graphs":
        raise SnetTypeError(f"{func}: `over` takes a graph's edges or nodes (g.edges, g.nodes), got {_show(domain)}",
                            over.span)
    if domain.kind == "nodes":
        if kwargs:
            raise SnetTypeError(f"{func} over {domain.graph.spec.name}.nodes has no options "
                                f"(got {', '.join(kwargs)})", e.span)
        return _readout(ctx, func, over, domain.graph)
    options = {"self_loops": False, "norm": "none"}
    for k, v in kwargs.items():
        if k not in options:
            raise SnetTypeError(f"{func} over edges has no option '{k}' (options: self_loops, norm)", e.span)
        options[k] = v
    self_loops = ctx.expect_bool(options["self_loops"], "self_loops")
    norm = getattr(options["norm"], "text", options["norm"])
    if norm not in ("none", "gcn"):
        raise SnetTypeError(f"{func}: norm must be gcn (symmetric degree normalisation) or none, got {_show(norm)}",
                            e.span)
    if norm == "gcn" and func != "sum":
        raise SnetTypeError(f"{func}: norm=gcn normalises a sum; {func} normalises itself", e.span)
    graph = domain.graph
    value = over.value
    if isinstance(value, TypedMessage):
        return _typed(ctx, func, value, graph, self_loops, norm, over.span)
    if not isinstance(value, Value):
        raise SnetTypeError(f"{func}: a message must be a tensor, got {_show(value)}", over.span)
    spec = graph.spec
    n, m = spec.sizes["nodes"], spec.sizes["edges"]
    if value.type.rank != 2 or value.shape[0] not in (n, m) or not isinstance(value.shape[1], int) \
            or not value.type.is_float:
        raise SnetShapeError(f"{func}: a message is a node tensor f32[{n}, F] (read at each edge's source) or an "
                             f"edge tensor f32[{m}, F], got {value.type}", over.span)
    b = ctx.b
    rel = graph.edges(b)
    if value.shape[0] == n:
        return _node_messages(b, func, rel, value, self_loops, norm)
    if self_loops:
        raise SnetTypeError(f"{func}: self_loops needs node messages (an edge tensor has no row for a self loop)",
                            e.span)
    return _edge_messages(b, func, rel, value, norm)


def _node_messages(b: Builder, func, rel, x: Value, self_loops: bool, norm: str) -> Value:
    ptr = rel[0]
    if func == "max":
        a = b.max_index(*rel, x, source="node", self_loops=self_loops)
        return b.take_index(*rel, a, x, source="node", self_loops=self_loops)
    if func == "mean":
        d = b.degree(ptr, power=-1.0, plus=int(self_loops))
        return b.spmm(*rel, d, x, self_loops=self_loops, norm="mean")
    if norm == "gcn":
        d = b.degree(ptr, power=-0.5, plus=int(self_loops))
        return b.spmm(*rel, d, x, self_loops=self_loops, norm="gcn")
    return b.spmm(*rel, x, self_loops=self_loops)


def _edge_messages(b: Builder, func, rel, m: Value, norm: str) -> Value:
    ptr = rel[0]
    if func == "max":
        a = b.max_index(*rel, m, source="edge")
        return b.take_index(*rel, a, m, source="edge")
    if func == "mean":
        return b.sum_edges(*rel, m) * b.degree(ptr, power=-1.0)
    if norm == "gcn":
        d = b.degree(ptr, power=-0.5)
        return b.sum_edges(*rel, m * b.gather_edges(*rel, d, end="src")) * d
    return b.sum_edges(*rel, m)


def _typed(ctx, func, msg: TypedMessage, graph: GraphInput, self_loops, norm, span) -> Value:
    if msg.graph is not graph:
        raise SnetTypeError(f"{func}: the message has per-type weights for graph {msg.graph.spec.name}, "
                            f"but aggregates over {graph.spec.name}", span)
    if func == "max" or self_loops or norm != "none":
        raise SnetTypeError(f"{func}: per-edge-type messages aggregate with sum or mean, without self_loops or "
                            "norm (add a self connection as its own dense layer)", span)
    b = ctx.b
    types = graph.spec.edge_types
    rel, kinds = graph.edges(b), graph.types(b)
    x = msg.x
    n, width = x.shape
    agg = b.spmm_typed(*rel, *kinds, x, types=types)                 # [n, types * width]
    count = None
    if func == "mean" or msg.b is not None:
        ones = b.broadcast_to(b.const(1.0), shape=(n, 1))
        count = b.spmm_typed(*rel, *kinds, ones, types=types)        # [n, types]: edges of each type
    if func == "mean":
        inv = 1.0 / b.maximum(count, 1.0)
        per_type = b.reshape(agg, shape=(n, types, width)) * b.reshape(inv, shape=(n, types, 1))
        agg = b.reshape(per_type, shape=(n, types * width))
        count = count * inv                                          # 1 where a type is present
    y = b.matmul(agg, msg.w)
    if msg.b is not None:
        y = y + b.matmul(count, msg.b)
    return y


def _readout(ctx, func, over: OverArg, graph: GraphInput) -> Value:
    value = over.value
    if not isinstance(value, Value):
        raise SnetTypeError(f"{func}: a readout reads a node tensor, got {_show(value)}", over.span)
    _node_tensor(value, graph.spec, over.span, f"{func} over {graph.spec.name}.nodes")
    b = ctx.b
    rel = graph.membership(b)
    if func == "max":
        a = b.max_index(*rel, value)
        return b.take_index(*rel, a, value)
    if func == "mean":
        return b.spmm(*rel, b.degree(rel[0], power=-1.0), value, norm="mean")
    return b.spmm(*rel, value)
