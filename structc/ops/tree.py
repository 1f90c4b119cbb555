"""Recursion over the trees of a forest: `tree_map` and its gradient.

A recursive definition `rec h(n) = leaf: ... node: ...` becomes one node

    H = tree_map[body](children, level_end, roots, leaf_states, scratch..., *params)

whose `body` attribute is a sub-graph: the node case, a function of one row
per node, `h = body(C)`, where C = [h(child 0), ..., h(child A-1)] (a
missing child's state is zero) is the body's input `children`:
f32[rows, A*d]. The leaf case is ordinary graph work over the leaves, whose
states are H's first rows (nodes are in schedule order, see `forest`):

    H[i] = leaf_states[i]                             i < leaves
    H[i] = body(H[child_0(i)], ..., H[child_A-1(i)])  otherwise, in order of height

A body may read more row-aligned inputs: node i's row of a [nodes, ...]
array given after the scratch operands (`node_inputs` names them in the
body: a word or feature vector at every node, `forest(inner=true)`, and the
child-presence mask of per-child terms). They are data: no cotangent flows
to them (a parameter they index, an embedding, gets its gradient as usual).

The VJP walks the heights in reverse: with dH the total cotangent of each
node (gH plus what its parent sends down, stored once per node),

    dC = ∂body/∂C^T dH[level]  scattered to the children's rows of dH,
    dθ = Σ_nodes ∂body/∂θ^T dH[node],

both obtained by running `autodiff.differentiate` on the body sub-graph
(`derive_backward`). `tree_map_grad` yields dH, whose first rows are the
leaf states' cotangent (`tree_leaf_rows`, a view), and one `tree_grad_part`
per parameter, computed by the same kernel; the forward kernel keeps the
gathered children (`tree_children`) for it, and the forward values the VJP
would recompute through a matmul (`tree_kept`: an LSTM's gates); cotangents
both backward programs need are written once per level (`_shared_cotangents`). The references evaluate the
recursion node by node with the interpreter: they are the meaning that the
level-batched native code (`lower/treemap.py`) is tested against.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ..errors import ShapeMismatch
from ..types import TensorType
from .base import REGISTRY, Op, Sample, expect
from .recurrent import kernel_parts

BODY_ROWS = "rows"          # the body's batch dimension: one row per node
BODY_KIDS = "kids"          # rows x arity: one row per child slot (per-child terms)
BLOCK = "children"          # the body's input of gathered children's states
_tags = itertools.count(1)


def child_blocks(blocks: tuple, width: int) -> list:
    """[(body input, first column in H, columns)] of the gathered children:
    one block of the states side by side (`children`, [rows, A*width]), or,
    with `blocks` ((k, at, w), ...), one block per state a node case reads
    (`children.<k>`, [rows, A*w]: a child's state k alone, so that `h(k)`
    over the child slots is a view and a chain's `h(t.prev)` the block itself)."""
    if not blocks:
        return [(BLOCK, 0, width)]
    return [(f"{BLOCK}.{k}", at, w) for k, at, w in blocks]


def is_block(name: str) -> bool:
    return name == BLOCK or name.startswith(BLOCK + ".")


def cotangent_names(name: str) -> tuple:
    """A block's names in the backward programs: (its input, its cotangent output)."""
    tail = name[len(BLOCK):]
    return "@C" + tail, "dC" + tail


@dataclass(eq=False)
class BodyProgram:
    """A body sub-graph after the pass pipeline, with its memory plan's bounds.

    The workspace of a per-level call is bounded by `rows_floats` per row;
    buffers whose size does not grow with the rows live in a fixed scratch:
    its own at `fixed` offsets, the values of `pre` at `inv` offsets, and
    `pre`'s own buffers from `pre_base` on. `pre` computes, once per call
    of the tree kernel, what depends on parameters only (a transposed
    weight): loop-invariant code hoisted out of the loop over levels."""
    name: str
    graph: object
    rows_floats: int
    fixed: dict                 # node id -> offset (floats) in the fixed scratch
    fixed_floats: int           # the whole fixed scratch, `pre` included
    pre: "BodyProgram | None" = None
    inv: dict | None = None     # input name of a hoisted value -> offset in the fixed scratch
    pre_base: int = 0
    arity: int = 1              # child slots per node: the entry's `kids` dimension is rows x arity

    def __str__(self) -> str:
        hoisted = f", {len(self.pre.graph.groups)} hoisted" if self.pre is not None else ""
        return f"<{self.name}: {len(self.graph.groups)} kernels{hoisted}>"


def prepare(g, name: str, arity: int = 1, per_level: bool = True, vector_width: int = 16) -> BodyProgram:
    """Run the pass pipeline on a body (copy), hoist what depends on
    parameters only, and bound the workspace of a call. `per_level`: run on
    a level's rows, cut anywhere between threads (not the parameters'
    program, run once over every inner node). `vector_width`: the target's
    lanes where the caller knows them (the backward bodies, made when the
    compiler differentiates; the forward body is made with the model, for 16)."""
    from ..passes import run_pipeline
    g = run_pipeline(pack_wide(pair_products(g.copy())), vector_width=vector_width)
    for node in g.nodes.values():
        if per_level and node.op.name in ("matmul", "matmul_pair"):  # a row's sums whatever the cut (`gemm.stable_rows`)
            node.attrs["row_stable"] = True
    pre = _hoist(g)
    program = _bounded(g, name, arity)
    if pre is not None:
        pre_graph, hoisted = pre
        inv, at = {}, program.fixed_floats
        for nid, inp in hoisted.items():
            inv[inp] = at
            at += _aligned(pre_graph.nodes[nid].type.size().coef)
        program.pre = _bounded(pre_graph, name + ".pre")
        program.inv, program.pre_base = inv, at
        program.fixed_floats = at + program.pre.fixed_floats
    return program


def pair_products(g):
    """x @ W[:F] + (h @ W[F:] + b), or x @ W[:F] + h @ W[F:] (a recurrent cell's
    gates, `layers/recurrent._gates`), as matmul_pair(x, h, W) + b: one kernel
    a level whose tiles run over x's K then h's, where two products wrote and
    read C twice. W's two blocks must be all of its rows, and K = F + H fit
    one k block (`gemm.KC`); each product must have no other use."""
    from ..graph import Builder
    from ..lower.gemm import KC

    def product(nid):
        """(A, W, start, stop) of `A @ W[start:stop]` (rows), used once; else None."""
        node = g.nodes[nid]
        if node.op.name != "matmul" or node.attrs.get("ta") or node.attrs.get("tb") or len(g.users(nid)) != 1 \
                or nid in g.outputs.values():
            return None
        block = g.nodes[node.inputs[1]]
        if block.op.name != "slice" or block.attrs["axis"] % 2 != 0:
            return None
        return node.inputs[0], block.inputs[0], block.attrs["start"], block.attrs["stop"]

    for nid in list(g.topo()):
        node = g.nodes.get(nid)
        if node is None or node.op.name != "add" or node.type.rank != 2:
            continue
        first, rest = node.inputs
        bias = None
        if g.nodes[rest].op.name == "add" and len(g.users(rest)) == 1 and rest not in g.outputs.values():
            inner, bias = g.nodes[rest].inputs
            if product(inner) is None:
                inner, bias = bias, inner
            if g.nodes[bias].type.shape != (node.type.shape[1],):
                continue
            rest = inner
        p, q = product(first), product(rest)
        if p is None or q is None:
            continue
        (x, w, a, f), (h, w2, f2, e) = p, q
        if w != w2 or a != 0 or f != f2 or e != g.nodes[w].type.shape[0] or e > KC:
            continue
        b = Builder(g, node.span)
        new = b.matmul_pair(b.value(x), b.value(h), b.value(w))
        if bias is not None:
            new = new + b.value(bias)
        g.replace_uses(nid, new.id)
    from ..passes.dce import dce
    return dce(g)


#: whether `prepare` packs a wide parameter's panels for the node case's matmuls, and from
#: how many bytes between B's rows: an LSTM of 512 units (rows of 8 KiB) ran its step 9%
#: faster, of 256 units (4 KiB) 3% at 1 thread and the same at 2, of 128 (2 KiB) the same.
#: From PACK_LONG_K_ROWS when B has more rows than a k block: the cotangent's product of an
#: LSTM of 512 units (W^T [2048, 512], rows of 2 KiB) made its step 4% faster
PACK_WIDE = True
PACK_ROWS = 4096
PACK_LONG_K_ROWS = 2048


def pack_wide(g):
    """A matmul of the node case whose B is a parameter (or its transpose: a
    cotangent's product) with rows PACK_ROWS bytes apart or more (PACK_LONG_K_ROWS
    when B has more rows than a k block) reads it packed in panels (`pack_panels`): computed from parameters only, the
    packing is hoisted out of the loop over levels or positions (`_hoist`), once
    a call for every level's product. An LSTM of 512 units' h @ W: [64, 512] x
    [512, 2048] a position, 58% of peak with W as it is. So is a W^T (a
    cotangent's, or one the node case writes) that legalize would leave to the
    product's copies to transpose (`matmul._transposed_in_copy`): every level's
    call would transpose it again (a tree-RNN of 384 units' step 5% slower at
    1 thread)."""
    from ..graph import Builder
    from ..lower.gemm import KC
    from .matmul import _transposed_in_copy, packs_transposed
    if not PACK_WIDE:
        return g
    pure = _parameters_only(g)
    changed = False
    for nid in list(g.topo()):
        node = g.nodes[nid]
        if node.op.name not in ("matmul", "matmul_pair") or node.attrs.get("packed") or node.attrs.get("ta"):
            continue
        w = node.inputs[-1]
        n = node.shape[1]
        k = g.nodes[w].type.shape[1 if node.attrs.get("tb") else 0]
        wide = PACK_LONG_K_ROWS if isinstance(k, int) and k > KC else PACK_ROWS
        # W of a product X @ W^T, flagged or (before simplify folds it) a transpose node
        wt = w if node.attrs.get("tb") else g.nodes[w].inputs[0] if g.nodes[w].op.name == "transpose" else None
        transposed_per_call = wt is not None and _transposed_in_copy(g.nodes[wt].type.shape)
        if w not in pure or not isinstance(n, int) or (4 * n < wide and not transposed_per_call):
            continue
        b = Builder(g, node.span)
        # a block of W's rows (a slice) is packed from W where it lies; W^T from W's blocks
        block = g.nodes[w]
        rows = dict(start=block.attrs["start"], stop=block.attrs["stop"]) \
            if block.op.name == "slice" and block.attrs["axis"] == 0 else {}
        source = b.value(block.inputs[0]) if rows else b.value(w)
        if not node.attrs.get("tb"):
            panels = b.pack_panels(source, **rows)
        elif packs_transposed(block.type.shape):
            panels = b.pack_panels(source, **rows, transposed=True)
        else:
            panels = b.pack_panels(b.transpose(b.value(w)))
        operands = [b.value(i) for i in node.inputs[:-1]]
        new = getattr(b, node.op.name)(*operands, panels, packed=n)
        g.replace_uses(nid, new.id)
        changed = True
    if not changed:
        return g
    from ..passes.dce import dce
    return dce(g)


def _keep_program(body, kept: list, fwd: BodyProgram, arity: int, rec: str, vector_width: int):
    """(the forward body with outputs `@keep<k>` for the kept values, its
    program); None if its buffers outgrow the forward's scratch (then
    nothing is kept)."""
    if not kept:
        return None, fwd
    g = body.copy()
    for k, nid in enumerate(kept):
        g.outputs[f"@keep{k}"] = nid
    program = prepare(g, f"{rec}.node.keep", arity, vector_width=vector_width)
    if program.rows_floats > fwd.rows_floats or program.fixed_floats > max(fwd.fixed_floats, 16):
        return None
    return g, program


def _bounded(g, name: str, arity: int = 1) -> BodyProgram:
    from ..passes.plan import ALIGN, aligned, plan_memory
    plan = plan_memory(g, {p: 0 for p in g.params})
    rows_floats, fixed, at = 0, {}, 0
    for nid, st in plan.storage.items():
        if st.kind == "workspace" and not g.nodes[nid].type.size().symbols:
            fixed[nid] = at
            at += aligned(g.nodes[nid].type.size().coef)
    for sizes in plan.slots:
        per_row = 0
        for s in sizes:
            if s.symbols and s.symbols not in ((BODY_ROWS,), (BODY_KIDS,)):
                raise ShapeMismatch(f"the node case needs a buffer of {s} floats; it must compute one row "
                                    "per node")
            if s.symbols:
                per_row = max(per_row, s.coef * (arity if s.symbols == (BODY_KIDS,) else 1))
        if per_row:
            rows_floats += per_row + ALIGN
    return BodyProgram(name, g, rows_floats, fixed, at, arity=arity)


def _parameters_only(g) -> set:
    """The nodes of a body that read parameters and constants only (no input),
    each of a fixed size: the same in every call of the body."""
    pure = set()
    for nid in g.topo():
        node = g.nodes[nid]
        if node.op.name != "input" and all(i in pure for i in node.inputs) and not node.type.size().symbols:
            pure.add(nid)
    return pure


def _hoist(g):
    """Split off the groups of a fused body that read no input (only
    parameters and constants): returns (their graph, {node: input name}),
    and turns each of their values that the rest reads into an input of `g`."""
    pure = _parameters_only(g)
    outputs = set(g.outputs.values())
    hoist = [gr for gr in g.groups if all(m in pure and m not in outputs for m in gr.members)]
    if not hoist:
        return None
    moved = {m for gr in hoist for m in gr.members}
    boundary = [m for gr in hoist for m in gr.outputs if any(u not in moved for u in g.users(m))]
    pre = g.copy()
    keep = moved | {a for m in moved for a in g.ancestors(m)}
    for nid in [n for n in pre.nodes if n not in keep]:
        pre.remove(nid)
    pre.inputs = {}
    pre.params = {k: v for k, v in pre.params.items() if v in keep}
    pre.outputs = {f"@inv{m}": m for m in boundary}
    pre.groups = [gr for gr in pre.groups if gr.members[0] in moved]
    pre.name = g.name + ".pre"
    hoisted = {}
    for m in boundary:
        name = f"@inv{m}"
        node = g.nodes[m]
        g.set_inputs(m, ())
        node.op = REGISTRY["input"]
        node.attrs = {"name": name, "kind": "input", "type": node.type, "classes": 0}
        g.inputs[name] = m
        hoisted[m] = name
    for nid in moved - set(boundary):
        g.remove(nid)
    g.groups = [gr for gr in g.groups if gr not in hoist]
    for gr in pre.groups:
        gr.outputs = [m for m in gr.outputs if m in boundary or any(u in moved for u in pre.users(m))]
    return pre, hoisted


def body_plan(program: BodyProgram, param_offsets: dict[str, int]):
    """The body's memory plan with the model's parameter offsets, its
    fixed-size buffers moved out of the workspace into extra outputs."""
    from ..passes.plan import Storage, plan_memory
    g = program.graph
    plan = plan_memory(g, {p: param_offsets[p] for p in g.params})
    n_out = len(plan.output_names)
    for k, nid in enumerate(sorted(program.fixed)):
        plan.storage[nid] = Storage("output", n_out + k)
    keep = sorted({st.index for st in plan.storage.values() if st.kind == "workspace"})
    renumber = {old: new for new, old in enumerate(keep)}
    for nid, st in list(plan.storage.items()):
        if st.kind == "workspace":
            plan.storage[nid] = Storage("workspace", renumber[st.index], st.dtype)
    plan.slots = [[s for s in plan.slots[k] if s.symbols] for k in keep]
    return plan


def fold_concat_of_slices(g) -> None:
    """concat(x[:, 0:a], x[:, a:b], ..., x[:, y:end]) -> x, so a node case that
    joins its children's states reads the gathered block as it is."""
    for nid in g.topo():
        node = g.nodes.get(nid)
        if node is None or node.op.name != "concat" or not node.inputs:
            continue
        parts = [g.nodes[i] for i in node.inputs]
        if not all(p.op.name == "slice" for p in parts):
            continue
        src = parts[0].inputs[0]
        axis = parts[0].attrs["axis"] % len(node.shape)
        if node.attrs.get("axis", -1) % len(node.shape) != axis:
            continue
        at, ok = 0, True
        for p in parts:
            ok = ok and p.inputs[0] == src and p.attrs["axis"] % len(node.shape) == axis and p.attrs["start"] == at
            at = p.attrs["stop"]
        if ok and g.nodes[src].type == node.type:
            g.replace_uses(nid, src)


def derive_backward(body, keep: bool = False):
    """The body's VJP as a graph: inputs `@C` (children's states), `@g` (the
    cotangent of its output) and `@h` (its output, read from H rather than
    recomputed); outputs `dC` and `d:<param>` for each parameter. With
    `keep`, the forward values it would recompute through a matmul (an
    LSTM's gates, or the activations its cell's kernel writes too) are
    inputs `@keep<k>` instead, read from blocks the forward pass writes:
    returns (graph, [their node ids in `keep_body`], keep_body), where
    `keep_body` is `body` with those other results of its kernels added."""
    from ..autodiff import differentiate
    from ..graph import Builder
    from ..passes.dce import dce
    g = body.copy()
    b = Builder(g)
    # the inputs that get a cotangent become parameters, so that differentiate returns it
    blocks = [k for k in body.inputs if is_block(k)]
    wrt = {cotangent_names(k)[0]: g.inputs.pop(k) for k in blocks}
    for name, nid in wrt.items():
        g.nodes[nid].op = REGISTRY["param"]
        g.nodes[nid].attrs = {"name": name, "type": g.nodes[nid].type, "init": ("zeros", ())}
        g.params[name] = nid
    out = g.outputs["h"]
    ht = g.nodes[out].type
    gin = g.add(REGISTRY["input"], (), {"name": "@g", "kind": "input", "type": ht, "classes": 0}, type=ht)
    g.inputs["@g"] = gin
    g.outputs = {"loss": b.sum(b.value(out) * b.value(gin), axes=(0, 1)).id}
    d = differentiate(g)
    parts = _forward_parts(d, set(body.nodes)) if keep else {}
    hin = _as_input(d, "@h", ht)
    if "source" not in d.nodes[out].op.traits:
        d.replace_uses(out, hin)
    for name, nid in wrt.items():
        node = d.nodes[nid]
        node.op = REGISTRY["input"]
        node.attrs = {"name": name, "kind": "input", "type": node.type, "classes": 0}
        del d.params[name]
        d.inputs[name] = nid
    outputs = {}
    for k in blocks:
        c_in, c_out = cotangent_names(k)
        outputs[c_out] = d.outputs[f"grad:{c_in}"]
    for p in body.params:
        outputs[f"d:{p}"] = d.outputs[f"grad:{p}"]
    d.outputs = outputs
    d.name = f"{body.name}.vjp"
    _fold_copies(d)
    d = dce(d)
    if not keep:
        return d
    # a forward kernel's other results that the VJP reads (an LSTM cell's
    # activations): the forward computes them anyway, so they are kept first
    keep_body, kept = body.copy(), []
    for nid, inputs in parts.items():
        node = d.nodes[nid]
        kept.append(keep_body.add(node.op, inputs, dict(node.attrs), node.span, node.type))
        d.replace_uses(nid, _as_input(d, f"@keep{len(kept) - 1}", node.type))
    d = dce(d)
    for nid in _worth_keeping(body, d, out):
        d.replace_uses(nid, _as_input(d, f"@keep{len(kept)}", d.nodes[nid].type))
        kept.append(nid)
    return dce(d), kept, keep_body


def _forward_parts(d, forward: set) -> dict:
    """{node: its inputs} of the VJP's nodes that are another result of a
    forward node's kernel (the `part` trait, first operand a forward node)
    and read forward values only: one row per node (or per child slot)."""
    found = {}
    for nid in d.topo():
        node = d.nodes[nid]
        t = node.type
        if nid in forward or "part" not in node.op.traits or not node.inputs:
            continue
        if not all(i in forward for i in node.inputs) or t.rank != 2:
            continue
        if t.shape[0] in (BODY_ROWS, BODY_KIDS) and isinstance(t.shape[1], int):
            found[nid] = node.inputs
    return found


def _fold_copies(d) -> None:
    """Two copies that the body's VJP makes per level, replaced by their
    values: `1 * x` (the cotangent of `sum(h * @g)`), and the sum of two
    zero-padded concats (the VJPs of column slices of one state, `h` and
    `c`), which is the concat of their non-zero blocks."""
    for nid in d.topo():
        node = d.nodes.get(nid)
        if node is None or node.op.name not in ("mul", "add") or len(node.inputs) != 2:
            continue
        a, b = node.inputs
        if node.op.name == "mul":
            for one, x in ((a, b), (b, a)):
                if _constant(d, one) == 1.0 and d.nodes[x].type == node.type:
                    d.replace_uses(nid, x)
                    break
            continue
        joined = _join_padded(d, d.nodes[a], d.nodes[b], node.type)
        if joined is not None:
            d.replace_uses(nid, joined)


def _constant(g, nid):
    """The value of a constant, or of a broadcast one; None otherwise."""
    node = g.nodes[nid]
    if node.op.name == "broadcast_to":
        node = g.nodes[node.inputs[0]]
    return node.attrs["value"] if node.op.name == "const" else None


def _join_padded(g, x, y, t):
    """concat(a_k or b_k) for concat(a_1, ..., a_n) + concat(b_1, ..., b_n)
    split alike, where in each block one of a_k, b_k is zero; else None."""
    if x.op.name != "concat" or y.op.name != "concat" or len(x.inputs) != len(y.inputs) or x.type != t:
        return None
    if x.attrs.get("axis") != y.attrs.get("axis"):
        return None
    parts = []
    for a, b in zip(x.inputs, y.inputs):
        if g.nodes[a].type != g.nodes[b].type:
            return None
        if _constant(g, a) == 0.0:
            parts.append(b)
        elif _constant(g, b) == 0.0:
            parts.append(a)
        else:
            return None
    return g.add(REGISTRY["concat"], tuple(parts), dict(x.attrs), type=t)


def _as_input(g, name: str, t):
    nid = g.add(REGISTRY["input"], (), {"name": name, "kind": "input", "type": t, "classes": 0}, type=t)
    g.inputs[name] = nid
    return nid


def _worth_keeping(body, d, out) -> list:
    """The forward values that the VJP `d` reads and would recompute through
    a matmul: one row per node (or per child slot) each, cheaper to keep
    than to recompute."""
    forward = set(body.nodes)
    read = sorted({i for n in d.nodes if n not in forward for i in d.nodes[n].inputs if i in forward})
    matmuls = {n for n in forward if body.nodes[n].op.name == "matmul"}
    kept = []
    for nid in read:
        node = body.nodes[nid]
        t = node.type
        if nid == out or node.op.name in ("input", "param", "const") or t.rank != 2:
            continue
        if t.shape[0] not in (BODY_ROWS, BODY_KIDS) or not isinstance(t.shape[1], int):
            continue
        if nid in matmuls or matmuls & body.ancestors(nid):
            kept.append(nid)
    return kept


def kept_width(body, nid, arity: int) -> int:
    """Floats per node of a kept value: a per-child-slot value has `arity` rows per node."""
    t = body.nodes[nid].type
    return t.shape[1] * (arity if t.shape[0] == BODY_KIDS else 1)


def _shared_cotangents(par, children_part, body, arity: int) -> list:
    """Cotangents that both backward programs compute: the `g` of each weight
    gradient x^T g in the parameters' program that the children's program
    computes too (a matmul output's cotangent: the Tree-LSTM's gates' dg).
    The children's program writes them per level (outputs `@cot<k>`) into
    scratch blocks [nodes, w]; the parameters' program reads them (inputs
    `@cot<k>`) instead of recomputing the gate math over every node.
    Rewrites both graphs; returns [(name, floats per node)]."""
    from ..passes.dce import dce
    forward, found = set(body.nodes), []
    outs = set(children_part.outputs.values())
    computed = outs | {a for o in outs for a in children_part.ancestors(o)}
    for nid in par.topo():
        node = par.nodes[nid]
        if node.op.name != "matmul" or not node.attrs.get("ta") or node.attrs.get("tb"):
            continue
        cot = par.nodes[node.inputs[1]]
        t = cot.type
        if cot.id in forward or cot.op.name == "input" or cot.id not in computed or t.rank != 2:
            continue
        if t.shape[0] not in (BODY_ROWS, BODY_KIDS) or not isinstance(t.shape[1], int):
            continue
        if cot.id in (c for c, _ in found):
            continue
        found.append((cot.id, t.shape[1] * (arity if t.shape[0] == BODY_KIDS else 1)))
    cots = []
    for k, (nid, width) in enumerate(found):
        name = f"@cot{k}"
        children_part.outputs[name] = nid
        par.replace_uses(nid, _as_input(par, name, par.nodes[nid].type))
        cots.append((name, width))
    dce(par)
    return cots


def _unview_block_cotangents(g, names) -> None:
    """A block's cotangent made as one row per child slot and viewed as one
    row per node (`tree_unkids`, the VJP of `h(k)` over the slots) has the
    same bytes either way: the output is the slots' value itself, which its
    kernel then writes straight into dC (an output that is a view would be copied)."""
    for name in names:
        nid = g.outputs[name]
        while g.nodes[nid].op.name == "tree_unkids":
            nid = g.nodes[nid].inputs[0]
        g.outputs[name] = nid


def _subset(g, names, name):
    h = g.copy()
    h.outputs = {k: v for k, v in g.outputs.items() if k in names}
    h.name = name
    return h


# -- numpy meaning: node by node ------------------------------------------------

def _child_states(H, kids, at, width):
    return np.concatenate([H[k, at:at + width] if k >= 0 else np.zeros(width, H.dtype) for k in kids])[None, :]


def _child_feed(H, kids, blocks, width) -> dict:
    """One node's gathered children, by body input (see `child_blocks`)."""
    return {name: _child_states(H, kids, at, w) for name, at, w in child_blocks(blocks, width)}


def _one_row(children) -> dict:
    """The body's dimensions when it runs on one node."""
    return {BODY_ROWS: 1, BODY_KIDS: children.shape[1]}


def _rows(extras: dict, i: int) -> dict:
    """Node i's rows of the body's row-aligned inputs."""
    return {name: a[i:i + 1] for name, a in extras.items()}


def _forward_reference(children, leaves, params, body, width, extras=None, blocks=()):
    from ..interp import evaluate
    n, nl = children.shape[0], leaves.shape[0]
    H = np.zeros((n, width), dtype=np.float64)
    H[:nl] = leaves
    pvals = dict(zip(body.params, params))
    for i in range(nl, n):
        feed = {**_child_feed(H, children[i], blocks, width), **_rows(extras or {}, i)}
        H[i] = evaluate(body, feed, pvals, dims=_one_row(children))["h"][0]
    return H


def _seed(seed, roots, nodes, from_roots):
    """The cotangent of H: given whole, or only at the roots (`h(t.root)`)."""
    if not from_roots:
        return np.array(seed, dtype=np.float64)
    gH = np.zeros((nodes, seed.shape[1]))
    np.add.at(gH, roots, seed)
    return gH


def _kept_rows(keep, feed: dict, pvals: dict, dims: dict) -> dict:
    """One node's kept forward values (`@keep<k>`), as the forward body computes them."""
    from ..interp import evaluate
    if keep is None:
        return {}
    r = evaluate(keep, feed, pvals, dims=dims)
    return {k: r[k] for k in keep.outputs if k.startswith("@keep")}


def _backward_reference(children, H, gH, params, bwd, width, leaves, extras=None, keep=None, blocks=()):
    from ..interp import evaluate
    n = children.shape[0]
    dH = np.array(gH, dtype=np.float64)
    names = [k[2:] for k in bwd.outputs if k.startswith("d:")]
    pvals = dict(zip(names, params))
    dparams = [np.zeros(np.shape(p)) for p in params]
    for i in reversed(range(leaves, n)):        # parents before their children
        feed = {**_child_feed(H, children[i], blocks, width), **_rows(extras or {}, i)}
        kept = _kept_rows(keep, feed, pvals, _one_row(children))
        gathered = {cotangent_names(name)[0]: feed[name] for name, _, _ in child_blocks(blocks, width)}
        r = evaluate(bwd, {**gathered, "@g": dH[i:i + 1], "@h": H[i:i + 1],
                           **_rows(extras or {}, i), **kept}, pvals, dims=_one_row(children))
        for k, name in enumerate(names):
            dparams[k] += r[f"d:{name}"]
        for name, at, w in child_blocks(blocks, width):
            dC = r[cotangent_names(name)[1]].reshape(1, -1)     # [1, A*w], or its A slots' rows
            for a, c in enumerate(children[i]):
                if c >= 0:
                    dH[c, at:at + w] += dC[0, a * w:(a + 1) * w]
    return dH, dparams


def _leaf_count(level_end) -> int:
    return int(level_end[0])


def _split(rest, node_inputs):
    """(row-aligned inputs by body name, parameters) from the operands after the scratch ones."""
    k = len(node_inputs)
    return dict(zip(node_inputs, rest[:k])), rest[k:]


def _leaf_ids(rest, indexed: bool):
    """(the leaves' rows of the leaf operand, or None: its rows in order; the
    other operands): with `indexed`, leaf i's state is row ids[i] of the leaf
    operand, a table such as an embedding (what `gather_rows` would give)."""
    return (rest[0], rest[1:]) if indexed else (None, rest)


# -- the ops ------------------------------------------------------------------

class TreeMap(Op):
    """H over all nodes of a forest, leaves from `leaves`, inner nodes by `body`."""
    name = "tree_map"
    traits = frozenset({"needs_dims"})

    def shape(self, children, level_end, roots, leaves, scratch_rows, scratch_fixed, *rest,
              body, fwd, arity: int, width: int, rec: str = "h", node_inputs: tuple = (),
              blocks: tuple = (), indexed: bool = False) -> TensorType:
        expect(leaves.rank == 2 and leaves.shape[1] == width, f"leaf states {leaves} are not [leaves, {width}]")
        ids, rest = _leaf_ids(rest, indexed)
        expect(ids is None or (ids.rank == 1 and ids.dtype in ("i32", "i64")),
               f"leaf rows {ids} are not a vector of integers, one per leaf")
        for x in rest[:len(node_inputs)]:
            expect(x.shape[0] == children.shape[0], f"a row-aligned input {x} is not one row per node")
        return TensorType((children.shape[0], width), "f32")

    def describe(self, attrs: dict) -> str:
        return f"{attrs['rec']}, arity={attrs['arity']}, width={attrs['width']}, body={attrs['fwd']}"

    def reference(self, children, level_end, roots, leaves, scratch_rows, scratch_fixed, *rest,
                  body, fwd, arity, width, rec="h", node_inputs=(), blocks=(), indexed=False, dims=None):
        ids, rest = _leaf_ids(rest, indexed)
        extras, params = _split(rest, node_inputs)
        if ids is not None:
            leaves = leaves[np.asarray(ids, dtype=np.int64)]
        return _forward_reference(children, leaves, params, body, width, extras, blocks)

    def vjp(self, b, g, out, children, level_end, roots, leaves, scratch_rows, scratch_fixed, *rest,
            body, fwd, arity, width, rec="h", node_inputs=(), blocks=(), indexed=False):
        ids, rest = _leaf_ids(rest, indexed)
        ins, params = rest[:len(node_inputs)], rest[len(node_inputs):]
        bwd, kept, keep_body = derive_backward(body, keep=True)
        found = _keep_program(keep_body, kept, fwd, arity, rec, b.vector_width)
        if found is None:           # the forward's scratch cannot hold it: recompute instead
            bwd, kept, found = derive_backward(body), [], (None, fwd)
        keep_graph, keep = found
        names = list(body.params)
        par = _subset(bwd, {f"d:{p}" for p in names}, f"{rec}.node.vjp_params")
        d_blocks = {cotangent_names(name)[1] for name, _, _ in child_blocks(blocks, width)}
        children_part = _subset(bwd, d_blocks, f"{rec}.node.vjp_children")
        _unview_block_cotangents(children_part, d_blocks)
        cots = _shared_cotangents(par, children_part, body, arity)
        bwd_in = prepare(children_part, f"{rec}.node.vjp_children", arity, vector_width=b.vector_width)
        bwd_par = prepare(par, f"{rec}.node.vjp_params", arity, per_level=False, vector_width=b.vector_width)
        nodes = children.shape[0]
        # per node: the children's cotangents, dH when nothing else needs it
        # (leaves without parameters upstream), the shared cotangents, the bodies' workspace
        cot_floats = sum(_aligned(w) for _, w in cots)
        rows = arity * width + width + cot_floats + max(bwd_in.rows_floats, bwd_par.rows_floats)
        spare = sum(_aligned(p.type.size().coef) for p in params)   # for gradients nothing reads
        fixed = max(bwd_in.fixed_floats, bwd_par.fixed_floats + spare, 16)
        sr = b.scratch(shape=(nodes, rows), tag=next(_tags))
        sf = b.scratch(shape=(fixed,), tag=next(_tags))
        # Only the roots' states reach the loss (`h(t.root)`): seed dH from
        # their cotangent, without forming the mostly-zero [nodes, d] one.
        gn = g.node
        from_roots = gn.op.name == "scatter_rows" and gn.inputs[1] == roots.id and gn.attrs["rows"] == nodes
        seed = b.value(gn.inputs[0]) if from_roots else g
        attrs = dict(body=body, bwd=bwd, bwd_in=bwd_in, bwd_par=bwd_par, arity=arity, width=width, rec=rec,
                     from_roots=from_roots, node_inputs=node_inputs, keep=keep_graph, kept=len(kept), cots=tuple(cots),
                     blocks=blocks)
        # the children's states, as the forward pass gathered them level by level
        C = b.tree_children(out, children, arity=arity, width=width, blocks=blocks)
        # the values the backward reads instead of recomputing them (an LSTM's gates), written by the forward
        K = [b.tree_kept(out, children, level_end, *ins, *params, index=k, width=kept_width(keep_body, nid, arity),
                          keep=keep, keep_graph=keep_graph, node_inputs=node_inputs, blocks=blocks)
             for k, nid in enumerate(kept)]
        dH = b.tree_map_grad(children, level_end, roots, out, seed, C, sr, sf, *ins, *params, *K, **attrs)
        if ids is None:
            d_leaves = b.tree_leaf_rows(dH, rows=leaves.shape[0])
        else:       # each leaf's cotangent added into its row of the table
            d_leaves = b.scatter_rows(b.tree_leaf_rows(dH, rows=ids.shape[0]), ids, rows=leaves.shape[0])
        parts = [b.tree_grad_part(dH, children, level_end, roots, out, seed, *ins, *params, param=name, index=k,
                                  bwd=bwd, width=width, from_roots=from_roots, node_inputs=node_inputs,
                                  keep=keep_graph, blocks=blocks)
                 for k, name in enumerate(names)]
        # the node arrays (n.x, n.word) are the forest's data: no cotangent
        return [None, None, None, d_leaves, None, None, *([None] if indexed else []), *(None for _ in ins), *parts]

    def lower(self, kb, node, epilogue):
        from ..lower.treemap import lower_tree_map
        lower_tree_map(kb, node)


class TreeMapGrad(Op):
    """dH: the total cotangent of every node's state (see the module docstring),
    from the cotangent of H (`seed`), or of the roots' states only when
    `from_roots` (then seed is [trees, d])."""
    name = "tree_map_grad"
    traits = frozenset({"needs_dims"})

    def shape(self, children, level_end, roots, H, seed, C, scratch_rows, scratch_fixed, *rest,
              body, bwd, bwd_in, bwd_par, arity: int, width: int, rec: str = "h",
              from_roots: bool = False, node_inputs: tuple = (), keep=None, kept: int = 0,
              cots: tuple = (), blocks: tuple = ()) -> TensorType:
        return H

    def describe(self, attrs: dict) -> str:
        return f"{attrs['rec']}, arity={attrs['arity']}, width={attrs['width']}, " \
               f"vjp={attrs['bwd_in']}, {attrs['bwd_par']}"

    def reference(self, children, level_end, roots, H, seed, C, scratch_rows, scratch_fixed, *rest,
                  body, bwd, bwd_in, bwd_par, arity, width, rec="h", from_roots=False, node_inputs=(), keep=None,
                  kept=0, cots=(), blocks=(), dims=None):
        extras, params = _split(rest[:len(rest) - kept], node_inputs)
        gH = _seed(seed, roots, H.shape[0], from_roots)
        return _backward_reference(children, H, gH, params, bwd, width, _leaf_count(level_end), extras, keep,
                                   blocks)[0]

    def lower(self, kb, node, epilogue):
        from ..lower.treemap import lower_tree_map_grad
        lower_tree_map_grad(kb, node)


class TreeGradPart(Op):
    """The gradient of one parameter of a tree_map body; computed by the
    kernel of the `tree_map_grad` it reads (the `part` trait puts it in that
    kernel's group)."""
    name = "tree_grad_part"
    traits = frozenset({"part"})

    def shape(self, dH, children, level_end, roots, H, seed, *rest, param: str, index: int, bwd, width: int,
              from_roots: bool = False, node_inputs: tuple = (), keep=None, blocks: tuple = ()) -> TensorType:
        return rest[len(node_inputs) + index]

    def describe(self, attrs: dict) -> str:
        return f"{attrs['param']}"

    def reference(self, dH, children, level_end, roots, H, seed, *rest, param, index, bwd, width,
                  from_roots=False, node_inputs=(), keep=None, blocks=()):
        extras, params = _split(rest, node_inputs)
        gH = _seed(seed, roots, H.shape[0], from_roots)
        return _backward_reference(children, H, gH, params, bwd, width, _leaf_count(level_end), extras,
                                   keep, blocks)[1][index]

    def lower(self, kb, node, epilogue):
        pass    # written by the tree_map_grad kernel of its group


class TreeChildren(Op):
    """C[i] = [H[child_0(i)], ..., H[child_A-1(i)]] (zero for a missing child):
    every node's input to the node case, written by the `tree_map` kernel
    while it gathers each level (the `part` trait puts it in that group)."""
    name = "tree_children"
    traits = frozenset({"part"})

    def shape(self, H, children, *, arity: int, width: int, blocks: tuple = ()) -> TensorType:
        return TensorType((H.shape[0], arity * width), "f32")

    def reference(self, H, children, *, arity, width, blocks=()):
        """Block after block (`child_blocks`), each [nodes, A*w]."""
        regions = [np.concatenate([_child_states(H, kids, at, w) for kids in children]).reshape(-1)
                   for _, at, w in child_blocks(blocks, width)]
        out = np.zeros(H.shape[0] * arity * width)
        flat = np.concatenate(regions)
        out[:flat.size] = flat
        return out.reshape(H.shape[0], arity * width)

    def lower(self, kb, node, epilogue):
        pass    # written by the tree_map kernel of its group


class TreeKept(Op):
    """K[i] = value `@keep<index>` of the node case at node i (zero at a leaf):
    a forward value the backward programs read instead of recomputing it,
    written by the `tree_map` kernel as it runs each level (`keep`, the body
    program with those extra outputs; the `part` trait puts it in that
    group). [nodes, width]: a per-child-slot value is its A rows side by side."""
    name = "tree_kept"
    traits = frozenset({"part"})

    def shape(self, H, children, level_end, *rest, index: int, width: int, keep, keep_graph,
              node_inputs: tuple = (), blocks: tuple = ()) -> TensorType:
        return TensorType((H.shape[0], width), "f32")

    def reference(self, H, children, level_end, *rest, index, width, keep, keep_graph, node_inputs=(), blocks=()):
        extras, params = _split(rest, node_inputs)
        pvals = dict(zip(keep_graph.params, params))
        K = np.zeros((H.shape[0], width))
        for i in range(_leaf_count(level_end), H.shape[0]):
            feed = {**_child_feed(H, children[i], blocks, H.shape[1]), **_rows(extras, i)}
            K[i] = _kept_rows(keep_graph, feed, pvals, _one_row(children))[f"@keep{index}"].reshape(-1)
        return K

    def lower(self, kb, node, epilogue):
        pass    # written by the tree_map kernel of its group


class TreeLeafRows(Op):
    """The first `rows` rows of a node-indexed matrix: the leaves' (a view)."""
    name = "tree_leaf_rows"
    traits = frozenset({"view", "needs_dims"})

    def shape(self, x, *, rows) -> TensorType:
        return TensorType((rows, x.shape[1]), x.dtype)

    def reference(self, x, *, rows, dims=None):
        n = rows if isinstance(rows, int) else dims[rows]
        return x[:n].copy()


class Scratch(Op):
    """Working memory of a kernel that needs more than its result; its
    contents mean nothing (the `tag` keeps two scratches from merging)."""
    name = "scratch"
    traits = frozenset({"needs_dims"})

    def shape(self, *, shape, tag: int = 0) -> TensorType:
        return TensorType(tuple(shape), "f32")

    def reference(self, *, shape, tag=0, dims=None):
        return np.zeros(tuple(d if isinstance(d, int) else dims[d] for d in shape))

    def lower(self, kb, node, epilogue):
        pass    # memory only: the plan gives it a workspace slot


def _aligned(n: int) -> int:
    from ..passes.plan import aligned
    return aligned(n)


# -- per-child terms: one row per child slot -------------------------------------
#
# A node case's `sum(f(h(k)) for k in n.children)` is computed over one row per
# child slot, [kids, .] with kids = rows x arity: the gathered children block
# [rows, A*d] read as [kids, d] (a view), a node's own values repeated for each
# of its slots, and the slots' results summed back to one row per node.

def _kid_rows(rows, arity: int):
    return rows * arity if isinstance(rows, int) else BODY_KIDS


def _node_rows(kids, arity: int):
    if isinstance(kids, int):
        expect(kids % arity == 0, f"{kids} child rows are not a whole number of nodes of arity {arity}")
        return kids // arity
    expect(kids == BODY_KIDS, f"per-child rows must be [{BODY_KIDS}, ...], got [{kids}, ...]")
    return BODY_ROWS


class TreeKids(Op):
    """[rows, A*d] -> [rows*A, d]: row r*A + a is slot a of node r (a view)."""
    name = "tree_kids"
    traits = frozenset({"view"})

    def shape(self, x, *, arity: int) -> TensorType:
        expect(x.rank == 2 and isinstance(x.shape[1], int) and x.shape[1] % arity == 0,
               f"{x} does not hold {arity} children's rows side by side")
        return TensorType((_kid_rows(x.shape[0], arity), x.shape[1] // arity), x.dtype)

    def vjp(self, b, g, out, x, *, arity):
        return [b.tree_unkids(g, arity=arity)]

    def reference(self, x, *, arity):
        return x.reshape(-1, x.shape[1] // arity).copy()

    def samples(self):
        return [Sample(((3, 8),), {"arity": 2}), Sample(((2, 3),), {"arity": 3})]


class TreeUnkids(Op):
    """[rows*A, d] -> [rows, A*d], the inverse of `tree_kids` (a view)."""
    name = "tree_unkids"
    traits = frozenset({"view"})

    def shape(self, x, *, arity: int) -> TensorType:
        expect(x.rank == 2 and isinstance(x.shape[1], int), f"{x} is not [kids, d]")
        return TensorType((_node_rows(x.shape[0], arity), x.shape[1] * arity), x.dtype)

    def vjp(self, b, g, out, x, *, arity):
        return [b.tree_kids(g, arity=arity)]

    def reference(self, x, *, arity):
        return x.reshape(-1, x.shape[1] * arity).copy()

    def samples(self):
        return [Sample(((6, 4),), {"arity": 2}), Sample(((3, 1),), {"arity": 3})]


class TreeRepeat(Op):
    """[rows, d] -> [rows*A, d]: each node's row for each of its A child slots."""
    name = "tree_repeat"

    def shape(self, x, *, arity: int) -> TensorType:
        expect(x.rank == 2, f"{x} is not one row per node")
        return TensorType((_kid_rows(x.shape[0], arity), x.shape[1]), x.dtype)

    def vjp(self, b, g, out, x, *, arity):
        return [b.tree_sum_kids(g, arity=arity)]

    def reference(self, x, *, arity):
        return np.repeat(x, arity, axis=0)

    def samples(self):
        return [Sample(((3, 5),), {"arity": 2}), Sample(((2, 17),), {"arity": 3})]

    def lower(self, kb, node, epilogue):
        _lower_kid_rows(kb, node, repeat=True)


class TreeSumKids(Op):
    """[rows*A, d] -> [rows, d]: the sum of each node's A child-slot rows."""
    name = "tree_sum_kids"

    def shape(self, x, *, arity: int) -> TensorType:
        expect(x.rank == 2, f"{x} is not one row per child slot")
        return TensorType((_node_rows(x.shape[0], arity), x.shape[1]), x.dtype)

    def vjp(self, b, g, out, x, *, arity):
        return [b.tree_repeat(g, arity=arity)]

    def reference(self, x, *, arity):
        return x.reshape(-1, arity, x.shape[1]).sum(axis=1)

    def samples(self):
        return [Sample(((6, 5),), {"arity": 2}), Sample(((6, 17),), {"arity": 3})]

    def lower(self, kb, node, epilogue):
        _lower_kid_rows(kb, node, repeat=False)


def _lower_kid_rows(kb, node, repeat: bool) -> None:
    """One task per node: copy its row to its A slots, or add its A slots' rows."""
    from ..lower.treemap import add_row, copy_row
    g = kb.graph
    arity = node.attrs["arity"]
    d = node.shape[1]
    rows = node.shape[0] if not repeat else g.nodes[node.inputs[0]].shape[0]
    vw = kb.vector_width
    with kb.kernel(f"kidrows{node.id}", tasks=lambda cg: cg.dim(rows), cost=arity * d) as (cg, lo, hi):
        src, dst = cg.ptr(node.inputs[0]), cg.ptr(node.id)
        with cg.loop(hi, start=lo) as r:
            node_at = cg.imul(r, d)
            kid_at = cg.imul(r, arity * d)
            if repeat:
                for a in range(arity):
                    copy_row(cg, src, node_at, dst, cg.iadd(kid_at, a * d), d, vw)
            else:
                copy_row(cg, src, kid_at, dst, node_at, d, vw)
                for a in range(1, arity):
                    add_row(cg, src, cg.iadd(kid_at, a * d), dst, node_at, d, vw)


# -- the LSTM cell's gate math, fused -----------------------------------------------

def _lstm_forward(g, kept):
    d = g.shape[1] // 3
    i, o, u = g[:, :d], g[:, d:2 * d], g[:, 2 * d:]
    si, so, tu = 1 / (1 + np.exp(-i)), 1 / (1 + np.exp(-o)), np.tanh(u)
    c = si * tu + kept
    return si, so, tu, c, np.tanh(c)


def _lstm_backward(acts, state, dS):
    """(dg, dc): the cotangents of the gates and of the kept memory, from the
    gates' activations [σ(i), σ(o), tanh(u)] and the cell's [h, c]."""
    d = acts.shape[1] // 3
    si, so, tu = acts[:, :d], acts[:, d:2 * d], acts[:, 2 * d:]
    tc = np.tanh(state[:, d:])
    dh, dc_out = dS[:, :d], dS[:, d:]
    dc = dc_out + dh * so * (1 - tc * tc)
    dg = np.concatenate([dc * tu * si * (1 - si), dh * tc * so * (1 - so), dc * si * (1 - tu * tu)], axis=1)
    return dg, dc




class LstmState(Op):
    """[h, c] from gates g = [i, o, u] (one matmul's [rows, 3H]) and the memory
    kept from before (Σ_k f_k c_k, c_prev f, or 0):
    c = σ(i) tanh(u) + kept, h = σ(o) tanh(c). One kernel for all the gate math.
    In training the kernel also writes the activations [σ(i), σ(o), tanh(u)]
    (`lstm_acts`), so its VJP evaluates one tanh (of c, read from the state)
    where it would otherwise evaluate four exponentials again."""
    name = "lstm_state"
    surface = True

    def shape(self, g, kept) -> TensorType:
        expect(g.rank == 2 and isinstance(g.shape[1], int) and g.shape[1] % 3 == 0,
               f"lstm_state: the gates {g} are not [rows, 3H] (i, o, u side by side)")
        d = g.shape[1] // 3
        expect(kept.rank == 0 or kept.shape == (g.shape[0], d),
               f"lstm_state: the kept memory {kept} is not [{g.shape[0]}, {d}] (or a number)")
        return TensorType((g.shape[0], 2 * d), "f32")

    def vjp(self, b, g, out, gates, kept):
        acts = b.lstm_acts(out, gates, kept)             # written by this cell's forward kernel
        dg = b.lstm_state_grad(acts, out, g)
        dc = b.lstm_state_dc(dg, acts, out, g)      # written by dg's kernel: one pass over the gates
        return [dg, dc if kept.type.rank else b.sum(dc, axes=(0, 1))]

    def reference(self, g, kept):
        _, so, _, c, tc = _lstm_forward(g, kept)
        return np.concatenate([so * tc, c], axis=1)

    def samples(self):
        return [Sample(((5, 12), (5, 4))), Sample(((3, 48), ())), Sample(((2, 51), (2, 17)))]

    def lower(self, kb, node, epilogue):
        from .recurrent import row_kernel
        row_kernel(kb, node, "lstm_state", self.gate_math(kb, node))

    def gate_math(self, kb, node):
        """[h, c] (and the activations, when its group has them) a vector at a
        time: this node's kernel, or the epilogue of the product of its gates
        (`fuse`, rule 7)."""
        return _lstm_math(kb, node, "state", also=kernel_parts(kb, node, "lstm_acts"))


class LstmActs(Op):
    """[σ(i), σ(o), tanh(u)]: the activations of an `lstm_state` cell's gates
    g = [i, o, u]. Its first operand is that cell's state: the cell's kernel
    writes them on its way to [h, c] (the `part` trait puts both in one
    group), and a tree body's backward reads them from a kept block;
    otherwise (the state from elsewhere) it is a kernel of its own."""
    name = "lstm_acts"
    traits = frozenset({"part"})

    def shape(self, state, g, kept) -> TensorType:
        expect(state.rank == 2 and g.rank == 2 and state.shape[1] * 3 == g.shape[1] * 2,
               f"lstm_acts: the state {state} is not the [h, c] of the gates {g}")
        return g

    def reference(self, state, g, kept):
        si, so, tu, _, _ = _lstm_forward(g, kept)
        return np.concatenate([si, so, tu], axis=1)

    def samples(self):       # the state is read for its place in the group only
        return [Sample((((5, 8), "fixed"), ((5, 12), "fixed"), ((5, 4), "fixed"))),
                Sample((((3, 32), "fixed"), ((3, 48), "fixed"), ((), "fixed")))]

    def lower(self, kb, node, epilogue):
        _lower_lstm(kb, node, "acts", first=1)


class LstmStateGrad(Op):
    """dg, the gates' cotangent, from dS = [dh, dc] (see `lstm_state`), the
    gates' activations (`lstm_acts`) and the cell's state [h, c]."""
    name = "lstm_state_grad"

    def shape(self, acts, state, dS) -> TensorType:
        expect(acts.rank == 2 and state.shape == dS.shape and acts.shape[1] * 2 == state.shape[1] * 3,
               f"lstm_state_grad: activations {acts}, state {state} and its cotangent {dS} do not match")
        return acts

    def reference(self, acts, state, dS):
        return _lstm_backward(acts, state, dS)[0]

    def samples(self):
        return [Sample((((5, 12), "fixed"), ((5, 8), "fixed"), ((5, 8), "fixed"))),
                Sample((((2, 51), "fixed"), ((2, 34), "fixed"), ((2, 34), "fixed")))]

    def lower(self, kb, node, epilogue):
        _lower_lstm(kb, node, "dg", also=kernel_parts(kb, node, "lstm_state_dc"))


class LstmStateDc(Op):
    """dc, the cotangent of the kept memory, from dS = [dh, dc] (see `lstm_state`).
    Its first operand is the `lstm_state_grad` of the same cell: that kernel
    computes dc on its way to dg and writes it too (the `part` trait puts both
    in one group); otherwise (dg from elsewhere) it is a kernel of its own."""
    name = "lstm_state_dc"
    traits = frozenset({"part"})

    def shape(self, dg, acts, state, dS) -> TensorType:
        expect(dg.shape == acts.shape, f"lstm_state_dc: the gates' cotangent {dg} is not shaped like the gates {acts}")
        return TensorType((acts.shape[0], acts.shape[1] // 3), "f32")

    def reference(self, dg, acts, state, dS):
        return _lstm_backward(acts, state, dS)[1]

    def samples(self):
        return [Sample((((5, 12), "fixed"), ((5, 12), "fixed"), ((5, 8), "fixed"), ((5, 8), "fixed"))),
                Sample((((2, 51), "fixed"), ((2, 51), "fixed"), ((2, 34), "fixed"), ((2, 34), "fixed")))]

    def lower(self, kb, node, epilogue):
        _lower_lstm(kb, node, "dc", first=1)


def _lower_lstm(kb, node, what: str, first: int = 0, also=()) -> None:
    """One task per row, vectors along the H columns of each gate (`_lstm_math`)."""
    from .recurrent import row_kernel
    row_kernel(kb, node, f"lstm_{what}", _lstm_math(kb, node, what, first, also))


def _lstm_math(kb, node, what: str, first: int = 0, also=()):
    """The cell's math a vector of a row at a time (a `recurrent.GateMath`). `what`:
    "state" ([h, c] from gates and kept; `also`: `lstm_acts` nodes it writes
    too), "acts" (alone), "dg" (from activations, state and dS; `also`: the
    `lstm_state_dc` nodes it writes too: one pass, the gate math once), "dc"
    (alone). The operands start at `first`."""
    from .recurrent import GATE_VECTORS, GateMath, gate_tanh
    g = kb.graph
    operands = node.inputs[first:]
    forward = what in ("state", "acts")
    gates = operands[0]                 # the gates, or their activations (same shape)
    d = g.nodes[gates].type.shape[1] // 3
    kept_id = operands[-1] if forward else None
    kept_node = g.nodes[kept_id] if forward else None
    scalar_kept = forward and kept_node.type.rank == 0
    number = kept_node.attrs["value"] if forward and kept_node.op.name == "const" else None    # inline: no buffer
    vw = GATE_VECTORS * kb.vector_width

    def bind(cg):
        G, out = cg.ptr(gates), cg.ptr(node.id)
        K = cg.ptr(kept_id) if forward and number is None else None
        S, dS = (cg.ptr(operands[1]), cg.ptr(operands[2])) if not forward else (None, None)
        also_out = [cg.ptr(u) for u in also]

        def column(r, j, m):
            g_at, h_at, s_at = cg.imul(r, 3 * d), cg.imul(r, d), cg.imul(r, 2 * d)

            def load(p, at):
                return cg.load(p, cg.iadd(at, j), n=vw, mask=m)

            def store_gates(p, values):
                for k, v in enumerate(values):
                    cg.store(v, p, cg.iadd(cg.iadd(g_at, k * d), j), mask=m)
            a, b, c3 = load(G, g_at), load(G, cg.iadd(g_at, d)), load(G, cg.iadd(g_at, 2 * d))
            if forward:
                si, so, tu = cg.sigmoid(a), cg.sigmoid(b), gate_tanh(cg, c3)
                if what == "acts":
                    store_gates(out, (si, so, tu))
                    return
                if number is not None:
                    kept = cg.const(float(number), si)
                else:
                    kept = cg.splat(cg.load(K, cg.i64(0)), vw) if scalar_kept else load(K, h_at)
                c = cg.fma(si, tu, kept)
                cg.store(cg.mul(so, gate_tanh(cg, c)), out, cg.iadd(s_at, j), mask=m)
                cg.store(c, out, cg.iadd(cg.iadd(s_at, d), j), mask=m)
                for p in also_out:
                    store_gates(p, (si, so, tu))
                return
            # the backward: activations as the forward kernel wrote them, c from the state
            si, so, tu = a, b, c3
            tc = gate_tanh(cg, load(S, cg.iadd(s_at, d)))
            one = cg.const(1.0, tc)
            dh, dco = load(dS, s_at), load(dS, cg.iadd(s_at, d))
            dc = cg.fma(cg.mul(dh, so), cg.sub(one, cg.mul(tc, tc)), dco)
            if what == "dc":
                cg.store(dc, out, cg.iadd(h_at, j), mask=m)
                return
            for p in also_out:
                cg.store(dc, p, cg.iadd(h_at, j), mask=m)
            di = cg.mul(cg.mul(dc, tu), cg.mul(si, cg.sub(one, si)))
            do = cg.mul(cg.mul(dh, tc), cg.mul(so, cg.sub(one, so)))
            du = cg.mul(cg.mul(dc, si), cg.sub(one, cg.mul(tu, tu)))
            store_gates(out, (di, do, du))
        return column
    return GateMath(3, d, vw, bind)
