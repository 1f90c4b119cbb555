"""ONNX export of a model's forward pass: a compiled `Net` (or a `.snet`
path) in, an ONNX file out, with the parameters' current values as
initializers and each symbolic dimension (the batch `N`) as a dynamic one.

    structc.onnx.export(net, "model.onnx")
    structc.onnx.export("examples/lenet5.snet", "lenet5.onnx", params="lenet5.npz")

The forward graph (before structc's own passes: ONNX runtimes fuse for
themselves) is translated node by node, through `_TRANSLATE` (one function
per op). Ops ONNX cannot express, recursion over trees and message passing
over graph inputs, are refused with an `OnnxExportError` naming each of them
at its source span. Needs the `onnx` package (`pip install 'structc[onnx]'`).
"""
from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .errors import SnetError
from .interop import forward_graph_of

#: ONNX operator set written (every op used here has had its current form since 13-17)
OPSET = 17
#: the IR version that goes with opset 17, read by onnxruntime 1.12 and later
IR_VERSION = 8

_ONNX_DTYPES = {"f32": "FLOAT", "f64": "DOUBLE", "i32": "INT32", "i64": "INT64"}
_NP_DTYPES = {"f32": np.float32, "f64": np.float64, "i32": np.int32, "i64": np.int64}

# Op families with no ONNX counterpart, by the ops module that defines them.
_INEXPRESSIBLE = {
    "tree": "a recursion (`rec`) over a tree or a sequence: ONNX has no data-dependent recursion",
    "message": "message passing over a graph input: ONNX has no sparse aggregation by graph structure",
}


#: ops that are a kernel's working memory, not a computation a user wrote
_WORKING_MEMORY = frozenset({"scratch"})


class OnnxExportError(SnetError):
    """The model uses an op that cannot be written as ONNX."""


def export(net_or_path, path, *, model: str | None = None, params=None, source: str | None = None):
    """Write the forward pass of `net_or_path` to the ONNX file `path` and
    return the `onnx.ModelProto`.

    `net_or_path` is a compiled `structc.Net` (its current parameters are
    written) or a `.snet` path or source; then `model` picks one of several
    models and `params` (an `.npz` path, or a mapping of every parameter
    name to an array) gives the weights, which are otherwise the initial ones.
    `source` is the `.snet` text a `Net` was compiled from, needed only for a
    `Net` that does not carry it (one loaded with `structc.load`)."""
    onnx = _require_onnx()
    net = _as_net(net_or_path, model, params)
    graph = forward_graph_of(net, source)
    with net._lock:                      # a consistent copy, even while another thread trains
        values = {name: np.array(v, dtype=np.float32) for name, v in net.params.items()}
    proto = translate(graph, values, onnx)
    onnx.checker.check_model(proto, full_check=True)     # types and shapes too: never write a file runtimes refuse
    _save(proto, path)
    return proto


def _require_onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install 'structc[onnx]'") from None
    return onnx


def _as_net(net_or_path, model, params):
    from .model import Net
    if isinstance(net_or_path, Net):
        if params is not None or model is not None:
            raise TypeError("params= and model= go with a .snet path; for a Net, load its parameters "
                            "first (net.load_params(path)) and pass the Net alone")
        return net_or_path
    if not isinstance(net_or_path, (str, os.PathLike)):
        raise TypeError(f"expected a structc.Net or a .snet path, got {type(net_or_path).__name__}")
    from .api import compile as compile_net
    net = compile_net(net_or_path, model)
    if params is None:
        warnings.warn(f"no params given: exporting model {net.name} with its initial, untrained weights",
                      UserWarning, stacklevel=3)
    elif isinstance(params, Mapping):
        _assign_all(net, params)
    else:
        net.load_params(params)
    return net


def _assign_all(net, params: Mapping) -> None:
    """Every parameter of the model, and only those, from a mapping."""
    missing = sorted(set(net.params) - set(params))
    extra = sorted(set(params) - set(net.params))
    if missing or extra:
        raise ValueError("params must name every parameter of the model exactly: "
                         + "; ".join(p for p in (f"missing {missing}" if missing else "",
                                                 f"not in the model {extra}" if extra else "") if p))
    for name in net.params:
        net.params[name] = params[name]


def _save(proto, path) -> None:
    """Write through a fresh temporary file renamed into place, so a failed
    export never leaves half a model (nor writes through a planted link)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(proto.SerializeToString())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# -- translation -------------------------------------------------------------------

def translate(graph, params: dict[str, np.ndarray], onnx=None):
    """An `onnx.ModelProto` computing `graph`'s outputs; `params` by name."""
    onnx = onnx or _require_onnx()
    live = _live_nodes(graph)
    _refuse_inexpressible(graph, live)
    em = _Emitter(graph, onnx)
    for nid in graph.topo():
        if nid in live:
            node = graph.nodes[nid]
            em.names[nid] = _TRANSLATE[node.op.name](em, node, params)
    outputs = [em.value_info(name, graph.nodes[nid].type) for name, nid in graph.outputs.items()]
    for name, nid in graph.outputs.items():
        em.add("Identity", [em.names[nid]], out=name)
    g = onnx.helper.make_graph(em.nodes, graph.name, em.inputs, outputs, em.initializers)
    return onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                  ir_version=IR_VERSION, producer_name="structc")


def _live_nodes(graph) -> set[int]:
    """The nodes the outputs depend on (not the loss, nor the targets it reads)."""
    live: set[int] = set()
    for nid in graph.outputs.values():
        live |= graph.ancestors(nid) | {nid}
    return live


def _refuse_inexpressible(graph, live: set[int]) -> None:
    """One error naming every op that cannot be exported, at its span."""
    bad = [graph.nodes[n] for n in sorted(live) if graph.nodes[n].op.name not in _TRANSLATE]
    if not bad:
        return
    named = [n for n in bad if n.op.name not in _WORKING_MEMORY]
    bad = named or bad      # a recursion's scratch operands are its own: name the recursion
    notes = tuple(dict.fromkeys(f"{n.span or '<no source position>'}: {n.op.name}: {_why(n)}" for n in bad))
    first = bad[0]
    names = sorted({n.op.name for n in bad})
    raise OnnxExportError(f"cannot export to ONNX: the model uses {', '.join(names)} ({_why(first)})",
                          first.span, notes)


def _why(node) -> str:
    family = type(node.op).__module__.rsplit(".", 1)[-1]
    return _INEXPRESSIBLE.get(family, "this op has no ONNX translation in structc yet")


class _Emitter:
    """Accumulates ONNX nodes, initializers and graph inputs."""

    def __init__(self, graph, onnx):
        self.graph, self.onnx = graph, onnx
        self.nodes, self.initializers, self.inputs = [], [], []
        self.names: dict[int, str] = {}            # structc node id -> ONNX value name
        self._count = 0
        self._symbols: dict[str, tuple[str, int]] = {}   # symbol -> (input name, axis) that carries it

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"structc/{hint}_{self._count}"    # "/": never a .snet name, so never an output's

    def add(self, op: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or self.fresh(op.lower())
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [out], **attrs))
        return out

    def constant(self, value, dtype=np.int64, hint: str = "const") -> str:
        name = self.fresh(hint)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def value_info(self, name: str, ttype):
        elem = getattr(self.onnx.TensorProto, _ONNX_DTYPES[ttype.dtype])
        dims = [d if isinstance(d, int) else str(d) for d in ttype.shape]
        return self.onnx.helper.make_tensor_value_info(name, elem, dims)

    def graph_input(self, node) -> str:
        name, ttype = node.attrs["name"], node.type
        self.inputs.append(self.value_info(name, ttype))
        for axis, d in enumerate(ttype.shape):
            if isinstance(d, str):
                self._symbols.setdefault(d, (name, axis))
        return name

    def symbol(self, dim: str) -> str:
        """A 1-D int64 tensor holding the run-time value of symbol `dim`."""
        if dim not in self._symbols:
            raise OnnxExportError(f"cannot export to ONNX: dimension {dim} is not a dimension of any input "
                                  f"the outputs read")
        name, axis = self._symbols[dim]
        return self.add("Shape", [name], start=axis, end=axis + 1)

    def shape(self, dims) -> str:
        """A 1-D int64 tensor of `dims`, symbols read from the inputs at run time."""
        if all(isinstance(d, int) for d in dims):
            return self.constant(list(dims), hint="shape")
        parts = [self.symbol(d) if isinstance(d, str) else self.constant([d], hint="dim") for d in dims]
        return self.add("Concat", parts, axis=0)

    def ins(self, node) -> list[str]:
        return [self.names[i] for i in node.inputs]


def _operands_as(em, node, dtype: str) -> list[str]:
    """The node's operands in `dtype`: ONNX wants one dtype, and structc computes on
    an integer operand in float32 (`relu(k)`, `k * 0.5`, `threshold(k)` of an i32 `k`)."""
    args = []
    for nid, name in zip(node.inputs, em.ins(node)):
        if em.graph.nodes[nid].type.dtype != dtype:
            name = em.add("Cast", [name], to=getattr(em.onnx.TensorProto, _ONNX_DTYPES[dtype]))
        args.append(name)
    return args


def _unary(onnx_op: str):
    return lambda em, node, params: em.add(onnx_op, _operands_as(em, node, node.type.dtype))


def _binary(onnx_op: str):
    return lambda em, node, params: em.add(onnx_op, _operands_as(em, node, node.type.dtype))


def _as_float_mask(onnx_op: str, *, zero_operand: bool = False):
    """A comparison as a 0/1 float tensor, like structc's masks."""
    def tr(em, node, params):
        args = _operands_as(em, node, "f32") + ([em.constant(0.0, dtype=np.float32)] if zero_operand else [])
        return em.add("Cast", [em.add(onnx_op, args)], to=em.onnx.TensorProto.FLOAT)
    return tr


def _input(em, node, params):
    return em.graph_input(node)


def _param(em, node, params):
    name = node.attrs["name"]
    em.initializers.append(em.onnx.numpy_helper.from_array(params[name].astype(np.float32), name))
    return name


def _const(em, node, params):
    return em.constant(node.attrs["value"], dtype=_NP_DTYPES[node.attrs.get("dtype", "f32")])


def _dim(em, node, params):
    """A symbol's value as a float scalar (means divide by it)."""
    scalar = em.add("Squeeze", [em.symbol(node.attrs["dim"])])
    return em.add("Cast", [scalar], to=em.onnx.TensorProto.FLOAT)


def _square(em, node, params):
    (x,) = _operands_as(em, node, node.type.dtype)
    return em.add("Mul", [x, x])


def _matmul(em, node, params):
    a, b = em.ins(node)
    return em.add("Gemm", [a, b], transA=int(bool(node.attrs.get("ta"))), transB=int(bool(node.attrs.get("tb"))))


def _transpose(em, node, params):
    return em.add("Transpose", em.ins(node), perm=[1, 0])


def _reshape(em, node, params):
    (x,) = em.ins(node)
    return em.add("Reshape", [x, em.shape(node.attrs["shape"])], allowzero=1)


def _broadcast_to(em, node, params):
    (x,) = em.ins(node)
    return em.add("Expand", [x, em.shape(node.attrs["shape"])])


def _sum(em, node, params):
    from .ops.reduce import normalize_axes
    (x,) = em.ins(node)
    axes = normalize_axes(node.attrs.get("axes"), em.graph.nodes[node.inputs[0]].type.rank)
    if not axes:
        return em.add("Identity", [x])
    return em.add("ReduceSum", [x, em.constant(list(axes), hint="axes")],
                  keepdims=int(bool(node.attrs.get("keepdims"))))


def _softmax(em, node, params):
    return em.add("Softmax", em.ins(node), axis=-1)


def _concat(em, node, params):
    return em.add("Concat", em.ins(node), axis=node.attrs.get("axis", -1))


def _slice(em, node, params):
    (x,) = em.ins(node)
    a = node.attrs
    return em.add("Slice", [x, em.constant([a["start"]]), em.constant([a["stop"]]), em.constant([a["axis"]])])


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(e) for e in v]


def _conv2d(em, node, params):
    a = node.attrs
    if tuple(_pair(a.get("input_dilation", (1, 1)))) != (1, 1):
        raise OnnxExportError("cannot export to ONNX: conv2d with input dilation (a transposed convolution)",
                              node.span)
    top, bottom, left, right = a.get("padding", (0, 0, 0, 0))
    w = em.graph.nodes[node.inputs[1]].shape
    return em.add("Conv", em.ins(node), kernel_shape=[int(w[2]), int(w[3])], strides=_pair(a.get("stride", 1)),
                  pads=[top, left, bottom, right])


def _pool(onnx_op: str):
    def tr(em, node, params):
        a = node.attrs
        return em.add(onnx_op, em.ins(node), kernel_shape=_pair(a.get("size", 2)), strides=_pair(a.get("stride", 2)))
    return tr


def _gather_rows(em, node, params):
    table, ids = em.ins(node)
    return em.add("Gather", [table, ids], axis=0)


def _onehot(em, node, params):
    ids = em.add("Cast", em.ins(node), to=em.onnx.TensorProto.INT64)     # onnxruntime's OneHot: int64 ids
    depth = em.constant(node.attrs["classes"])
    off_on = em.constant([0.0, 1.0], dtype=np.float32)
    return em.add("OneHot", [ids, depth, off_on], axis=-1)


def _cross_entropy(em, node, params):
    """mean over rows of -log softmax(z)[y]."""
    z, y = em.ins(node)
    logp = em.add("LogSoftmax", [z], axis=-1)
    idx = em.add("Unsqueeze", [em.add("Cast", [y], to=em.onnx.TensorProto.INT64), em.constant([-1])])
    picked = em.add("GatherElements", [logp, idx], axis=-1)
    return em.add("Neg", [em.add("ReduceMean", [picked], keepdims=0)])


_TRANSLATE = {
    "input": _input, "param": _param, "const": _const, "dim": _dim,
    "add": _binary("Add"), "sub": _binary("Sub"), "mul": _binary("Mul"), "div": _binary("Div"),
    "maximum": _binary("Max"),
    "neg": _unary("Neg"), "exp": _unary("Exp"), "log": _unary("Log"), "sqrt": _unary("Sqrt"),
    "abs": _unary("Abs"), "relu": _unary("Relu"), "sigmoid": _unary("Sigmoid"), "tanh": _unary("Tanh"),
    "copy": _unary("Identity"), "square": _square,
    "threshold": _as_float_mask("GreaterOrEqual", zero_operand=True), "greater": _as_float_mask("Greater"),
    "matmul": _matmul, "transpose": _transpose, "reshape": _reshape, "broadcast_to": _broadcast_to,
    "sum": _sum, "softmax": _softmax, "concat": _concat, "slice": _slice,
    "conv2d": _conv2d, "maxpool2d": _pool("MaxPool"), "avgpool2d": _pool("AveragePool"),
    "gather_rows": _gather_rows, "onehot": _onehot, "cross_entropy": _cross_entropy,
}
