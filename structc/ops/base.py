"""The op registry: one subclass of `Op` per op, registered by defining it.

An op holds, in one place:
  * `shape(*types, **attrs)`   its shape rule (raise `ShapeMismatch`);
  * `vjp(b, g, out, *xs, **attrs)`  its gradient, written with other ops;
  * `reference(*arrays, **attrs)`  a plain numpy definition (tests, interpreter);
  * its lowering: `emit` (elementwise ops: one element, scalar or vector) or
    `lower` (ops with loop nests of their own).
Autodiff, passes and codegen ask `traits`, never op names.

Layers of the language that are compositions of ops (`dense`, `mean`,
`flatten`) live in `structc.layers`; an op module imports no layer and no
part of the front end.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ShapeMismatch
from ..types import TensorType, broadcast_shapes

REGISTRY: dict[str, "Op"] = {}
#: the language's functions that are not ops (its layers: `mean`, `dense`, ...), by
#: name, as "module.function"; `structc.layers` fills it, and a callable op may not
#: take one of these names (a `.snet` call would reach the layer, never the op)
LAYER_NAMES: dict[str, str] = {}


@dataclass
class Sample:
    """Operands for testing an op: each is a shape, or (shape, kind) with kind
    one of "float" (standard normal), "away" (normal, |x| >= 0.2, clear of
    kinks), "positive" (in [0.5, 2]), "fixed" (normal, but an input the
    gradient is not taken for) or ("classes", C) (integers in [0, C))."""
    inputs: tuple
    attrs: dict = field(default_factory=dict)

    def arrays(self, rng: np.random.Generator) -> list[np.ndarray]:
        out = []
        for spec in self.inputs:
            shape, kind = (spec, "float") if not spec or isinstance(spec[0], int) else spec
            if kind in ("float", "fixed"):
                out.append(rng.normal(size=shape))
            elif kind == "away":
                x = rng.normal(size=shape)
                out.append(np.where(np.abs(x) < 0.2, np.sign(x + 1e-9) * (0.2 + np.abs(x)), x))
            elif kind == "mask":
                out.append((rng.random(size=shape) < 0.5).astype(np.float64))
            elif kind == "positive":
                out.append(rng.uniform(0.5, 2.0, size=shape))
            elif isinstance(kind, tuple) and kind[0] == "classes":
                out.append(rng.integers(0, kind[1], size=shape).astype(np.int32))
            else:
                raise ValueError(f"unknown sample kind {kind!r}")
        return out

    def fixed(self) -> set[int]:
        """Positions of float operands passed as inputs rather than parameters."""
        return {k for k, spec in enumerate(self.inputs)
                if spec and not isinstance(spec[0], int) and spec[1] in ("fixed", "mask")}


def data_sizes(dims) -> set:
    """The dims among `dims` that are sizes of the data (symbols), not constants."""
    return {d for d in dims if not isinstance(d, int)}


class Op:
    name: str = ""
    traits: frozenset = frozenset()
    #: exposed to `.snet` sources under `name`
    surface: bool = False
    #: a kernel that reads its operands as float32: an integer operand is refused
    #: (elementwise ops convert integers instead, see `infer`)
    floats_only: bool = False

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "name" in cls.__dict__ and cls.name:
            register_op(cls)

    # -- rules every op provides ---------------------------------------
    def shape(self, *types: TensorType, **attrs) -> TensorType:
        raise NotImplementedError

    def vjp(self, b, g, out, *xs, **attrs) -> list:
        raise NotImplementedError(f"{self.name} has no gradient")

    def reference(self, *xs: np.ndarray, **attrs) -> np.ndarray:
        raise NotImplementedError

    def samples(self) -> list[Sample]:
        """Operands the test suite runs this op on (forward, gradient, native)."""
        return []

    def index_bounds(self, graph, node) -> dict:
        """The operands this node reads as row ids, by position, with the rows they
        pick from (an int, or a size symbol): its kernel clamps an id outside
        [0, rows), so `Net` refuses one in the inputs that reach it
        (`compiler.index_inputs`) rather than give another row's result."""
        return {}

    def pooled_dims(self, graph, node) -> set:
        """The data sizes (symbolic dims: examples, nodes, positions) along which this
        node combines the values of different rows with no index from the data to keep
        examples apart: a statistic over the batch, such as a sum over its rows. A
        data-parallel step computes it over each rank's shard alone, so a loss that
        reads one is refused there (`structc.denominator`). Ops that combine rows
        through the data's own relations (edges, trees, sequences) combine within an
        example: none (the default)."""
        return set()

    def id_range(self, graph, node):
        """For an op whose integer result holds positions it computes (argmax):
        they lie in [0, this) (an int, or a size symbol). Row ids such an op
        computes are checked against the rows they pick from when the model is
        built (`build.check_computed_ids`), since no call sees them before
        native code runs; None (the default): no known range, so they are refused."""
        return None

    # -- derived ---------------------------------------------------------
    def infer(self, *types: TensorType, **attrs) -> TensorType:
        tensors, _ = self.signature()
        if not any(t.startswith("*") for t in tensors) and len(types) != len(tensors):
            raise ShapeMismatch(f"takes {len(tensors)} operand(s), got {len(types)}")
        if self.floats_only:
            for name, t in zip(tensors, types):
                if not t.is_float:
                    raise ShapeMismatch(f"needs float operands, and {name} is {fmt_shape(t)} (integer tensors "
                                        "are indices, labels and words; declare the input f32 to compute with "
                                        "its values)")
        out = self.shape(*types, **attrs)
        if isinstance(self, Elementwise) and "moves_data" not in self.traits and not out.is_float:
            out = TensorType(out.shape, "f32")      # integers are computed with in float32, and so stored
        return out

    def signature(self) -> tuple[list[str], dict[str, Any]]:
        """Tensor parameter names (from `shape`, or from `reference` when the
        shape rule is variadic) and attribute defaults (from `shape`)."""
        cached = self.__dict__.get("_signature")
        if cached is not None:
            return cached
        tensors, attrs = _params(self.shape)
        if any(t.startswith("*") for t in tensors) and type(self).reference is not Op.reference:
            fixed, _ = _params(self.reference)
            if not any(t.startswith("*") for t in fixed):
                tensors = fixed
        self._signature = (tensors, attrs)
        return self._signature

    def describe(self, attrs: dict) -> str:
        """The attributes as printed in a graph dump."""
        from ..graph import format_attr
        return ", ".join(f"{k}={format_attr(v)}" for k, v in sorted(attrs.items()))

    def __repr__(self) -> str:
        return f"<op {self.name}>"


def register_op(cls: type) -> type:
    """Add the op class `cls` to the registry under `cls.name` (defining a
    subclass of `Op` with a `name` does this; an extension may call it too).
    A name already taken by another op is refused, and so is a layer's name
    for an op with `surface = True`; the same class defined again (a module
    reloaded) replaces its earlier version."""
    if not (isinstance(cls, type) and issubclass(cls, Op)) or not isinstance(cls.name, str) or not cls.name:
        raise TypeError(f"register_op takes a subclass of structc.ops.Op with a `name`, got {cls!r}")
    if cls.surface and not _snet_name(cls.name):
        raise ValueError(f"op {cls.name!r} has surface = True, but .snet cannot call it: a name there is ASCII "
                         f"letters, digits and '_', not starting with a digit (choose one such as "
                         f"{_snet_spelling(cls.name)!r})")
    if cls.surface and cls.name in LAYER_NAMES:
        raise ValueError(f"op {cls.name!r} has the name of the layer {LAYER_NAMES[cls.name]}, which .snet "
                         f"calls would reach instead of the op: choose another name")
    old = REGISTRY.get(cls.name)
    if old is not None and type(old) is not cls:
        same = (type(old).__module__, type(old).__qualname__) == (cls.__module__, cls.__qualname__)
        if not same:
            raise ValueError(f"op {cls.name!r} is already defined by {type(old).__module__}."
                             f"{type(old).__qualname__}: choose another name")
    REGISTRY[cls.name] = cls()
    return cls


def _snet_name(name: str) -> bool:
    """Whether `name` is a NAME of grammar/snet.lark, `[A-Za-z_][A-Za-z0-9_]*` (so a
    `.snet` call can reach it; `my-op(x)` parses as `my - op(x)`). Keywords are not
    reserved: the parser lexes `loss(x)` or `graph(x)` in an expression as a name."""
    return name.isascii() and name.isidentifier()


def _snet_spelling(name: str) -> str:
    """`name` with what a .snet name cannot hold replaced by `_` (a suggestion)."""
    spelt = "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in name)
    return spelt if _snet_name(spelt) else f"_{spelt}"


def extension_fingerprint() -> str:
    """A hash of the definitions of the registered ops defined outside
    structc (users' ops): part of the cache key, so a changed user op is
    compiled afresh instead of loading code compiled from its old version.
    It hashes the code as loaded (methods with their default arguments and
    closures, and the module's functions and values they read), not the file: a file edited but not re-imported still compiles
    the old code, and must not store it under the new source's key.
    Structc's own ops are covered by the compiler's fingerprint."""
    import hashlib
    h = hashlib.sha256()
    for name in sorted(REGISTRY):
        cls = type(REGISTRY[name])
        if not _ours(cls):
            h.update(name.encode() + b"\0" + _definition(cls).encode() + b"\0")
    return h.hexdigest()[:16]


def _ours(obj) -> bool:
    """Whether `obj` (a function, a class, an op) is structc's own, not a user's."""
    return (getattr(obj, "__module__", None) or "").split(".")[0] == "structc"


def _definition(cls: type) -> str:
    """The class attributes of `cls` and its bases outside structc: functions
    by their code, other values by repr."""
    import sys
    parts, seen = [], set()
    for klass in cls.__mro__:
        if _ours(klass) or klass is object:
            continue
        helpers = vars(sys.modules.get(klass.__module__)) if klass.__module__ in sys.modules else {}
        for key, value in sorted(vars(klass).items()):
            if key in ("__dict__", "__weakref__", "__module__", "__doc__"):
                continue
            fn = getattr(value, "__func__", value)      # staticmethod, classmethod
            parts.append(f"{klass.__qualname__}.{key}=" + (_function(fn, helpers, seen)
                                                          if hasattr(fn, "__code__") else repr(value)))
    return "\n".join(parts)


def _function(fn, helpers: dict, seen: set) -> str:
    """A function's code, its default arguments and its closure's values."""
    if id(fn) in seen:          # a function that refers to itself
        return "<again>"
    seen.add(id(fn))
    parts = [_code(fn.__code__, helpers, seen), _value(fn.__defaults__, helpers, seen),
             _value(fn.__kwdefaults__, helpers, seen)]
    for cell in fn.__closure__ or ():
        try:
            parts.append(_value(cell.cell_contents, helpers, seen))
        except ValueError:      # a cell not assigned yet
            parts.append("<empty>")
    return "|".join(parts)


def _code(code, helpers: dict, seen: set) -> str:
    """A code object's instructions, constants and names, with nested code,
    and what the names it reads are in the module: its own functions,
    recursively, and its values (a constant `FACTOR = 2.0` is part of the op)."""
    out = [code.co_code.hex(), repr(code.co_names)]
    for c in code.co_consts:
        out.append(_code(c, helpers, seen) if hasattr(c, "co_code") else repr(c))
    for name in code.co_names:
        if name in helpers and name not in seen:
            seen.add(name)
            out.append(f"{name}:" + _value(helpers[name], helpers, seen))
    return "|".join(out)


def _value(value, helpers: dict, seen: set, depth: int = 0) -> str:
    """A value an op reads, as text that is the same in every process: numbers,
    strings and containers by content, arrays by their bytes, users' functions
    by `_function`; modules, classes and structc's own functions by name; other
    objects by their repr without addresses (their state is not followed)."""
    import hashlib
    import re
    import types
    if depth > 8:
        return "..."
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        inner = ",".join(_value(v, helpers, seen, depth + 1) for v in value)
        return f"{type(value).__name__}({inner})"
    if isinstance(value, (set, frozenset)):
        return f"{type(value).__name__}({','.join(sorted(_value(v, helpers, seen, depth + 1) for v in value))})"
    if isinstance(value, dict):
        items = sorted(f"{_value(k, helpers, seen, depth + 1)}:{_value(v, helpers, seen, depth + 1)}"
                       for k, v in value.items())
        return "dict(" + ",".join(items) + ")"
    if isinstance(value, (np.ndarray, np.generic)):
        arr = np.asarray(value)
        if arr.dtype.hasobject:
            return "array(" + _value(arr.tolist(), helpers, seen, depth + 1) + ")"
        return f"array({arr.dtype.str},{arr.shape},{hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()})"
    if isinstance(value, types.ModuleType):
        return f"module {value.__name__}"
    if isinstance(value, type):
        return f"class {value.__module__}.{value.__qualname__}"
    fn = getattr(value, "__func__", value)
    if isinstance(fn, types.FunctionType):
        if _ours(fn):
            return f"function {fn.__module__}.{fn.__qualname__}"
        return _function(fn, helpers, seen)
    try:
        text = repr(value)
    except Exception:       # noqa: BLE001 - a repr that fails: the type alone
        text = "?"
    return re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(value).__module__}.{type(value).__qualname__}:{text}")


def _params(fn) -> tuple[list[str], dict[str, Any]]:
    tensors, attrs = [], {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind == p.KEYWORD_ONLY:
            if p.name != "dims":
                attrs[p.name] = None if p.default is p.empty else p.default
        elif p.kind == p.POSITIONAL_OR_KEYWORD:
            tensors.append(p.name)
        elif p.kind == p.VAR_POSITIONAL:
            tensors.append("*" + p.name)
    return tensors, attrs


class Elementwise(Op):
    """out[i] = f(x[i], y[i], ...) with numpy broadcasting; lowered by `emit`,
    which must work on scalars and on vectors alike (see `lower.codegen`)."""
    traits = frozenset({"elementwise"})
    #: dtype of the result; None means that of the first input
    out_dtype: str | None = None

    def shape(self, *xs: TensorType) -> TensorType:
        # numpy's promotion between kinds: an integer operand meeting a float one gives the float
        dtype = self.out_dtype or next((x.dtype for x in xs if x.is_float), xs[0].dtype if xs else "f32")
        return TensorType(broadcast_shapes(*(x.shape for x in xs)), dtype)

    def emit(self, cg, *xs, **attrs):
        raise NotImplementedError

    def samples(self) -> list[Sample]:
        """Same shapes, broadcasting both ways, a rank-0 operand, odd sizes."""
        arity = len(self.signature()[0])
        kind = getattr(self, "sample_kind", "away")
        if arity == 1:
            return [Sample((((3, 5), kind),)), Sample((((37,), kind),)), Sample(((((), kind)),))]
        if arity == 2:
            second = getattr(self, "sample_kind_rhs", kind)
            return [Sample((((3, 5), kind), ((3, 5), second))),
                    Sample((((4, 19), kind), ((19,), second))),
                    Sample((((4, 1), kind), ((1, 6), second))),
                    Sample((((2, 3), kind), ((), second)))]
        return []


def unbroadcast(b, g, like):
    """Sum `g` down to the shape of `like` (the VJP of implicit broadcasting)."""
    if g.shape == like.shape:
        return g
    lead = len(g.shape) - len(like.shape)
    axes = tuple(range(lead)) + tuple(
        lead + k for k, d in enumerate(like.shape) if d == 1 and g.shape[lead + k] != 1)
    s = b.sum(g, axes=axes, keepdims=False)
    if s.shape != like.shape:
        s = b.reshape(s, shape=like.shape)
    return s


def expect(cond: bool, message: str) -> None:
    if not cond:
        raise ShapeMismatch(message)


def fmt_shape(t: TensorType) -> str:
    return str(t)
