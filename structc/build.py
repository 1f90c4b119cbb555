"""Check a parsed model and build its forward graph.

Input: a `syntax.Model`. Output: a `ModelDef`: the forward graph (outputs by
name, plus `loss`), the declared inputs and parameters, and the symbolic
dimensions. Names are resolved, argument kinds checked and every op's shape
rule run here, so each mistake is reported at its own span.

Structured values (a graph input, a forest, a recursion `h`, `n.children`)
join expressions through four optional methods, so the language core never
names them:
    snet_attr(mb, e)            `value.name`
    snet_subscript(mb, e)       `value[index]` (the value reads the index itself)
    snet_index(mb, base, e)     `base[value]` (the value is the index: h[g.src])
    snet_call(mb, e)            `value(args)` (a recursion: h(n.left))
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any

from . import syntax as S
from .errors import (ShapeMismatch, SnetError, SnetNameError, SnetShapeError, SnetSyntaxError,
                     SnetTypeError, Span)
from .graph import Builder, Graph, Value
from .init import INITIALIZERS, parse_init
from .layers import SURFACE, Context, Word
from .layers import show as _show
from .layers.context import states_hint
from .layers.embedding import embedding_param_type
from .layers.embedding import index as gather
from .ops import REGISTRY
from .ops.base import _ours
from .types import MAX_ELEMENTS, MAX_PARAMS, TensorType


@dataclass(frozen=True)
class InputSpec:
    name: str
    kind: str                 # "input" | "target"
    type: TensorType
    classes: int = 0          # for class labels: labels lie in [0, classes)
    span: Span | None = None


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: TensorType
    init: tuple               # (initialiser name, args)
    span: Span | None = None
    frozen: bool = False      # `param ... frozen` or a layer's `frozen=true`: training leaves it alone
    buffer: bool = False      # state the training entry writes (batch norm's running statistics): never trained
    kept: bool = False        # a buffer of a layer declared frozen=true: training does not write it either


@dataclass
class ModelDef:
    name: str
    graph: Graph
    inputs: dict[str, InputSpec]
    params: dict[str, ParamSpec]
    symbols: list[str]
    has_loss: bool
    source: str = ""
    file: str = ""
    graphs: dict = field(default_factory=dict)     # graph inputs: name -> gnn.GraphSpec
    forests: list = field(default_factory=list)     # forest inputs (recursion.ForestDecl.meta())
    sequences: list = field(default_factory=list)   # sequence inputs (sequence.SequenceDecl.meta())
    span: Span | None = None        # the model's name in `model Name {`: where a warning about all of it points


#: the largest finite float32: numbers in a model become float32 constants
F32_MAX = 3.4028234663852886e38
#: labels and word ids are int32
MAX_CLASSES = 2 ** 31 - 1
#: the most copies `repeat` makes of its statements, nested repeats multiplied
MAX_REPEAT = 1000

# The prediction each loss implies, for models that declare no output.
PREDICTIONS = {"cross_entropy": ("probs", "softmax"), "binary_cross_entropy": ("probs", "sigmoid"),
               "mse": ("pred", None)}
PREDICTIONS["masked_cross_entropy"] = ("probs", "softmax")


class ModelBuilder:
    def __init__(self, model: S.Model, program: S.Program):
        self.model = model
        self.program = program
        self.graph = Graph(model.name)
        self.env: dict[str, Any] = {}
        self.defined_at: dict[str, Span] = {}
        self.inputs: dict[str, InputSpec] = {}
        self.params: dict[str, ParamSpec] = {}
        self.param_count = 0                        # elements of all parameters so far
        self.symbols: set[str] = set()
        self.layer_names: set[str] = set()
        self.layer_counts: dict[str, int] = {}     # next number to try for an unnamed layer of each kind
        self.losses: list[Value] = []
        self.outputs: dict[str, int] = {}
        self.output_spans: dict[str, Span] = {}
        self.implied_outputs: dict[str, int] = {}
        self.forests: dict = {}             # forest inputs by name (recursion.ForestDecl)
        self.sequences: dict = {}           # sequence inputs by name (sequence.SequenceDecl)
        self.b = Builder(self.graph)
        self.graphs: dict = {}              # graph inputs (structc.gnn)
        self.repeat_path: tuple[int, ...] = ()
        self.repeat_counts: tuple[int, ...] = ()   # counts of the repeats being built, outermost first

    # -- statements ------------------------------------------------------
    def build(self) -> ModelDef:
        for stmt in self.model.body:
            getattr(self, "stmt_" + type(stmt).__name__)(stmt)
        g = self.graph
        if self.losses and "loss" in self.outputs:     # g.outputs["loss"] is the losses' sum
            raise SnetNameError("an output cannot be named 'loss' in a model with `loss` statements: "
                                "that name is their sum; call the output something else",
                                self.output_spans["loss"])
        if self.losses:
            total = self.losses[0]
            for extra in self.losses[1:]:
                total = total + extra
            g.outputs["loss"] = total.id
        check_sizes(g, self.model.span)
        check_computed_ids(g, self.model.span)
        named = self.outputs or self.implied_outputs
        if not named and not self.losses:
            raise SnetError(f"model '{self.model.name}' has no output and no loss: add "
                            "`output name = expr` or `loss ...`", self.model.name_span)
        for name, nid in named.items():
            g.outputs[name] = nid
        return ModelDef(self.model.name, g, self.inputs, self.params, sorted(self.symbols),
                        bool(self.losses), self.program.source, self.program.file, self.graphs,
                        [f.meta() for f in self.forests.values()], [q.meta() for q in self.sequences.values()],
                        self.model.name_span)

    def define(self, name: str, span: Span, value, rebind: bool = True) -> None:
        if name in self.env and (not rebind or name in self.inputs or name in self.params):
            first = self.defined_at[name]
            raise SnetNameError(f"'{name}' is already defined (line {first.line})", span)
        self.env[name] = value
        self.defined_at.setdefault(name, span)

    def stmt_InputDecl(self, s: S.InputDecl) -> None:
        if isinstance(s.type, S.GraphTypeExpr):
            from .gnn import declare_graph
            return declare_graph(self, s)
        if isinstance(s.type, S.ForestTypeExpr):
            from .recursion import declare_forest
            return declare_forest(self, s)
        if isinstance(s.type, S.SequenceTypeExpr):
            from .sequence import declare_sequence
            return declare_sequence(self, s)
        t, classes = self.resolve_type(s.type, allow_symbols=True)
        nid = self.graph.add(REGISTRY["input"], (), {"name": s.name, "kind": s.kind, "type": t, "classes": classes},
                             s.span, type=t)
        self.define(s.name, s.name_span, self.b.value(nid), rebind=False)
        self.graph.inputs[s.name] = nid
        self.inputs[s.name] = InputSpec(s.name, s.kind, t, classes, s.span)

    def stmt_ParamDecl(self, s: S.ParamDecl) -> None:
        if isinstance(s.type, (S.GraphTypeExpr, S.ForestTypeExpr, S.SequenceTypeExpr)):
            raise SnetTypeError("a parameter must be a float tensor, not a graph, a forest or a sequence",
                                s.type.span)
        if isinstance(s.type, S.Call) and s.type.func == "embedding":
            t, init = embedding_param_type(s.type)
            init = self.resolve_init(s.init) if s.init is not None else init
            nid = self.add_param(s.name, t, init, s.span, name_span=s.name_span, frozen=s.frozen)
            self.define(s.name, s.name_span, self.b.value(nid), rebind=False)
            return
        t, classes = self.resolve_type(s.type, allow_symbols=False)
        if classes or not t.is_float:      # initialisers and the optimizer write float32
            raise SnetTypeError(f"a parameter must be a float tensor (f32[...]), not "
                                f"{'class labels' if classes else t.dtype}", s.type.span)
        init = self.resolve_init(s.init) if s.init is not None else ("glorot" if t.rank >= 2 else "zeros", ())
        nid = self.add_param(s.name, t, init, s.span, name_span=s.name_span, frozen=s.frozen)
        self.define(s.name, s.name_span, self.b.value(nid), rebind=False)

    def stmt_Assign(self, s: S.Assign) -> None:
        value = self.eval(s.value)
        if isinstance(value, Word):
            raise self.unknown_name(value)
        self.check_bindable(s.name, s.name_span)
        self.env[s.name] = value
        self.defined_at.setdefault(s.name, s.name_span)

    def stmt_Unpack(self, s: S.Unpack) -> None:
        for name, span in zip(s.names, s.name_spans):
            self.check_bindable(name, span)
        for name, span, value in zip(s.names, s.name_spans, self.unpack(s)):
            self.env[name] = value
            self.defined_at.setdefault(name, span)

    def check_bindable(self, name: str, span: Span) -> None:
        """A name may be bound again, unless it is a declared input or parameter."""
        declared_input = name in self.inputs or name in self.graphs or name in self.forests \
            or name in self.sequences
        if declared_input or name in self.params:
            raise SnetNameError(f"cannot assign to '{name}': it is a declared "
                                f"{'input' if declared_input else 'parameter'}", span)

    def unpack(self, s: S.Unpack) -> list:
        """The values `(a, b) = value` binds, one per name, in order: the items of a
        tuple written in place, or the values of a layer that gives several (lstm_cell's
        (h, c)); each name once."""
        for k, (name, span) in enumerate(zip(s.names, s.name_spans)):
            if name in s.names[:k]:
                raise SnetNameError(f"'{name}' is bound twice in this unpacking", span)
        if isinstance(s.value, S.Tuple):
            values = [self.eval(x) for x in s.value.items]
        else:
            v = self.eval(s.value)
            values = list(v) if isinstance(v, tuple) else [v]
        for v in values:
            if isinstance(v, Word):
                raise self.unknown_name(v)
        if len(values) != len(s.names):
            raise SnetTypeError(_gives(s.value, len(values), s.names), s.value.span)
        return values

    def stmt_LossStmt(self, s: S.LossStmt) -> None:
        value = self.eval(s.value)
        if not isinstance(value, Value):
            raise SnetTypeError("a loss must be a tensor expression", s.value.span)
        if value.type.rank != 0:
            raise SnetShapeError(f"a loss must be a scalar, got {value.type}; reduce it with mean(...) or sum(...)",
                                 s.value.span)
        self.losses.append(value)

    def stmt_Repeat(self, s: S.Repeat) -> None:
        if s.count < 1:
            raise SnetSyntaxError("repeat needs a positive count", s.count_span)
        copies = s.count * math.prod(self.repeat_counts)
        if copies > MAX_REPEAT:      # every copy is built and compiled: keep the work near what is written
            nested = " (with the repeats around it)" if self.repeat_counts else ""
            raise SnetSyntaxError(f"repeat {s.count} would make {copies} copies of its statements{nested}; "
                                  f"the limit is {MAX_REPEAT}", s.count_span)
        self.repeat_counts = self.repeat_counts + (s.count,)
        try:
            self.repeat_body(s)
        finally:
            self.repeat_counts = self.repeat_counts[:-1]

    def repeat_body(self, s: S.Repeat) -> None:
        for k in range(1, s.count + 1):
            self.repeat_path = self.repeat_path + (k,)
            try:
                for stmt in s.body:
                    if not isinstance(stmt, (S.Assign, S.Unpack, S.LossStmt, S.Repeat)):
                        raise SnetSyntaxError("only assignments, losses and repeats can be repeated; "
                                              "declare inputs, parameters and outputs outside", stmt.span)
                    getattr(self, "stmt_" + type(stmt).__name__)(stmt)
            finally:
                self.repeat_path = self.repeat_path[:-1]

    def stmt_RecDecl(self, s: S.RecDecl) -> None:
        from .recursion import build_rec
        build_rec(self, s)

    def stmt_SeqRecDecl(self, s: S.SeqRecDecl) -> None:
        from .sequence import build_seq_rec
        build_seq_rec(self, s)

    def stmt_OutputStmt(self, s: S.OutputStmt) -> None:
        if s.name in self.outputs:
            raise SnetNameError(f"output '{s.name}' is declared twice", s.name_span)
        if s.value is None:
            value = self.eval(S.Name(s.name, s.name_span))
        else:
            if s.name in self.env:      # would the lines after it read the output or the earlier value?
                first = self.defined_at[s.name]
                raise SnetNameError(f"'{s.name}' is already defined (line {first.line}): give the output "
                                    f"another name, or write `{s.name} = ...` then `output {s.name}`", s.name_span)
            value = self.eval(s.value)
            self.define(s.name, s.name_span, value)
        if not isinstance(value, Value):
            raise SnetTypeError("an output must be a tensor", s.span)
        self.outputs[s.name] = value.id
        self.output_spans[s.name] = s.name_span

    # -- types and params -------------------------------------------------
    def resolve_type(self, t, allow_symbols: bool) -> tuple[TensorType, int]:
        if isinstance(t, S.ForestTypeExpr):
            raise SnetTypeError("a forest is an input type: `input t: forest of word(vocab=V)`", t.span)
        if isinstance(t, S.SequenceTypeExpr):
            raise SnetTypeError("a sequence is an input type: `input s: sequence of f32[F]`", t.span)
        if isinstance(t, S.Call):
            what = "a parameter type: `param E: embedding(V, d)`" if t.func == "embedding" else \
                "not a type (types: f32[...], class[...] of C, forest of ..., embedding(V, d))"
            raise SnetTypeError(f"{t.func}(...) is {what}", t.span)
        dims = []
        for d in t.dims:
            if isinstance(d.value, str):
                if not allow_symbols:
                    raise SnetShapeError(f"parameter shapes must be static; '{d.value}' is a symbol", d.span)
                if "." in d.value:      # g.nodes, t.trees: a size of a structured input
                    base = d.value.split(".", 1)[0]
                    if base in self.forests:
                        from .recursion import check_dim
                        check_dim(self, d)
                    elif base in self.sequences:
                        from .sequence import check_dim as check_sequence_dim
                        check_sequence_dim(self, d)
                    else:
                        from .gnn import check_size
                        check_size(self, d)
                self.symbols.add(d.value)
            elif d.value <= 0:
                raise SnetShapeError("dimensions must be positive", d.span)
            elif d.value > MAX_ELEMENTS:
                raise SnetShapeError(f"dimension {d.value} is too large (at most 2**40)", d.span)
            dims.append(d.value)
        if isinstance(t, S.TensorTypeExpr) and t.dtype == "f64":
            # no kernel computes in float64: they would read its bits as float32
            raise SnetTypeError("f64 tensors are not supported: declare f32 (float64 data is "
                                "converted when the model is called)", t.span)
        if isinstance(t, S.ClassTypeExpr):
            if t.classes < 2:
                raise SnetShapeError("a class target needs at least 2 classes", t.span)
            if t.classes > MAX_CLASSES:     # labels are int32
                raise SnetShapeError(f"{t.classes} classes do not fit int32 labels (at most 2**31 - 1)", t.span)
            return TensorType(tuple(dims), "i32"), t.classes
        return TensorType(tuple(dims), t.dtype), 0

    def resolve_init(self, e) -> tuple:
        if isinstance(e, S.Name):
            name, args, span = e.id, (), e.span
        elif isinstance(e, S.Call):
            name, span = e.func, e.func_span
            args = tuple(self.eval(a) for a in e.args)
            if e.kwargs or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
                raise SnetTypeError(f"initialiser {name} takes numbers only, e.g. normal(0.01)", e.span)
            for a, x in zip(args, e.args):
                f32_number(a, x.span)
        else:
            raise SnetTypeError("an initialiser is a name such as glorot, or a call such as normal(0.01)", e.span)
        return self.check_init(name, args, span)

    def check_init(self, name, args, span) -> tuple:
        try:
            return parse_init(name, args)
        except ValueError as err:
            raise SnetNameError(str(err), span, notes=(f"initialisers: {', '.join(sorted(INITIALIZERS))}",)) from None

    def add_param(self, name: str, t: TensorType, init, span: Span, name_span: Span | None = None,
                  frozen: bool = False, buffer: bool = False) -> int:
        if name in self.params:
            raise SnetNameError(f"parameter '{name}' is defined twice (first at line {self.params[name].span.line})",
                                name_span or span)
        if not all(isinstance(d, int) for d in t.shape):
            raise SnetShapeError(f"parameter '{name}' would have a symbolic shape {t}", span)
        total = self.param_count + t.static_elements()
        if total > MAX_PARAMS:      # the arena is allocated when the model is loaded
            raise SnetShapeError(f"parameter '{name}' {t} brings the model to {total} parameters; "
                                 f"the limit is {MAX_PARAMS} (2**31)", span)
        if isinstance(init, Word):
            init = init.text
        if isinstance(init, str):
            init = self.check_init(init, (), span)
        elif not (isinstance(init, tuple) and len(init) == 2 and isinstance(init[0], str)):   # init=3, init=(2, 3)
            raise SnetTypeError(f"init must be an initialiser such as glorot or he, got {_show(init)}", span,
                                notes=(f"initialisers: {', '.join(sorted(INITIALIZERS))}",))
        nid = self.graph.add(REGISTRY["param"], (), {"name": name, "type": t, "init": init}, span, type=t)
        self.param_count = total
        self.graph.params[name] = nid
        self.params[name] = ParamSpec(name, t, init, span, frozen or buffer, buffer)
        return nid

    # -- expressions -------------------------------------------------------
    def unknown_name(self, w: Word) -> SnetError:
        known = [n for n in self.env]
        close = difflib.get_close_matches(w.text, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return SnetNameError(f"unknown name '{w.text}'{hint}", w.span)

    def eval(self, e) -> Any:
        return getattr(self, "eval_" + type(e).__name__)(e)

    def eval_Number(self, e: S.Number):
        return e.value

    def eval_String(self, e: S.String):
        return e.value

    def eval_Name(self, e: S.Name):
        if e.id in self.env:
            return self.env[e.id]
        if e.id in ("true", "false"):
            return e.id == "true"
        return Word(e.id, e.span)

    def eval_Tuple(self, e: S.Tuple) -> tuple:
        """A tuple holds numbers (and the model's symbols, for shapes): `(3, 3)`, `(N, 784)`."""
        items = []
        for item in e.items:
            v = self.eval(item)
            if isinstance(v, Word) and v.text not in self.symbols:
                raise self.unknown_name(v)
            if isinstance(v, bool) or not isinstance(v, (int, float, Word)):
                raise SnetTypeError(f"a tuple holds numbers, e.g. (3, 3); got {_show(v)}", item.span)
            items.append(v)
        return tuple(items)

    def tensor(self, e) -> Value | float:
        v = self.eval(e)
        if isinstance(v, Word):
            raise self.unknown_name(v)
        if isinstance(v, Value) or isinstance(v, (int, float)) and not isinstance(v, bool):
            return v
        # strings, booleans, and structured values (g.edges, t.root, h) are no operands
        raise SnetTypeError(f"expected a tensor or a number, got {_show(v)}", e.span)

    def eval_BinOp(self, e: S.BinOp):
        # `x + x + ... + x` nests to the left as deep as it is long: walk that spine in a loop
        chain = []
        while isinstance(e, S.BinOp):
            chain.append(e)
            e = e.left
        value = self.tensor(e)
        for op in reversed(chain):
            value = self.binop(op, value, self.tensor(op.right))
        return value

    def binop(self, e: S.BinOp, left, right):
        if not isinstance(left, Value) and not isinstance(right, Value):
            return _fold(e.op, left, right, e.span)
        if e.op == "matmul" and not (isinstance(left, Value) and isinstance(right, Value)):
            raise SnetTypeError("@ multiplies two matrices", e.span)
        b = Builder(self.graph, e.span)
        return b.apply(e.op, left, right)

    def eval_Neg(self, e: S.Neg):
        v = self.tensor(e.operand)
        if not isinstance(v, Value):
            return -v
        return Builder(self.graph, e.span).neg(v)

    def eval_Index(self, e: S.Index):
        base = self.eval(e.base)
        subscript = getattr(base, "snet_subscript", None)    # n.children[k]
        if subscript is not None:
            return subscript(self, e)
        index = self.eval(e.index)
        hook = getattr(index, "snet_index", None)            # h[g.src]
        if hook is not None:
            return hook(self, base, e)
        if isinstance(base, Value):                          # E[n.word]: rows of a table
            if isinstance(index, Word):
                raise self.unknown_name(index)
            return gather(Context(self, e.span, "index"), base, index)
        raise SnetTypeError(f"{_show(base)} cannot be indexed{states_hint(base)}", e.span)

    def eval_Attr(self, e: S.Attr):
        base = self.eval(e.base)
        if isinstance(base, Word):
            raise self.unknown_name(base)
        hook = getattr(base, "snet_attr", None)        # structured inputs: g.x, g.edges, n.left
        if hook is not None:
            return hook(self, e)
        raise SnetTypeError("attribute access is not supported in this model", e.span)

    def eval_Over(self, e: S.Over):
        from .gnn import OverArg
        return OverArg(self.eval(e.value), self.eval(e.domain), e.span)

    def eval_Call(self, e: S.Call):
        fn = self.env.get(e.func)
        if hasattr(fn, "snet_call"):                 # a recursion: h(n.left)
            return fn.snet_call(self, e)
        args = [self.eval(a) for a in e.args]
        kwargs = {}
        for kw in e.kwargs:
            if kw.name in kwargs:
                raise SnetSyntaxError(f"argument '{kw.name}' given twice", kw.span)
            kwargs[kw.name] = self.eval(kw.value)
        ctx = Context(self, e.span, e.func)
        over_layer = getattr(SURFACE.get(e.func), "over_edges", False)      # gat(h over g.edges, 16)
        if not over_layer and any(type(a).__name__ == "OverArg" for a in args):     # sum(m over g.edges)
            from .gnn import aggregate
            return aggregate(ctx, e.func, args, kwargs, e)
        if e.func in SURFACE:
            fn = SURFACE[e.func]
            frozen = self.frozen_option(ctx, kwargs)
            before = set(self.params)
            try:
                result = fn(ctx, *args, **kwargs)
            except TypeError as err:
                raise SnetTypeError(f"{e.func}: {_call_problem(err)}", e.span,
                                    notes=(f"usage: {(fn.__doc__ or '').strip().splitlines()[0]}",)) from None
            except ShapeMismatch as err:
                raise SnetShapeError(f"{e.func}: {err}", e.span) from None
            if frozen:
                self.freeze_new_params(before, e)
        elif e.func in REGISTRY and REGISTRY[e.func].surface:
            result = self.call_op(ctx, REGISTRY[e.func], args, kwargs, e)
        elif e.func in REGISTRY and not _ours(type(REGISTRY[e.func])):     # a user's op, left out of the language
            op = REGISTRY[e.func]
            raise SnetNameError(f"'{e.func}' is an op of {type(op).__module__}.{type(op).__qualname__} that .snet "
                                "cannot call: set `surface = True` in its class", e.func_span)
        else:
            names = sorted(set(SURFACE) | {n for n, op in REGISTRY.items() if op.surface})
            close = difflib.get_close_matches(e.func, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise SnetNameError(f"unknown function '{e.func}'{hint}", e.func_span)
        if e.func in PREDICTIONS and isinstance(result, Value) and args and isinstance(args[0], Value):
            out_name, act = PREDICTIONS[e.func]
            pred = args[0] if act is None else Builder(self.graph, e.span).apply(act, args[0])
            ctx.predicts(pred, out_name)
        return result

    def frozen_option(self, ctx: Context, kwargs: dict) -> bool:
        """A layer's `frozen=true`, taken out of the options the layer itself sees."""
        if "frozen" not in kwargs:
            return False
        return ctx.expect_bool(kwargs.pop("frozen"), "frozen")

    def freeze_new_params(self, before: set, e: S.Call) -> None:
        """Mark the parameters the call just created as frozen."""
        created = [name for name in self.params if name not in before]
        if not created:
            raise SnetTypeError(f"{e.func}(..., frozen=true): this call creates no parameters to freeze", e.span)
        for name in created:
            self.params[name] = dataclasses.replace(self.params[name], frozen=True, kept=self.params[name].buffer)

    def call_op(self, ctx: Context, op, args, kwargs, e: S.Call) -> Value:
        tensor_params, attr_defaults = op.signature()
        variadic = any(p.startswith("*") for p in tensor_params)
        if not variadic and len(args) != len(tensor_params):
            raise SnetTypeError(
                f"{op.name} takes {len(tensor_params)} tensor argument{'s' if len(tensor_params) != 1 else ''} "
                f"({', '.join(tensor_params)}), got {len(args)}", e.span)
        for a, pos in zip(args, e.args):
            if isinstance(a, Word):
                raise self.unknown_name(a)
            if not isinstance(a, Value):
                if isinstance(a, (int, float)) and not isinstance(a, bool):
                    continue
                raise SnetTypeError(f"{op.name} expects tensors as positional arguments, got {_show(a)}", pos.span)
        attrs = {}
        for k, v in kwargs.items():
            if k not in attr_defaults:
                known = ", ".join(attr_defaults) or "none"
                raise SnetTypeError(f"{op.name} has no option '{k}' (options: {known})", e.span)
            attrs[k] = _option_value(op.name, k, v, attr_defaults[k], e.span)
        try:
            result = ctx.b.apply(op.name, *args, **attrs)
        except (TypeError, ValueError) as err:      # a shape rule met an option of the wrong kind
            given = ", ".join(f"{k}={_show(v)}" for k, v in kwargs.items())
            raise SnetTypeError(f"{op.name}: these options do not fit: {given} ({err})", e.span) from None
        check_values = getattr(op, "check_values", None)     # rules that need more than types
        if check_values is not None:
            check_values(ctx, *args, **attrs)
        return result


def check_sizes(graph: Graph, span: Span | None) -> None:
    """Every value's static size within MAX_ELEMENTS, so sizes and offsets
    computed from it (times the symbols bound per call, checked then) fit
    int64 and code generation never meets an absurd constant."""
    for node in graph.nodes.values():
        if node.type.static_elements() > MAX_ELEMENTS:
            raise SnetShapeError(f"{node.op.name} here makes {node.type}, {node.type.static_elements()} elements "
                                 "before any symbol; the limit is 2**40", node.span or span)
        body = node.attrs.get("body")
        if isinstance(body, Graph):
            check_sizes(body, node.span or span)


def check_computed_ids(graph: Graph, span: Span | None) -> None:
    """Row ids the model computes (`E[argmax(x)]`), read directly or through ops that
    only move them, lie within the rows they pick from: kernels clamp an id outside,
    which would silently be another row (argmax 7 read E's last row of 5), and no
    call sees such ids before native code runs, so their range (`Op.id_range`) is
    checked here. The caller's ids are checked at the call (`compiler.index_inputs`)."""
    for node in graph.nodes.values():
        for pos, rows in node.op.index_bounds(graph, node).items():
            for source in _id_sources(graph, node.inputs[pos]):
                op = graph.nodes[source].op
                if "source" in op.traits:       # an input: its values are checked at the call, or by a binder
                    continue
                bound = op.id_range(graph, graph.nodes[source])
                where = node.span or span
                if bound is None:
                    raise SnetShapeError(f"row ids computed by {op.name} have no known range, so ids outside "
                                         f"[0, {rows}) could silently pick another row", where)
                if bound != rows and not (isinstance(bound, int) and isinstance(rows, int) and bound <= rows):
                    raise SnetShapeError(f"row ids computed by {op.name} lie in [0, {bound}), but pick from "
                                         f"[0, {rows}): an id past {rows} would silently be another row "
                                         f"(compute them over {rows} values, or pick from {bound} rows)", where)
        body = node.attrs.get("body")
        if isinstance(body, Graph):
            check_computed_ids(body, node.span or span)


def _id_sources(graph: Graph, nid: int) -> set[int]:
    """The nodes whose values reach `nid` through ops that only move integers."""
    sources, stack, seen = set(), [nid], {nid}
    while stack:
        node = graph.nodes[stack.pop()]
        if node.op.traits & {"view", "moves_data"} and node.inputs:
            fresh = [i for i in node.inputs if i not in seen]
            seen.update(fresh)
            stack.extend(fresh)
        else:
            sources.add(node.id)
    return sources


def _option_value(fname: str, key: str, v, default, span: Span):
    """An option's value as a shape rule takes it: a word, a number, or (for a
    list of axes) a tuple of them; never a tensor or a graph's domain."""
    if isinstance(default, bool) and not isinstance(v, bool):   # keepdims="no" is not false
        raise SnetTypeError(f"{fname}: option '{key}' takes true or false, got {_show(v)}", span)
    if isinstance(default, float):      # alpha=nan as a word would become float("nan")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SnetTypeError(f"{fname}: option '{key}' takes a number, got {_show(v)}", span)
        return float(f32_number(v, span))
    if isinstance(v, Word):
        return v.text
    if isinstance(default, int) and not isinstance(default, bool) and (isinstance(v, bool) or not isinstance(v, int)):
        raise SnetTypeError(f"{fname}: option '{key}' takes an integer, got {_show(v)}", span)
    if not isinstance(v, (int, float, str, bool, tuple)):
        raise SnetTypeError(f"{fname}: option '{key}' takes a number or a word, got {_show(v)}", span)
    return v


def f32_number(v, span: Span) -> float:
    """A number used as a float32 (an initialiser's argument): it must fit one.
    (Operands of ops are checked where they become constants, `Builder`.)"""
    try:
        x = float(v)
    except OverflowError:
        x = math.inf
    if not abs(x) <= F32_MAX:
        raise SnetTypeError("number too large for f32 (the largest is about 3.4e38)", span)
    return v


def _fold(op: str, a, b, span: Span):
    if op == "div" and b == 0:
        raise SnetTypeError("division by zero", span)
    if op == "matmul":
        raise SnetTypeError("@ multiplies two matrices, not numbers", span)
    try:
        value = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv}[op](a, b)
    except OverflowError:       # 1e308 / 1e-10; a huge int divided
        value = math.inf
    # as for literals (syntax.MAX_INT): a product of huge numbers is no size and no f32 constant
    if (isinstance(value, int) and abs(value) >= S.MAX_INT) or (isinstance(value, float) and not math.isfinite(value)):
        raise SnetTypeError("number too large (numbers stop at about 1.8e308)", span)
    return value


def _gives(e, count: int, names: list) -> str:
    """An unpacking's count mismatch in words: "lstm_cell gives 2 values (h, c); 3 names"."""
    func = e.func if isinstance(e, S.Call) else None
    what = func or ("the tuple" if isinstance(e, S.Tuple) else "the value")
    if count == 1:
        hint = f": bind it to one name, {names[0]} = {func}(...)" if func else ""
        return f"{what} gives one value, not a tuple of {len(names)}{hint}"
    gives = getattr(SURFACE.get(func), "gives", None)
    return f"{what} gives {count} values" + (f" ({', '.join(gives)})" if gives else "") + f"; {len(names)} names"


def _call_problem(err: TypeError) -> str:
    text = str(err)
    # "dense() missing 1 required positional argument: 'units'" -> the useful part
    text = text.split(") ", 1)[1] if ") " in text else text
    if re.match(r"takes (from )?\d+ ", text):     # the counts include the layer's `ctx`: not written
        text = re.sub(r"\d+(?= (to \d+ )?positional| to | (was|were) given)",
                      lambda m: str(int(m.group()) - 1), text)
        text = re.sub(r"\b1 positional arguments\b", "1 positional argument", text)
        text = re.sub(r"\b1 were given", "1 was given", text)
    return text


def build_model(program: S.Program, name: str | None = None) -> ModelDef:
    """Check and build one model of a program (the only one, or `name`)."""
    if not program.models:
        raise SnetError("no model in the source: expected `model Name { ... }`",
                        Span(program.file, 1, 1, 1, 2))
    if name is None:
        if len(program.models) > 1:
            first = program.model_names[0]
            raise SnetError(f"this file defines several models ({', '.join(program.model_names)}); "
                            f"choose one with model=\"{first}\" in Python or --model {first} on the command line",
                            program.models[1].name_span)
        model = program.models[0]
    else:
        matches = [m for m in program.models if m.name == name]
        if not matches:
            raise SnetNameError(f"no model named '{name}' in {program.file} "
                                f"(it defines {', '.join(program.model_names)})")
        model = matches[0]
    return ModelBuilder(model, program).build()
