"""A leaf case computed once per distinct word.

A forest's leaves repeat words (a sentence batch repeats "the", a formula
"T"), and a leaf case that reads only its word, such as a Tree-LSTM's

    leaf: lstm_state(dense(E[n.word], 3H), 0)

gives every leaf of one word the same state. `by_distinct_word` rebuilds such
a case over the forest's distinct leaf words (`t.leaf_words`, ascending; its
count the dimension `t.leaf_words`) and gathers each leaf's row from that
(`t.leaf_kind`: the leaf's index among them), so the dense layer and the gate
math run once per word of the batch, not once per leaf; the backward sums each
word's leaves' cotangents first (the gather's VJP), then runs once per word.

It applies only where the result cannot change: every op between `n.word`
and the case's value works row by row (the allowlist below), and every other
operand is computed from parameters, constants and inputs without the leaf
dimension alone (a mean over the leaves, a per-leaf input or random numbers
refuse it). It pays only for real
work per row, so a case without a matmul or gate math (`E[n.word]` alone) is
left as it is.
"""
from __future__ import annotations

from .graph import Builder, Value
from .types import TensorType

#: ops that do the work the rewrite saves
WORK = {"matmul", "lstm_state"}
#: ops without operands a value may be computed from and still be the same for every row
#: (a model input without the leaf dimension: a fixed embedding passed in)
SOURCES = {"param", "const", "input"}


def by_distinct_word(mb, decl, leaf: Value) -> Value:
    """`leaf` [t.leaves, d] as gather_rows(the case over t.leaf_words, t.leaf_kind)
    when that gives the same values (see the module docstring), else `leaf`."""
    from .recursion import add_forest_array, forest_array
    g = mb.graph
    words = g.inputs.get(f"{decl.name}.words")
    if words is None:
        return leaf
    leaves = decl.sym("leaves")
    region = g.reachable([words]) & (g.ancestors(leaf.id) | {leaf.id})
    region.discard(words)
    if leaf.id not in region or not any(g.nodes[n].op.name in WORK for n in region):
        return leaf
    fixed: dict[int, bool] = {}
    if not all(_row_by_row(g, n, region | {words}, words, leaves, fixed) for n in region):
        return leaf

    kinds = decl.sym("leaf_words")
    mb.symbols.add(kinds)
    decl.kinds = True
    add_forest_array(mb, decl, "leaf_words", TensorType((kinds,), "i32"), decl.span)
    add_forest_array(mb, decl, "leaf_kind", TensorType((leaves,), "i32"), decl.span)
    new_of = {words: forest_array(mb, decl, "leaf_words").id}
    for n in g.topo():
        if n in region:
            node = g.nodes[n]
            new_of[n] = g.add(node.op, [new_of.get(i, i) for i in node.inputs], node.attrs, node.span)
    b = Builder(g, g.nodes[leaf.id].span)
    return b.gather_rows(b.value(new_of[leaf.id]), forest_array(mb, decl, "leaf_kind"))


def _row_by_row(g, n: int, region: set, words: int, leaves: str, fixed: dict) -> bool:
    """Is row r of node n computed from row r of its operands in the region alone,
    its other operands the same for every row?"""
    node = g.nodes[n]
    if len(node.shape) != 2 or node.shape[0] != leaves:
        return False
    name, traits = node.op.name, node.op.traits
    if words in node.inputs and name not in ("gather_rows", "onehot"):
        return False
    inside = [i in region for i in node.inputs]
    others_fixed = all(inn or _fixed(g, i, leaves, fixed) for i, inn in zip(node.inputs, inside))
    if name in ("gather_rows", "onehot"):
        return node.inputs[-1] == words and not any(inside[:-1]) and others_fixed
    if name == "matmul":
        return inside == [True, False] and not node.attrs.get("ta") and others_fixed
    if name == "lstm_state":
        return inside[0] and others_fixed
    if name in ("slice", "concat"):
        return node.attrs.get("axis") in (1, -1) and all(inside)
    if "elementwise" in traits and not traits & {"needs_dims", "moves_data", "indexed", "random"}:
        return others_fixed
    return False


def _fixed(g, n: int, leaves: str, memo: dict) -> bool:
    """Is node n computed from parameters, constants and inputs alone (so the same
    for every row), with no leaf dimension in its shape or its operands'?"""
    if n not in memo:
        node = g.nodes[n]
        if leaves in node.shape:
            memo[n] = False
        elif not node.inputs:
            memo[n] = node.op.name in SOURCES
        else:
            memo[n] = all(_fixed(g, i, leaves, memo) for i in node.inputs)
    return memo[n]
