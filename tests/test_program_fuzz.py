"""Random whole models, compiled natively, against a straightforward evaluation.

The op tests check each op alone; here a generator writes random valid dense
`.snet` models (inputs of random widths, parameters, some frozen or read
twice, a DAG of the language's tensor ops with values read by several later
nodes, several outputs, one or two losses) so that what the optimiser does to
a whole program (simplify, cse, dce, legalize, materialize, fusion's
epilogues and elementwise groups, losses summed in their loop, memory
planning with buffer reuse, autodiff's stored values) is checked against the
interpreter (float64): outputs, loss, gradients, the held-out loss and its
terms, one SGD step, the first batches again after the largest; and the
interpreter's gradient against float64 central differences, at batches of 1,
3 and 64 of one compiled net. A subprocess with the pool's thresholds at 0
(every kernel of more than one task is handed off) checks that 2 threads give
1 thread's bits, as docs/ARCHITECTURE.md says they do.

Run many programs (mismatches are written to --out; `--histogram` prints the
ops and fused groups the programs make; `--nan` also checks NaN propagation):

    python tests/test_program_fuzz.py --count 300 --seed 1000 --threads --out /tmp/fuzz
"""
from __future__ import annotations

import dataclasses
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from structc.testing import check_held_out, random_feed, thread_bits

HERE = Path(__file__).resolve().parent     # the tests folder: a worker process imports this module from it

WIDTHS = [1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 17, 24, 31, 32, 33, 40, 64, 65, 100]
BATCHES = (1, 3, 64)
SMOOTH = ["tanh", "sigmoid", "gelu", "softplus", "elu", "square"]
KINKED = ["relu", "abs", "leaky_relu"]      # not applied where exact zeros make ties or kinks
ACTIVATIONS = ["relu", "tanh", "sigmoid", "gelu", "elu", "softplus", "leaky_relu"]


@dataclass
class V:
    """A value of the program being written: its name, shape (`"N"` the batch),
    whether it is > 0, within [-1, 1], and whether it may hold exact zeros
    (relu's, a clip's bound): kinks and ties there make finite differences
    meaningless, so kinked ops and maxima leave such values alone."""
    name: str
    shape: tuple
    positive: bool = False
    bounded: bool = False
    zeros: bool = False

    @property
    def batch(self) -> bool:
        return bool(self.shape) and self.shape[0] == "N"


@dataclass
class Gen:
    rng: random.Random
    lines: list = field(default_factory=list)
    values: list = field(default_factory=list)
    count: int = 0
    ops: Counter = field(default_factory=Counter)
    params: list = field(default_factory=list)

    def fresh(self, stem="v") -> str:
        self.count += 1
        return f"{stem}{self.count}"

    widths: list = field(default_factory=lambda: WIDTHS)

    def width(self) -> int:
        return self.rng.choice(self.widths)

    def emit(self, expr: str, shape, op: str, **flags) -> V:
        v = V(self.fresh(), tuple(shape), **flags)
        self.lines.append(f"  {v.name} = {expr}")
        self.values.append(v)
        self.ops[op] += 1
        return v

    def param(self, shape, scale: float = 0.5) -> str:
        name = self.fresh("p")
        dims = ", ".join(map(str, shape))
        frozen = " frozen" if self.rng.random() < 0.15 else ""   # no gradient, no update
        self.lines.append(f"  param {name}: f32[{dims}] = normal({scale}){frozen}")
        self.params.append(V(name, tuple(shape)))
        return name

    def pick(self, ok=lambda v: True) -> V | None:
        """A value, the recent ones likelier, so that chains grow and earlier values are read again."""
        found = [v for v in self.values if ok(v)]
        if not found:
            return None
        k = min(int(self.rng.expovariate(0.35)), len(found) - 1)
        return found[-1 - k] if self.rng.random() < 0.7 else self.rng.choice(found)

    def matrix(self, v: V) -> bool:
        return v.batch and len(v.shape) == 2

    # ---- the ops: each writes one statement or returns None when nothing fits
    def op_dense(self):
        a = self.pick(self.matrix)
        units, bias = self.width(), self.rng.random() < 0.75
        frozen = ", frozen=true" if self.rng.random() < 0.1 else ""
        expr = f"dense({a.name}, {units}{'' if bias else ', bias=false'}{frozen})"
        act = self.rng.choice(ACTIVATIONS + [None, None])
        if act:
            expr += f" |> {act}"
        return self.emit(expr, ("N", units), f"dense+{act or 'none'}{'' if bias else '/nobias'}",
                         positive=act in ("sigmoid", "softplus"), bounded=act in ("tanh", "sigmoid"),
                         zeros=act == "relu" or (a.zeros and not bias))

    def op_matmul(self):
        a = self.pick(self.matrix)
        f, g = a.shape[1], self.width()
        kind = self.rng.choice(["plain", "transposed", "outer", "square", "both", "joined"])
        if kind == "joined" and f >= 2:   # weights joined from two parameters along their rows
            k = self.rng.randint(1, f - 1)
            w = f"concat({self.param((k, g), 1 / np.sqrt(f))}, {self.param((f - k, g), 1 / np.sqrt(f))}, axis=0)"
            return self.emit(f"{a.name} @ {w}", ("N", g), "matmul_joined", zeros=a.zeros)
        if kind == "both":             # (W^T a^T)^T = a W: transposes for legalize to fold
            return self.emit(f"transpose(transpose({self.param((f, g), 1 / np.sqrt(f))}) @ transpose({a.name}))",
                             ("N", g), "matmul_tt", zeros=a.zeros)
        if kind == "plain":
            shared = [p for p in self.params if len(p.shape) == 2 and p.shape[0] == f]
            if shared and self.rng.random() < 0.5:      # a parameter read twice: its gradient is a sum
                w = self.rng.choice(shared)
                return self.emit(f"{a.name} @ {w.name}", ("N", w.shape[1]), "matmul_shared", zeros=a.zeros)
            return self.emit(f"{a.name} @ {self.param((f, g), 1 / np.sqrt(f))}", ("N", g), "matmul", zeros=a.zeros)
        if kind == "transposed":
            return self.emit(f"{a.name} @ transpose({self.param((g, f), 1 / np.sqrt(f))})", ("N", g),
                             "matmul_t", zeros=a.zeros)
        if kind == "square":          # a matrix over the batch reused as weights: [N, F] @ ([F, N] @ [N, F])
            return self.emit(f"tanh(0.1 * ({a.name} @ (transpose({a.name}) @ {a.name})))", ("N", f), "matmul_gram",
                             zeros=a.zeros, bounded=True)
        b = self.pick(self.matrix)     # the batch contracted: [F, G], a weight gradient's shape
        m = self.emit(f"transpose({a.name}) @ {b.name}", (f, b.shape[1]), "matmul_tn", zeros=a.zeros or b.zeros)
        c = self.pick(lambda v: self.matrix(v) and v.shape[1] == f) or a
        return self.emit(f"tanh({c.name} @ {m.name})", ("N", b.shape[1]), "matmul_by_tn", bounded=True)

    def op_unary(self):
        a = self.pick(lambda v: v.batch and v.positive) if self.rng.random() < 0.3 else None
        a = a or self.pick(lambda v: v.batch)
        choices = SMOOTH + ["neg", "scale", "clip"] + ([] if a.zeros else KINKED)
        choices += ["exp", "exp"] if a.bounded else ["exp_tanh"]
        if a.positive:
            choices += ["log", "sqrt", "log"]
        f = self.rng.choice(choices)
        if f == "neg":
            return self.emit(f"-{a.name}", a.shape, f, zeros=a.zeros, bounded=a.bounded)
        if f == "scale":
            c = self.rng.choice([0.5, 2.0, -1.5, 3.0])
            return self.emit(f"{c} * {a.name}", a.shape, f, zeros=a.zeros, positive=a.positive and c > 0)
        if f == "clip":
            return self.emit(f"clip({a.name}, lo=-0.5, hi=0.75)", a.shape, f, bounded=True, zeros=True)
        if f in ("log", "sqrt"):
            return self.emit(f"{f}({a.name} + 0.25)", a.shape, f, zeros=a.zeros)
        if f == "exp_tanh":
            return self.emit(f"exp(tanh({a.name}))", a.shape, "exp", positive=True, zeros=a.zeros)
        return self.emit(f"{f}({a.name})", a.shape, f, positive=f in ("sigmoid", "exp", "softplus"),
                         bounded=f in ("tanh", "sigmoid"), zeros=a.zeros)

    def op_binary(self):
        a = self.pick(lambda v: v.batch)
        form = self.rng.choice(["same", "same", "row", "column", "scalar", "whole", "down"])
        if form == "same":
            b = self.pick(lambda v: v.shape == a.shape) or a
        elif form == "row" and len(a.shape) >= 2:        # [N, ..., F] with [F]: a parameter or a sum over the batch
            f = a.shape[-1]
            if self.rng.random() < 0.5:
                b = V(self.param((f,)), (f,))
            else:
                src = self.pick(lambda v: self.matrix(v) and v.shape[1] == f and len(a.shape) == 2)
                b = self.emit(f"mean({src.name}, axes=(0,))", (f,), "mean_batch", zeros=src.zeros,
                              bounded=src.bounded) if src else \
                    V(self.param((f,)), (f,))
        elif form == "column" and self.matrix(a):        # [N, F] with [N, 1]
            src = self.pick(self.matrix)
            b = self.emit(f"sum({src.name}, axes=(1,), keepdims=true)", ("N", 1), "sum_keep", zeros=src.zeros)
        elif form == "whole":          # a scalar of the whole batch, broadcast everywhere
            src = self.pick(lambda v: v.batch)
            f = self.rng.choice(["mean", "sum"] + ([] if src.zeros else ["max"]))
            b = self.emit(f"{f}({src.name})", (), f"{f}_all", zeros=src.zeros and f == "sum")
        elif form == "down" and self.matrix(a):   # [N, F] with [1, F]: a statistic over the batch
            src = self.pick(lambda v: self.matrix(v) and v.shape[1] == a.shape[1]) or a
            f = self.rng.choice(["mean", "sum"] + ([] if src.zeros else ["max", "min"]))
            b = self.emit(f"{f}({src.name}, axes=(0,), keepdims=true)", (1, a.shape[1]), f"{f}_batch_keep",
                          zeros=src.zeros, bounded=src.bounded and f != "sum")
        else:
            c = self.rng.choice(["0.5", "2.0", "1.25"])
            op = self.rng.choice(["+", "-", "*"])
            expr = f"{a.name} {op} {c}" if self.rng.random() < 0.5 else f"{c} {op} {a.name}"
            return self.emit(expr, a.shape, f"scalar{op}", zeros=a.zeros,
                             positive=a.positive and op != "-")
        shape = a.shape if len(a.shape) >= len(b.shape) else b.shape
        if self.rng.random() < 0.3:
            a, b = b, a                 # the broadcast operand first
        ops = ["+", "-", "*", "*", "/"] + ([] if a.zeros or b.zeros else ["maximum"])
        op = self.rng.choice(ops)
        zeros = a.zeros or b.zeros
        if op == "maximum":
            return self.emit(f"maximum({a.name}, {b.name})", shape, "maximum")
        if op == "/":
            den = f"(square({b.name}) + 0.5)" if not b.positive else f"({b.name} + 0.5)"
            return self.emit(f"{a.name} / {den}", shape, "div", zeros=a.zeros)
        return self.emit(f"{a.name} {op} {b.name}", shape, f"binary{op}", zeros=zeros,
                         positive=a.positive and b.positive and op in "+*", bounded=a.bounded and b.bounded and op == "*")

    def op_concat(self):
        a = self.pick(self.matrix)
        b = self.pick(self.matrix)
        names = [a.name, b.name] + ([self.pick(self.matrix).name] if self.rng.random() < 0.3 else [])
        width = a.shape[1] + b.shape[1] + (self.values_by(names[2]).shape[1] if len(names) == 3 else 0)
        return self.emit(f"concat({', '.join(names)}, axis=1)", ("N", width), f"concat{len(names)}",
                         zeros=any(self.values_by(n).zeros for n in names))

    def values_by(self, name) -> V:
        return next(v for v in self.values if v.name == name)

    def op_chunk(self):
        a = self.pick(lambda v: self.matrix(v) and v.shape[1] % 2 == 0 and v.shape[1] >= 2)
        if a is None:
            return None
        n = max(k for k in (2, 3, 4) if a.shape[1] % k == 0)
        k = self.rng.randrange(n)
        return self.emit(f"chunk({a.name}, {k}, {n})", ("N", a.shape[1] // n), "chunk", zeros=a.zeros,
                         positive=a.positive, bounded=a.bounded)

    def op_reshape(self):
        a = self.pick(lambda v: self.matrix(v) and any(v.shape[1] % p == 0 for p in (2, 3, 4)) and v.shape[1] > 3)
        if a is None:
            return None
        p = self.rng.choice([p for p in (2, 3, 4) if a.shape[1] % p == 0])
        q = a.shape[1] // p
        t = self.emit(f"reshape({a.name}, N, {p}, {q})", ("N", p, q), "reshape", zeros=a.zeros,
                      positive=a.positive, bounded=a.bounded)
        kind = self.rng.choice(["sum1", "sum2", "mean12", "max2", "flatten", "softmax"])
        if kind == "flatten":
            u = self.emit(f"flatten(tanh({t.name}) * {t.name})", ("N", p * q), "flatten", zeros=t.zeros)
        elif kind == "softmax":
            u = self.emit(f"flatten(softmax({t.name}))", ("N", p * q), "softmax3", positive=True, bounded=True,
                          zeros=t.zeros)
        elif kind == "max2" and not t.zeros:
            u = self.emit(f"max({t.name}, axes=(2,))", ("N", p), "max3")
        elif kind == "mean12":
            u = self.emit(f"mean({t.name}, axes=(1, 2), keepdims=true)", ("N", 1, 1), "mean3")
            return self.emit(f"{t.name} - {u.name}", t.shape, "center3", zeros=t.zeros)
        else:
            axis = 1 if kind == "sum1" else 2
            u = self.emit(f"sum({t.name}, axes=({axis},))", ("N", q if axis == 1 else p), "sum3", zeros=t.zeros)
        return u

    def op_reduce(self):
        a = self.pick(self.matrix)
        kinds = ["sum", "mean"] + ([] if a.zeros else ["max", "min"])
        f = self.rng.choice(kinds)
        keep = self.rng.random() < 0.6
        r = self.emit(f"{f}({a.name}, axes=(1,){', keepdims=true' if keep else ''})",
                      ("N", 1) if keep else ("N",), f"{f}_rows", zeros=a.zeros and f == "sum")
        if keep:        # broadcast back over the row: a normalisation's shape of work
            return self.emit(f"{a.name} - {r.name}", a.shape, "sub_rowstat", zeros=a.zeros)
        return r

    def op_softmax(self):
        a = self.pick(self.matrix)
        if self.rng.random() < 0.5:
            return self.emit(f"softmax({a.name})", a.shape, "softmax", positive=True, bounded=True, zeros=a.zeros)
        return self.emit(f"log_softmax({a.name})", a.shape, "log_softmax", zeros=a.zeros)

    def op_where(self):
        a = self.pick(lambda v: v.batch and not v.zeros)
        # two bounded values tie where both saturate (tanh at +-1 in float32, not in float64:
        # `v = tanh(..); where(greater(v, v * mean(v)), ..)` at a batch of one)
        b = self.pick(lambda v: v.shape == a.shape and not v.zeros and v is not a and not (a.bounded and v.bounded))
        if b is None:
            return None
        return self.emit(f"where(greater({a.name}, {b.name}), {a.name}, 0.5 * {b.name})", a.shape, "where")

    def op_gather(self):
        width = self.width()
        if not hasattr(self, "ids"):
            self.ids = self.fresh("ids")
            self.vocab = self.rng.choice([3, 7, 11])
            self.decls.append(f"  input {self.ids}: class[N] of {self.vocab}")
        table = self.param((self.vocab, width), 0.5)
        return self.emit(f"{table}[{self.ids}]", ("N", width), "gather")

    def op_conv(self):
        """A dense reshaped into images, a convolution, maybe a pooling, back to a matrix."""
        a = self.pick(self.matrix)
        c, h, w = self.rng.choice([1, 2, 3]), self.rng.randint(3, 7), self.rng.randint(3, 7)
        img = self.emit(f"reshape(dense({a.name}, {c * h * w}), N, {c}, {h}, {w})", ("N", c, h, w), "reshape4")
        k, stride = self.rng.choice([1, 2, 3]), self.rng.choice([1, 1, 2])
        pad = self.rng.choice(["valid", "same"])
        if pad == "valid":
            k = min(k, h, w)
            h2, w2 = (h - k) // stride + 1, (w - k) // stride + 1
        else:
            h2, w2 = -(-h // stride), -(-w // stride)
        out = self.rng.choice([1, 2, 4, 5])
        act = self.rng.choice(["relu", "tanh", None])
        expr = f"conv2d({img.name}, {out}, kernel={k}, stride={stride}, padding={pad}" \
               f"{'' if self.rng.random() < 0.7 else ', bias=false'})" + (f" |> {act}" if act else "")
        y = self.emit(expr, ("N", out, h2, w2), f"conv2d+{act or 'none'}", zeros=act == "relu")
        pool = self.rng.choice(["max", "avg", "global", None])
        if pool in ("max", "avg") and h2 >= 2 and w2 >= 2 and not (pool == "max" and y.zeros):
            y = self.emit(f"{pool}pool2d({y.name}, 2)", ("N", out, h2 // 2, w2 // 2), f"{pool}pool2d", zeros=y.zeros)
            h2, w2 = h2 // 2, w2 // 2
        if pool == "global":
            return self.emit(f"global_avg_pool({y.name})", ("N", out), "global_avg_pool", zeros=y.zeros)
        return self.emit(f"flatten({y.name})", ("N", out * h2 * w2), "flatten4", zeros=y.zeros)

    def op_norm(self):
        a = self.pick(lambda v: self.matrix(v) and v.shape[1] >= 2)
        if a is None:
            return None
        # of a dense's result: a value constant along the normalised axis (a statistic of the
        # batch, a column repeated) is normalised by sqrt(eps), and float32's rounding with it
        kind = "layer_norm" if self.rng.random() < 0.6 else "batch_norm"
        return self.emit(f"{kind}(dense({a.name}, {a.shape[1]}))", a.shape, kind)

    def op_outer(self):
        """[N, 1] against [F]: a broadcast of both operands."""
        a = self.pick(self.matrix)
        col = self.emit(f"mean({a.name}, axes=(1,), keepdims=true)", ("N", 1), "mean_keep", zeros=a.zeros)
        f = self.width()
        op = self.rng.choice(["*", "+", "-"])
        return self.emit(f"{col.name} {op} {self.param((f,))}", ("N", f), f"outer{op}")

    def op_onehot(self):
        if not hasattr(self, "ids"):
            return self.op_gather()
        width = self.width()
        table = self.param((self.vocab, width), 0.5)
        return self.emit(f"onehot({self.ids}, {self.vocab}) @ {table}", ("N", width), "onehot_matmul")

    def op_repeat(self):
        """`repeat k { h = dense(h, F) |> act }`: layers of their own, a name rebound."""
        a = self.pick(self.matrix)
        h = self.emit(a.name, a.shape, "alias", zeros=a.zeros, positive=a.positive, bounded=a.bounded)
        k, act = self.rng.choice([2, 3]), self.rng.choice(["tanh", "relu", "sigmoid"])
        self.lines.append(f"  repeat {k} {{ {h.name} = dense({h.name}, {a.shape[1]}) |> {act} }}")
        h.zeros, h.positive, h.bounded = act == "relu", act == "sigmoid", act != "relu"
        return h

    def op_compare(self):
        """A comparison as a mask (no gradient passes it) or as `where`'s condition."""
        a = self.pick(lambda v: v.batch and not v.zeros)
        b = self.pick(lambda v: v.shape == a.shape and not v.zeros and v is not a)
        if b is None:
            return None
        cmp = self.rng.choice(["greater", "greater_equal", "less", "less_equal"])
        if self.rng.random() < 0.5:
            return self.emit(f"{a.name} * {cmp}({a.name}, {b.name})", a.shape, f"mask_{cmp}", zeros=True)
        return self.emit(f"where({cmp}({a.name}, {b.name}), {b.name}, {a.name})", a.shape, f"where_{cmp}")

    def op_ints(self):
        """Integer ids in float arithmetic (converted in the fused loop)."""
        if not hasattr(self, "ids"):
            return self.op_gather()
        a = self.pick(self.matrix)
        return self.emit(f"{a.name} + reshape({self.ids}, N, 1) * 0.25", a.shape, "int_arith", zeros=a.zeros)

    def op_dropout(self):
        a = self.pick(lambda v: v.batch)
        p = self.rng.choice([0.1, 0.5])
        return self.emit(f"dropout({a.name}, {p})", a.shape, "dropout", zeros=True)

    OPS = {"dropout": 1, "compare": 1, "ints": 1, "repeat": 1, "conv": 1, "norm": 1, "outer": 1, "onehot": 1, "dense": 5, "matmul": 3, "unary": 5, "binary": 6, "concat": 2, "chunk": 1, "reshape": 1,
           "reduce": 2, "softmax": 1, "where": 1, "gather": 1}

    def program(self, size: int) -> str:
        self.decls = []
        for k in range(self.rng.choice([1, 1, 2, 3])):
            v = V(f"x{k}", ("N", self.width()))
            self.decls.append(f"  input {v.name}: f32[N, {v.shape[1]}]")
            self.values.append(v)
        names, weights = zip(*self.OPS.items())
        while self.count < size:
            op = self.rng.choices(names, weights)[0]
            getattr(self, f"op_{op}")()
        # several outputs: any value (an input, a matrix over the batch), the same one twice
        outs = [self.pick() for _ in range(self.rng.choice([1, 2, 3]))]
        for k, v in enumerate(outs):
            expr = f"transpose({v.name})" if len(v.shape) == 2 and self.rng.random() < 0.15 else v.name
            self.lines.append(f"  output o{k} = {expr}")
        self.losses()
        return "model Fuzz {\n" + "\n".join(self.decls + self.lines) + "\n}\n"

    def losses(self):
        kinds = self.rng.choice([["ce"], ["mse"], ["bce"], ["ce", "mse"], ["mse", "mse"], ["ce", "penalty"],
                                 ["mse", "mean"]])
        for k, kind in enumerate(kinds):
            a = self.pick(self.matrix)
            if kind == "ce":
                c = a.shape[1]
                if c < 2 or self.rng.random() < 0.3:
                    c = self.rng.choice([2, 3, 10])
                    a = self.emit(f"dense({a.name}, {c})", ("N", c), "dense+none")
                self.decls.append(f"  target y{k}: class[N] of {c}")
                self.lines.append(f"  loss cross_entropy({a.name}, y{k})")
            elif kind == "bce":
                self.decls.append(f"  target t{k}: f32[N, {a.shape[1]}]")
                self.lines.append(f"  loss binary_cross_entropy({a.name}, sigmoid(t{k}))")
            elif kind == "mse":
                self.decls.append(f"  target t{k}: f32[N, {a.shape[1]}]")
                self.lines.append(f"  loss mse({a.name}, t{k})")
            elif kind == "mean":         # a loss of the language's arithmetic, summed in its own loop
                self.lines.append(f"  loss 0.5 * mean(square({a.name} - 0.25))")
            else:                        # a penalty on the weights: a sum of two means over different things
                a = self.rng.choice(self.params) if self.params else a
                self.lines.append(f"  loss 0.01 * mean(square({a.name}))")
            self.ops[f"loss_{kind}"] += 1


def generate(seed: int, size: int | None = None, widths=WIDTHS) -> tuple[str, Counter]:
    """A random valid dense model (its source) and the ops it was written with."""
    rng = random.Random(seed)
    gen = Gen(rng, widths=list(widths))
    source = gen.program(size or rng.randint(3, 16))
    return source, gen.ops


# ---- checking one program
def model_of(source):
    from structc.build import build_model
    from structc.syntax import parse
    return build_model(parse(source, "<fuzz>"), None)




def params_of(mdef, rng) -> dict:
    """Random parameters: biases too (zeros would hide a bias added twice or not at all)."""
    out = {}
    for name, spec in mdef.params.items():
        shape = tuple(spec.type.shape)
        scale = 1 / np.sqrt(shape[0]) if len(shape) == 2 else 0.5
        out[name] = (rng.normal(size=shape) * scale).astype(np.float32)
        if name.endswith(".var"):       # batch norm's running variance
            out[name] = np.abs(out[name]) + 0.5
    return out


def close(got, want, what, rtol=2e-3, f32=None):
    """float32 against float64: relative to the array's own scale, as sums
    cancel; `f32`, the interpreter's result in float32, shows how much of the
    difference float32's rounding alone makes where the program cancels (a
    sum of centred values, a statistic of a column that does not vary)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    noise = 0.0 if f32 is None or not want.size else 8 * float(np.max(np.abs(np.asarray(f32, np.float64) - want)))
    bad = ~(np.abs(got - want) <= rtol * np.abs(want) + rtol * scale * 0.1 + noise)
    bad &= ~(np.isnan(got) & np.isnan(want))
    if bad.any():
        k = np.flatnonzero(bad.reshape(-1))[0]
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} differ, first at flat {k}: "
                             f"{got.reshape(-1)[k]!r} for {want.reshape(-1)[k]!r} (float32's rounding alone: {noise / 8:.3g})")


def fix_dropout(graphs, seed: int = 0, step: int = 1) -> None:
    """Dropout's masks as a Net compiled with `seed` draws them at training call
    `step` (`Net._draws` is set to step - 1 before each call), so the interpreter
    evaluates the same masks."""
    key = np.random.SeedSequence(seed).generate_state(2, np.uint32)
    for graph in graphs:
        for node in graph.nodes.values():
            if node.op.name == "dropout_mask":
                node.attrs["counters"] = (int(key[0]), int(key[1]), step)


def training_call(net, call, **feed):
    """`call` (net.grad, net.train_step) as the first training call: dropout's step 1."""
    net._draws = 0
    return call(**feed)


def check_program(source: str, seed: int = 0, batches=BATCHES, fd_coords: int = 4, nan: bool = False) -> dict:
    """Native forward, loss and gradients against the interpreter, at each batch
    of one compiled net; the interpreter's gradient against float64 central
    differences on a few coordinates. Raises AssertionError naming what differs;
    returns the Net's parameters used (for the threads' check)."""
    import warnings

    import structc
    from structc.autodiff import differentiate
    from structc.compiler import eval_loss_graph, forward_graph
    from structc.denominator import weigh_loss_terms
    from structc.model import BatchTooSmall
    from structc.interp import evaluate
    rng = np.random.default_rng(seed)
    mdef = model_of(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", structc.errors.GradientWarning)
        net = structc.compile(source)
    params = params_of(mdef, rng)
    for k, v in params.items():
        net.params[k] = v
    weighed = mdef.graph.copy()     # as the compiler prepares it: a loss of several means is weighed by terms
    weigh_loss_terms(weighed)
    # the entries without dropout first: fixed counters (below) keep a mask even in inference form
    fwd, held_out = forward_graph(mdef), eval_loss_graph(dataclasses.replace(mdef, graph=weighed))
    train = differentiate(mdef.graph)
    fix_dropout([mdef.graph, train])
    targets = {k for k, s in mdef.inputs.items() if s.kind == "target"}
    buffers = set(net.meta.get("buffers", ()))      # batch norm's running statistics: each training call moves them
    frozen = {k for k, p in mdef.params.items() if p.frozen} - buffers
    trained = sorted(set(params) - buffers - frozen)
    runs = []
    for n in batches:
        params = {k: v.copy() for k, v in net.params.items()}
        feed = random_feed(mdef, n, rng)
        inputs = {k: v for k, v in feed.items() if k not in targets}
        got = net.forward(**inputs)
        want, want32 = evaluate(fwd, inputs, params), evaluate(fwd, inputs, params, dtype=np.float32)
        for name in want:
            close(got[name], want[name], f"batch {n}: output {name}", f32=want32[name])
        if net.meta["batch_counts"] and n == 1:     # a batch norm the loss reads (a dead one is not refused)
            with pytest.raises(BatchTooSmall):
                training_call(net, net.grad, **feed)
            continue
        ref, ref32 = evaluate(train, feed, params), evaluate(train, feed, params, dtype=np.float32)
        loss, grads = training_call(net, net.grad, **feed)
        close(loss, ref["loss"], f"batch {n}: loss", f32=ref32["loss"])
        assert set(grads) == set(params), f"gradients of {sorted(grads)}, parameters {sorted(params)}"
        for name in trained:
            close(grads[name], ref[f"grad:{name}"], f"batch {n}: gradient of {name}", f32=ref32[f"grad:{name}"])
        for name in frozen:
            assert not np.any(grads[name]), f"batch {n}: frozen {name} has a gradient"
        runs.append((params, feed, inputs, got, loss, grads))
        now = {k: v.copy() for k, v in net.params.items()}     # the running statistics grad moved
        outs, evaluated = check_held_out(net, held_out, feed, feed, now, close, f"batch {n}")
        for name in want:
            close(outs[name], evaluated[name], f"batch {n}: evaluate_batch's output {name}", f32=want32.get(name))
        if n == batches[-1] or fd_coords == 0 or not trained:
            continue
        p64 = {k: v.astype(np.float64) for k, v in params.items()}
        names = trained
        for _ in range(fd_coords):
            name = names[rng.integers(len(names))]
            k = int(rng.integers(p64[name].size))
            analytic = float(ref[f"grad:{name}"].reshape(-1)[k])
            numeric = [central_difference(mdef.graph, feed, p64, name, k, h) for h in (1e-6, 1e-4)]
            # rounding error of a difference of losses ~ eps * |loss| / h: a large loss needs a margin
            atol = 1e-6 + 1e-8 * abs(float(ref["loss"]))
            assert any(np.isclose(analytic, d, rtol=1e-4, atol=atol) for d in numeric), \
                f"batch {n}: d loss / d {name}[{k}]: autodiff {analytic!r}, finite differences {numeric!r}"
    # the first batches again, after the largest: the same bits (no state left behind)
    for params, feed, inputs, got, loss, grads in runs[:-1]:
        n = len(next(iter(feed.values())))
        for k, v in params.items():
            net.params[k] = v
        again = net.forward(**inputs)
        for name in got:
            assert np.array_equal(again[name], got[name], equal_nan=True), f"batch {n} again: output {name}"
        loss2, grads2 = training_call(net, net.grad, **feed)
        assert loss2 == loss or (loss != loss and loss2 != loss2), f"batch {n} again: loss {loss2!r}, first {loss!r}"
        for name in grads:
            assert np.array_equal(grads2[name], grads[name], equal_nan=True), f"batch {n} again: gradient of {name}"
    if nan:         # a NaN in one input: the same NaNs as numpy's, nothing finite made of it
        feed = random_feed(mdef, 3, rng)
        floats = sorted(k for k, v in feed.items() if v.dtype.kind == "f" and k not in targets)
        name = floats[rng.integers(len(floats))] if floats else None
        if name is not None:
            feed[name].reshape(-1)[rng.integers(feed[name].size)] = np.nan
            params = {k: v.copy() for k, v in net.params.items()}
            inputs = {k: v for k, v in feed.items() if k not in targets}
            got, want = net.forward(**inputs), evaluate(fwd, inputs, params)
            for k in want:
                assert np.array_equal(np.isnan(got[k]), np.isnan(want[k])), \
                    f"a NaN in {name}: output {k} has NaN at {np.argwhere(np.isnan(got[k])).tolist()[:4]}, " \
                    f"numpy at {np.argwhere(np.isnan(want[k])).tolist()[:4]}"
    # one SGD step from there: the same loss, each parameter moved by -lr times its gradient
    if runs:
        params, feed, _, _, loss, grads = runs[-1]
        for k, v in params.items():
            net.params[k] = v
        stepped = training_call(net, net.train_step, lr=0.5, **feed)
        assert stepped == loss or loss != loss, f"train_step's loss {stepped!r}, grad's {loss!r}"
        for name in trained:
            close(net.params[name], params[name] - 0.5 * grads[name].astype(np.float64), f"after a step: {name}")
        for name in frozen:
            assert np.array_equal(net.params[name], params[name]), f"a step moved frozen {name}"
    return params


def central_difference(graph, feed, p64, name, k, h) -> float:
    from structc.interp import evaluate
    vals = []
    for sign in (1, -1):
        p = {**p64, name: p64[name].copy()}
        p[name].reshape(-1)[k] += sign * h
        vals.append(float(evaluate(graph, feed, p, outputs=["loss"])["loss"]))
    return (vals[0] - vals[1]) / (2 * h)
    return params


THREADS_SCRIPT = r"""
import json, sys, warnings
import numpy as np
import structc
from structc import _runtime
sys.path.insert(0, sys.argv[1])
from test_program_fuzz import model_of, random_feed, params_of
found, handoffs = [], 0
for item in json.loads(sys.stdin.read()):
    source, seed = item["source"], item["seed"]
    mdef = model_of(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = structc.compile(source)
    rng = np.random.default_rng(seed)
    for k, v in params_of(mdef, rng).items():
        net.params[k] = v
    targets = {k for k, s in mdef.inputs.items() if s.kind == "target"}
    for n in item["batches"]:
        feed = random_feed(mdef, n, rng)
        runs, start = [], {k: v.copy() for k, v in net.params.items()}
        for threads in (1, 2):
            structc.set_num_threads(threads)
            for k, v in start.items():      # grad moves batch norm's running statistics
                net.params[k] = v
            before = _runtime.handoffs()
            outs = net.forward(**{k: v for k, v in feed.items() if k not in targets})
            if net.meta.get("buffers") and n == 1:      # batch norm trains on more than one
                loss, grads = 0.0, {}
            else:
                net._draws = 0                      # dropout's masks of the first training call
                loss, grads = net.grad(**feed)
            handoffs += (_runtime.handoffs() - before) * (threads == 2)
            runs.append((outs, loss, grads))
        (o1, l1, g1), (o2, l2, g2) = runs
        diff = [f"output {k}" for k in o1 if not np.array_equal(o1[k], o2[k], equal_nan=True)]
        diff += ["loss"] if not (l1 == l2 or (l1 != l1 and l2 != l2)) else []
        diff += [f"gradient of {k}" for k in g1 if not np.array_equal(g1[k], g2[k], equal_nan=True)]
        if diff:
            found.append({"seed": seed, "batch": n, "differ": diff})
print(json.dumps({"mismatches": found, "handoffs": handoffs}))
"""




# ---- what the programs exercise
def compiled_graphs(source: str) -> list:
    """The forward and training graphs of `source` through the compiler's passes
    (`structc compile --dump train.fuse` prints the training one)."""
    from structc.autodiff import differentiate_checked
    from structc.compiler import arena_layout, forward_graph, train_graph
    from structc.denominator import weigh_loss_terms
    from structc.passes import run_pipeline
    from structc.passes.message import prepare
    mdef = model_of(source)
    graph = prepare(mdef.graph.copy(), None)
    weigh_loss_terms(graph)
    mdef = dataclasses.replace(mdef, graph=graph)
    _, _, update_size, decay_end = arena_layout(mdef, frozenset())
    differentiated, _ = differentiate_checked(mdef.graph, frozen=frozenset())
    return [run_pipeline(g) for g in (forward_graph(mdef),
                                      train_graph(mdef, update_size, frozenset(), decay_end, differentiated))]


def fused_groups(source: str) -> Counter:
    """The fused groups of the forward and training graphs, by kind and member
    ops in order (`epilogue:matmul+add+relu`)."""
    groups = Counter()
    for g in compiled_graphs(source):
        for group in g.groups:
            groups[f"{group.kind}:{'+'.join(g.nodes[m].op.name for m in group.members)}"] += 1
    return groups


# ---- the tests
FAST_SEEDS = range(20)


def test_generated_programs_build_and_vary():
    """The generator writes valid models, and of the kinds the passes care about."""
    ops = Counter()
    for seed in range(200):
        source, used = generate(seed)
        model_of(source)
        ops += used
    for op in ["dense+relu", "dense+none", "matmul", "matmul_t", "matmul_tn", "concat2", "chunk", "reshape",
               "sum_rows", "max_rows", "softmax", "log_softmax", "where", "gather", "div", "maximum", "exp",
               "log", "loss_ce", "loss_mse"]:
        assert ops[op] > 0, f"no program uses {op}: {sorted(ops)}"


@pytest.mark.parametrize("seed", FAST_SEEDS)
def test_native_matches_the_interpreter(seed):
    source, _ = generate(seed)
    try:
        check_program(source, seed)
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- program (seed {seed}) ---\n{source}") from None


def test_two_threads_give_one_threads_bits():
    items = [{"source": generate(seed)[0], "seed": seed, "batches": list(BATCHES)} for seed in FAST_SEEDS]
    found = thread_bits(THREADS_SCRIPT, items, HERE)
    assert found["handoffs"] > 0, "nothing was handed to the pool: the comparison checked nothing"
    assert not found["mismatches"], found["mismatches"]


@pytest.mark.slow
def test_more_programs_match_the_interpreter():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))   # more: the script mode
    @given(st.integers(1000, 10**9), st.integers(3, 24))
    def run(seed, size):
        source, _ = generate(seed, size)
        try:
            check_program(source, seed, fd_coords=2)
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- program (seed {seed}, size {size}) ---\n{source}") from None
    run()


# ---- many programs, from the command line
def main(argv=None):
    import argparse
    import time
    import traceback
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--size", type=int, default=None, help="statements per program (default: random 3-16)")
    ap.add_argument("--out", default="/tmp/h35-fuzz-work")
    ap.add_argument("--widths", default=",".join(map(str, WIDTHS)), help="the widths values may have")
    ap.add_argument("--batches", default="1,3,64", help="batch sizes, the last compared without finite differences")
    ap.add_argument("--nan", action="store_true", help="also put a NaN in an input: the same NaNs as numpy")
    ap.add_argument("--histogram", action="store_true", help="print the ops and fused groups made")
    ap.add_argument("--threads", action="store_true", help="also compare 1 and 2 threads bitwise")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ops, groups, failures, t0 = Counter(), Counter(), 0, time.time()
    items = []
    for seed in range(args.seed, args.seed + args.count):
        source, used = generate(seed, args.size, [int(w) for w in args.widths.split(",")])
        ops += used
        try:
            check_program(source, seed, batches=tuple(int(b) for b in args.batches.split(",")), nan=args.nan)
        except Exception as e:
            failures += 1
            text = e if isinstance(e, AssertionError) else traceback.format_exc()
            (out / f"fail-{seed}.snet").write_text(source + "\n# " + str(text).replace("\n", "\n# ") + "\n")
            print(f"seed {seed}: {str(text).splitlines()[0] if str(text) else type(e).__name__}", flush=True)
        if args.histogram:
            try:
                groups += fused_groups(source)
            except Exception:       # a compiler failure: reported above
                pass
        items.append({"source": source, "seed": seed, "batches": [int(b) for b in args.batches.split(",")]})
    print(f"{args.count} programs, {failures} failures, {time.time() - t0:.0f} s")
    if args.threads:
        found = thread_bits(THREADS_SCRIPT, items, HERE)
        print(f"threads: {len(found['mismatches'])} mismatches, {found['handoffs']} jobs handed off")
        for m in found["mismatches"]:
            print("  ", m)
    if args.histogram:
        print("ops:", ", ".join(f"{k} {v}" for k, v in ops.most_common()))
        print("groups:")
        for k, v in groups.most_common(60):
            print(f"  {v:5d}  {k}")


if __name__ == "__main__":
    main()
