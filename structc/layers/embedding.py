"""Embeddings in the language: `onehot(ids, C)`, `E[ids]` (rows of a table,
`ops/embedding.py`'s `gather_rows`) and the `embedding(V, d)` parameter type."""
from __future__ import annotations

from ..errors import SnetTypeError
from ..graph import Value
from ..types import TensorType
from .context import surface


@surface("onehot")
def onehot(ctx, ids, classes=None):
    """onehot(ids, classes): one row per id, 1 in column ids[i] (classes defaults to a forest's vocabulary)."""
    ids = ctx.expect_tensor(ids, "onehot")
    if classes is None:
        classes = ids.node.attrs.get("classes") if ids.node.op.name == "input" else None
        if not classes:
            ctx.fail("onehot needs the number of classes: onehot(ids, classes)")
    classes = ctx.expect_int(classes, "classes")
    declared = ids.node.attrs.get("classes", 0) if ids.node.op.name == "input" else 0
    if declared > classes:      # the ids past the columns would give rows of zeros
        ctx.fail(f"onehot: the ids lie in [0, {declared}) but there are only {classes} columns")
    return ctx.checked(lambda: ctx.b.onehot(ids, classes=classes))


def index(ctx, base, idx):
    """`E[ids]`: the rows of a matrix picked by a vector of integer ids."""
    if not isinstance(base, Value) or not isinstance(idx, Value):
        ctx.fail("indexing picks rows of a matrix with a vector of integer ids, e.g. E[n.word]")
    if base.type.rank != 2 or not base.type.is_float:
        ctx.fail(f"only the rows of a float matrix can be picked, got {base.type}")
    if idx.type.rank != 1 or idx.type.dtype not in ("i32", "i64"):
        ctx.fail(f"rows are picked with a vector of integer ids, got {idx.type}")
    ids = idx.node.attrs.get("classes", 0) if idx.node.op.name == "input" else 0
    rows = base.shape[0]
    if ids and isinstance(rows, int) and ids > rows:     # the kernel would clamp the extra ids: wrong rows
        ctx.fail(f"the ids lie in [0, {ids}) but the matrix {base.type} has only {rows} rows")
    return ctx.b.gather_rows(base, idx)


def embedding_param_type(call) -> tuple[TensorType, tuple]:
    """`param E: embedding(V, d)`: a learned f32[V, d] table, N(0, 1) like PyTorch's."""
    args = [getattr(a, "value", None) for a in call.args]
    if call.kwargs or len(args) != 2 or not all(isinstance(a, int) and a > 0 for a in args):
        raise SnetTypeError("embedding takes the vocabulary size and the dimension: embedding(V, d)", call.span)
    return TensorType((args[0], args[1]), "f32"), ("normal", (1.0,))
