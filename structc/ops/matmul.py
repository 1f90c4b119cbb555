"""matmul and transpose (the `dense` layer built on them: `layers/dense.py`).

    C = op(A) @ op(B),  op(X) = X^T when the `ta` / `tb` flag is set.

The gradients are matmuls again, with transposes expressed through the
flags so the weight gradient `A^T @ G` reads A in place.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from ..types import TensorType
from .base import Op, Sample, data_sizes, expect


#: at most this many columns make a weight gradient narrow (see `MatMul.legalize`)
NARROW = 8
#: a weight gradient A^T G of at most this many of the kernel's tasks (blocks of
#: 192 rows x panels of 32 columns of C) is computed in PARTS parts over K (see
#: `MatMul.legalize`): two, the cores of the machines measured; each part's
#: [M, N] is written and read once more (4 parts cost a GNN's and the trees'
#: 1-thread steps ~1%, and gained nothing on 2 cores)...
FEW_TASKS = 4
PARTS = 2
#: ...when its K is known only at run time, or has at least this many rows a part
MIN_PART_ROWS = 64


class MatMul(Op):
    name = "matmul"
    floats_only = True
    traits = frozenset({"epilogue"})

    def shape(self, a, b, *, ta: bool = False, tb: bool = False, packed: int = 0,
              tb_copied: bool = False) -> TensorType:
        if packed:      # b: B in panels (`pack_panels`), C of `packed` columns
            expect(a.rank == 2 and not ta and not tb and _packed_of(b, packed),
                   f"matmul: {b} is not a matrix of {packed} columns in panels")
            k, k2, n = a.shape[1], b.shape[1], packed
        else:
            expect(a.rank == 2 and b.rank == 2,
                   f"matmul needs two matrices, got {a} and {b}")
            k = a.shape[0] if ta else a.shape[1]
            k2, n = (b.shape[1], b.shape[0]) if tb else b.shape
        m = a.shape[1] if ta else a.shape[0]
        expect(k == k2, f"inner dimensions differ: {a} @ {b} ({k} vs {k2})")
        return TensorType((m, n), "f32")

    def pooled_dims(self, graph, node) -> set:
        a = graph.nodes[node.inputs[0]].shape        # the inner dimension: summed over
        return data_sizes([a[0] if node.attrs.get("ta") else a[1]])

    def vjp(self, b, g, out, x, w, *, ta=False, tb=False, tb_copied=False):
        if not ta and not tb:
            return [b.matmul(g, w, tb=True), b.matmul(x, g, ta=True)]
        if not ta and tb:
            return [b.matmul(g, w), b.matmul(g, x, ta=True)]
        if ta and not tb:
            return [b.matmul(w, g, tb=True), b.matmul(x, g)]
        return [b.matmul(w, g, ta=True, tb=True), b.matmul(g, x, ta=True, tb=True)]

    def reference(self, a, b, *, ta=False, tb=False, packed=0, tb_copied=False):
        if packed:
            return a @ unpack_panels(b, packed)
        return (a.T if ta else a) @ (b.T if tb else b)

    def samples(self):
        # tails in both tile directions, every transpose flag, a k-blocked K
        return [Sample(((13, 7), (7, 35))), Sample(((5, 13), (5, 35)), {"ta": True}),
                Sample(((13, 7), (35, 7)), {"tb": True}), Sample(((7, 13), (35, 7)), {"ta": True, "tb": True}),
                Sample(((3, 400), (400, 20))), Sample(((1, 4), (4, 1))),
                Sample(((70, 40), (70, 3)), {"ta": True})]     # narrow: computed as (B^T A)^T

    def legalize(self, b, node):
        """The kernel reads B row-major: transpose a `tb` operand first, unless
        the kernel's tasks copy B's k blocks anyway (`_transposed_in_copy`). A
        weight gradient with only a few columns (A^T G, G of a handful of
        classes) is computed as (G^T A)^T instead: the kernel vectorises
        along C's columns, and a few of them would fill a fraction of each
        vector, while M of them fill every lane."""
        x, w = (b.value(i) for i in node.inputs)
        ta = node.attrs.get("ta", False)
        if node.attrs.get("packed"):        # made after legalize would change it (`tree.pack_wide`)
            return None
        if node.attrs.get("tb"):
            if node.attrs.get("tb_copied"):
                return None
            if not ta and _transposed_in_copy(w.shape):
                return b.matmul(x, w, tb=True, tb_copied=True)
            return b.matmul(x, b.transpose(w), ta=ta)
        m, n = node.shape
        if ta and isinstance(n, int) and n <= NARROW and isinstance(m, int) and m >= 4 * NARROW:
            return b.transpose(_over_k(b, w, x, n, m) or b.matmul(w, x, ta=True))
        if not ta:
            return None
        parts = _over_k(b, x, w, m, n)
        if parts is None and _aliased_columns(m, n, b.vector_width):
            return b.matmul(b.transpose(x), w)
        return parts

    def lower(self, kb, node, epilogue):
        from ..lower.gemm import NARROW_N, emit_gemm, emit_narrow
        ta = node.attrs.get("ta", False)
        a_id, b_id = node.inputs
        a_shape = kb.graph.nodes[a_id].shape
        m_dim, k_dim = (a_shape[1], a_shape[0]) if ta else a_shape
        n_dim = node.shape[1]
        one = lambda cg: cg.i64(1)
        m_of = lambda cg: cg.dim(m_dim)
        # a few columns: vectors along k (A's rows are contiguous), at least two k a vector;
        # n columns of a 4-lane target's vectors (SSE) are a column panel's whole vectors
        if not ta and n_dim in NARROW_N and n_dim < kb.vector_width:
            emit_narrow(kb, M=m_of, K=lambda cg: cg.dim(k_dim), n=n_dim, a_buf=a_id, b_buf=b_id,
                        epilogue=epilogue, name=f"matmul{node.id}")
            return
        emit_gemm(
            kb, M=m_of, N=lambda cg: cg.dim(n_dim), K=lambda cg: cg.dim(k_dim),
            a_buf=a_id,
            a_row_stride=one if ta else (lambda cg: cg.dim(k_dim)),
            a_k_stride=m_of if ta else one,
            b_buf=b_id, epilogue=epilogue, scratch=epilogue.outputs[0],
            name=f"matmul{node.id}", static_m=m_dim, static_n=n_dim,
            row_stable=node.attrs.get("row_stable", False), gate=_gate_math(kb, epilogue),
            packed=bool(node.attrs.get("packed")), b_transposed=node.attrs.get("tb_copied", False))
        if not isinstance(k_dim, int):
            _empty_contraction(kb, node, epilogue, m_dim, n_dim, k_dim)


def _transposed_in_copy(w_shape) -> bool:
    """Whether `X @ W^T` reads W itself, its kernel's copy of each k block of B
    transposing it (`gemm.emit_gemm(b_transposed=True)`): B wide and K known
    (longer than a k block, or within one where `gemm.ONE_BLOCK_COPY` copies it),
    so that every task copies (`gemm.WIDE_ROWS`). The transpose kernel it saves
    read and wrote all of W (an MLP of 2048 units: 5 ms of a 156 ms step; a tied
    output layer over 10,000 words: 11%). A node case's such product reads B
    packed instead (`tree.pack_wide`, before this), its packing hoisted out of
    the levels."""
    from ..lower.gemm import copies_b
    n, k = w_shape
    return isinstance(k, int) and copies_b(n, k)


class MatMulPair(Op):
    """x1 @ w[:K1] + x2 @ w[K1:] for w [K1 + K2, N]: [x1, x2] @ w with the two
    side by side never copied. A recurrent cell's gates, [x, h] @ W in torch's
    layout (`layers/recurrent._gates` writes x @ W[:F] + (h @ W[F:] + b);
    `tree.pair_products` makes this of it in a node case): one kernel whose
    tiles run over x's K and then h's (`emit_gemm(second=...)`), where two
    products wrote and read C twice."""
    name = "matmul_pair"
    floats_only = True
    traits = frozenset({"epilogue"})

    def shape(self, a1, a2, w, *, packed: int = 0) -> TensorType:
        expect(a1.rank == 2 and a2.rank == 2 and (_packed_of(w, packed) if packed else w.rank == 2),
               f"matmul_pair needs three matrices, got {a1}, {a2} and {w}")
        expect(a1.shape[0] == a2.shape[0], f"rows differ: {a1} and {a2}")
        k1, k2 = a1.shape[1], a2.shape[1]
        rows, n = (w.shape[1], packed) if packed else w.shape
        expect(isinstance(k1, int) and isinstance(k2, int) and rows == k1 + k2,
               f"matmul_pair: {w} does not have the {k1} + {k2} rows of {a1} and {a2} side by side")
        return TensorType((a1.shape[0], n), "f32")

    def vjp(self, b, g, out, a1, a2, w):
        k1, k2 = a1.shape[1], a2.shape[1]
        w1, w2 = b.slice(w, axis=0, start=0, stop=k1), b.slice(w, axis=0, start=k1, stop=k1 + k2)
        return [b.matmul(g, w1, tb=True), b.matmul(g, w2, tb=True),
                b.concat(b.matmul(a1, g, ta=True), b.matmul(a2, g, ta=True), axis=0)]

    def reference(self, a1, a2, w, *, packed=0):
        k1 = a1.shape[1]
        if packed:
            w = unpack_panels(w, packed)
        return a1 @ w[:k1] + a2 @ w[k1:]

    def samples(self):
        # tails in both tile directions; an LSTM's gates (64 + 128 rows of W); one row
        return [Sample(((13, 7), (13, 5), (12, 35))), Sample(((29, 64), (29, 128), (192, 70))),
                Sample(((1, 3), (1, 9), (12, 40)))]

    def lower(self, kb, node, epilogue):
        from ..lower.gemm import emit_gemm
        a1, a2, w = node.inputs
        m_dim, k1 = kb.graph.nodes[a1].shape
        k2 = kb.graph.nodes[a2].shape[1]
        n_dim = node.shape[1]
        emit_gemm(kb, M=lambda cg: cg.dim(m_dim), N=lambda cg: cg.dim(n_dim), K=lambda cg: cg.i64(k1),
                  a_buf=a1, a_row_stride=lambda cg: cg.i64(k1), a_k_stride=lambda cg: cg.i64(1), b_buf=w,
                  epilogue=epilogue, scratch=epilogue.outputs[0], name=f"matmul_pair{node.id}",
                  static_m=m_dim, static_n=n_dim, row_stable=node.attrs.get("row_stable", False),
                  second=(a2, k2), gate=_gate_math(kb, epilogue), packed=bool(node.attrs.get("packed")))


def _gate_math(kb, epilogue):
    """The gate math the matmul's kernel runs on its rows (`fuse`, rule 7), or None."""
    gate = getattr(epilogue, "gate", None)
    return None if gate is None else gate.op.gate_math(kb, gate)


#: x^T g reads x's rows down a column strip: each k step's few values of A lie on
#: a line of their own, 4 * M bytes after the last. With M a multiple of
#: ALIASED_FLOATS (2 KiB) those lines fall in two of L1's 64 sets (4 KiB: one) and
#: a tile's strip cannot stay in L1 from one panel to the next: with AVX2 (6-row
#: tiles), the weight gradient [1024, 1024] of an MLP over a batch of 256 ran at
#: 25 GF/s against 31 for M = 1040, and A^T G [512, 640] x [640, 2048] (an LSTM of
#: 512 units' H^T dG over 640 positions) at 27 against 34 with A's rows read in
#: order (M = 384, 768: the same either way). x transposed first (a pass over x), the
#: product reads A's rows in order: mlp_wide's step 0.94 of before, an LSTM of 512
#: units' 0.94, 512 -> 512 -> 512 at a batch of 1024 0.89 (at 64 the same either
#: way). From N = ALIASED_MIN_N, where the transpose is a small part of the
#: product. AVX-512's 12-row tiles were not measured: left as they are (stops 43, 44).
ALIASED_FLOATS = 512
ALIASED_MIN_N = 64


def _aliased_columns(m, n, vector_width: int) -> bool:
    """Whether x^T g of C [m, n] transposes x first (`ALIASED_FLOATS`)."""
    return vector_width < 16 and isinstance(m, int) and m % ALIASED_FLOATS == 0 \
        and isinstance(n, int) and n >= ALIASED_MIN_N


def _over_k(b, x, g, m, n):
    """x^T g [m, n] as the sum of PARTS products over ranges of K (a
    `matmul_parts` and a `sum`), or None when it is better in one. A weight
    gradient over a batch, a graph's nodes or a forest's inner nodes is
    often a C of one or two tasks (a GNN's [64, 64]) with a long K: as one
    product it runs on one or two threads, each reading every row of x and
    g, half of them from the other core's cache (the kernels before were
    split by rows). In parts, each thread reads the rows it wrote. The sum
    of the parts is in a fixed order: the same bits on any number of threads."""
    from ..lower.gemm import MB
    k = x.shape[0]
    if not (isinstance(m, int) and isinstance(n, int)) or -(-m // MB) * -(-n // 32) > FEW_TASKS:
        return None
    if isinstance(k, int) and k < PARTS * MIN_PART_ROWS:
        return None
    return b.sum(b.matmul_parts(x, g, parts=PARTS), axes=(0,))


class MatMulParts(Op):
    """C[p] = x[K_p]^T @ g[K_p] for the PARTS row ranges K_p = [K p / parts,
    K (p + 1) / parts) of x [K, M] and g [K, N]: a weight gradient in parts
    (`_over_k`), summed by a `sum` over axis 0. Made by `legalize` after
    autodiff, so it has no gradient of its own."""
    name = "matmul_parts"
    floats_only = True

    def shape(self, x, g, *, parts: int = PARTS) -> TensorType:
        expect(x.rank == 2 and g.rank == 2, f"matmul_parts needs two matrices, got {x} and {g}")
        expect(x.shape[0] == g.shape[0], f"rows differ: {x} and {g}")
        expect(isinstance(parts, int) and parts >= 1, f"parts must be a positive int, got {parts!r}")
        return TensorType((parts, x.shape[1], g.shape[1]), "f32")

    def reference(self, x, g, *, parts=PARTS):
        k = x.shape[0]
        cuts = [k * p // parts for p in range(parts + 1)]
        return np.stack([x[a:z].T @ g[a:z] for a, z in zip(cuts, cuts[1:])])

    def samples(self):
        # K below, at and past the parts (empty parts), a K past KC in a part, tails in M and N
        return [Sample((((k, 13), "fixed"), ((k, 35), "fixed")), {"parts": p})
                for k, p in ((3, 4), (4, 4), (70, 4), (1600, 4), (9, 2))]

    def lower(self, kb, node, epilogue):
        from ..lower.gemm import emit_gemm
        x_id, g_id = node.inputs
        k_dim, m_dim = kb.graph.nodes[x_id].shape
        n_dim = kb.graph.nodes[g_id].shape[1]
        m_of = lambda cg: cg.dim(m_dim)
        g = kb.graph        # the bias gradient's parts, when they are in this kernel's group
        group = next((gr.members for gr in g.groups if node.id in gr.members), ())
        colsum = [m for m in group if g.nodes[m].op.name == "matmul_colsum_parts"]
        emit_gemm(kb, M=m_of, N=lambda cg: cg.dim(n_dim), K=lambda cg: cg.dim(k_dim), a_buf=x_id,
                  a_row_stride=lambda cg: cg.i64(1), a_k_stride=m_of, b_buf=g_id, epilogue=None,
                  scratch=node.id, name=f"matmul_parts{node.id}", static_m=m_dim, static_n=n_dim,
                  parts=node.attrs.get("parts", PARTS), colsum=colsum[0] if colsum else None)


class MatMulColSumParts(Op):
    """out[p] = Σ g[k] over the rows k in K_p of g [K, N], the row ranges of the
    `matmul_parts` of the same g (its first operand): a bias gradient that the
    weight gradient's kernel sums while it reads g anyway (the `part` trait puts
    both in one group; `legalize` makes it from a `sum_parts` of that g). The
    same bits as that `sum_parts`: each column summed row by row from zero.
    Outside the group, a kernel of its own."""
    name = "matmul_colsum_parts"
    traits = frozenset({"part"})
    floats_only = True

    def shape(self, mparts, g, *, parts: int = PARTS) -> TensorType:
        expect(mparts.rank == 3 and g.rank == 2 and mparts.shape[0] == parts and mparts.shape[2] == g.shape[1],
               f"matmul_colsum_parts: {mparts} is not the {parts} weight-gradient parts of {g}")
        return TensorType((parts, g.shape[1]), "f32")

    def reference(self, mparts, g, *, parts=PARTS):
        k = g.shape[0]
        cuts = [k * p // parts for p in range(parts + 1)]
        return np.stack([g[a:z].sum(axis=0) for a, z in zip(cuts, cuts[1:])])

    def samples(self):      # the weight gradient's parts are read for their place in the group only
        return [Sample((((p, 3, n), "fixed"), ((k, n), "fixed")), {"parts": p})
                for k, n, p in ((1, 5, 2), (9, 35, 2), (300, 40, 3))]

    def lower(self, kb, node, epilogue):
        from .reduce import SumParts
        SumParts.lower_rows(kb, node, node.inputs[1], "colsumparts")


def colsum_into_weight_gradients(g) -> dict:
    """{sum_parts node: matmul_colsum_parts} for each `sum_parts(d)` (a bias
    gradient) whose d is also the second operand of a `matmul_parts` with the
    same parts (the layer's weight gradient): the kernel reading d sums it."""
    from ..graph import Builder
    out, order = {}, None
    for nid, node in list(g.nodes.items()):
        if node.op.name != "sum_parts" or len(g.nodes[node.inputs[0]].shape) != 2:
            continue
        d, parts = node.inputs[0], node.attrs.get("parts", 2)
        weights = [u for u in g.users(d) if g.nodes[u].op.name == "matmul_parts"
                   and g.nodes[u].inputs[1] == d and g.nodes[u].attrs.get("parts", PARTS) == parts]
        if weights:     # not a product computed from the sum itself (`transpose(sum(d, axes=(0,)) + x) @ d`):
            order = order or {n: i for i, n in enumerate(g.topo())}     # its kernel cannot also compute the sum
            weights = [u for u in weights if not _computed_from(g, u, nid, order)]
        if weights:
            b = Builder(g, node.span)
            out[nid] = b.matmul_colsum_parts(b.value(weights[0]), b.value(d), parts=parts)
    return out


def _computed_from(g, node: int, source: int, order: dict) -> bool:
    """Whether `node` reads `source`, directly or not: a walk back from `node` through
    the nodes after `source` in topological order `order` only (no other can be computed
    from it), so that each layer's check stays near that layer instead of walking the
    whole graph (a walk per layer makes compiling a deep model quadratic)."""
    start = order[source]
    if order[node] < start:
        return False
    seen, todo = {node}, [node]
    while todo:
        for i in g.nodes[todo.pop()].inputs:
            if i == source:
                return True
            if i not in seen and order.get(i, -1) > start:
                seen.add(i)
                todo.append(i)
    return False


def _empty_contraction(kb, node, epilogue, m_dim, n_dim, k_dim):
    """C = 0 when a symbolic K is 0 at run time (a graph with no edges makes a
    per-edge weight gradient one): the tiled kernel then runs no k-block and
    stores nothing, so this kernel, with no tasks otherwise, runs the epilogue
    on zeros."""
    from llvmlite import ir

    from ..lower.codegen import F32, row_columns
    vw = kb.vector_width
    n_static = n_dim if isinstance(n_dim, int) else None

    def tasks(cg):
        empty = cg.b.icmp_signed("==", cg.dim(k_dim), cg.i64(0))
        return cg.b.select(empty, cg.dim(m_dim), cg.i64(0))

    # explicit vector code (the short pipeline): it runs only when K is 0, and O3 spent ~10 ms on each
    with kb.kernel(f"matmul{node.id}_k0", tasks, cost=lambda cg: cg.dim(n_dim), vector_code=True,
                   skippable=True) as (cg, lo, hi):
        if cg is None:      # lowered before: its recorded text stands in (`KernelBuilder.kernel`)
            return
        zero = cg.const(0.0, ir.VectorType(F32, vw))
        with cg.loop(hi, start=lo, name="row") as r:
            if n_static is not None:
                for col, mask in row_columns(n_static, vw):
                    epilogue.emit(cg, [r, cg.i64(col)], vw, mask, given={epilogue.anchor: zero})
            else:
                n = cg.dim(n_dim)
                with cg.loop(cg.ceil_div(n, vw), name="v") as v:
                    col = cg.imul(v, vw)
                    mask = cg.lane_mask(cg.b.sub(n, col), vw)
                    epilogue.emit(cg, [r, col], vw, mask, given={epilogue.anchor: zero})


#: columns of a panel of `pack_panels`: the matmul kernel's (two AVX-512 vectors; an AVX2
#: kernel reads each half as a panel of its own: `gemm._point_at_panel`)
PANEL = 32


#: rows of B a task of `pack_panels` copies: whole rows, read in order (a task per panel
#: read 128 bytes of each row, every row on a page of its own: an LSTM of 512 units'
#: W [512, 2048] took 3.6 ms to pack on the Zen 1 of stop 44, by rows 1.9 ms)
PACK_TASK_ROWS = 64


def packs_transposed(shape) -> bool:
    """Whether `pack_panels(..., transposed=True)` packs W^T of a W of this
    shape: its rows whole panels, its columns whole vectors of every width."""
    return shape[0] % PANEL == 0 and shape[1] % 16 == 0


class PackPanels(Op):
    """B [K, N] as the matmul kernel reads it by panels of PANEL columns:
    [ceil(N / PANEL), K, PANEL], each panel's rows one after another, the last
    panel's missing columns zeros. A matmul whose B is a parameter with rows
    4 KiB or more apart (2 KiB over a long K), in a recursion's node case, reads
    it so (`tree.pack_wide`): those rows fall in a few of L1's sets and each on a
    page of its own. `start`, `stop`: the rows of x it packs (a block of a
    parameter's rows, read where it lies rather than copied out first); all
    of them by default. `transposed`: B is those rows' transpose (a
    cotangent's W^T), read from x in square blocks turned in registers, with
    no transpose written first; then the rows are whole panels and x's
    columns a multiple of 16. Made after autodiff: no gradient."""
    name = "pack_panels"
    floats_only = True

    def shape(self, x, *, start: int = 0, stop: int | None = None, transposed: bool = False) -> TensorType:
        expect(x.rank == 2 and all(isinstance(d, int) for d in x.shape),
               f"pack_panels needs a matrix of known shape, got {x}")
        stop = x.shape[0] if stop is None else stop
        expect(0 <= start < stop <= x.shape[0], f"pack_panels rows [{start}, {stop}) are not rows of {x}")
        if transposed:
            expect(packs_transposed((stop - start, x.shape[1])),
                   f"pack_panels of a transpose needs whole panels of rows and columns in 16s, got {x}")
            return TensorType(((stop - start) // PANEL, x.shape[1], PANEL), x.dtype)
        return TensorType((-(-x.shape[1] // PANEL), stop - start, PANEL), x.dtype)

    def reference(self, x, *, start=0, stop=None, transposed=False):
        x = x[start:stop]
        if transposed:
            x = x.T
        k, n = x.shape
        out = np.zeros((-(-n // PANEL), k, PANEL), x.dtype)
        for p in range(out.shape[0]):
            cols = x[:, p * PANEL:(p + 1) * PANEL]
            out[p, :, :cols.shape[1]] = cols
        return out

    def samples(self):
        return [Sample((((k, n), "fixed"),)) for k, n in ((5, 7), (3, 64), (17, 70))] + \
            [Sample((((9, 40), "fixed"),), {"start": 2, "stop": 7}),     # tasks of PACK_TASK_ROWS, the last short
             Sample((((150, 70), "fixed"),), {"start": 5, "stop": 140}),
             Sample((((70, 48), "fixed"),), {"start": 3, "stop": 67, "transposed": True})]

    def lower(self, kb, node, epilogue):
        from ..lower.codegen import F32
        n = kb.graph.nodes[node.inputs[0]].shape[1]
        panels, k, _ = node.shape
        first = node.attrs.get("start", 0)
        vw = kb.vector_width
        if node.attrs.get("transposed"):
            _pack_transposed(kb, node, first, n)
            return
        tasks = -(-k // PACK_TASK_ROWS)
        with kb.kernel(f"pack{node.id}", lambda cg: cg.i64(tasks), cost=lambda cg: cg.i64(PACK_TASK_ROWS * n),
                       vector_code=True) as (cg, lo, hi):
            src, dst = cg.ptr(node.inputs[0]), cg.ptr(node.id)
            with cg.loop(hi, start=lo, name="t") as t:
                r0 = cg.imul(t, PACK_TASK_ROWS)
                r1 = cg.imin(cg.iadd(r0, PACK_TASK_ROWS), cg.i64(k))
                with cg.loop(r1, start=r0, name="k", unroll=False) as r:
                    row = cg.imul(cg.iadd(r, first), n)

                    def panel(p, masks):
                        j0, at = cg.imul(p, PANEL), cg.imul(cg.iadd(cg.imul(p, k), r), PANEL)
                        for v, mask in enumerate(masks):
                            value = cg.load(src, cg.iadd(row, cg.iadd(j0, v * vw)), F32, vw, mask)
                            cg.store(value, dst, cg.iadd(at, v * vw))
                    with cg.loop(cg.i64(n // PANEL), name="p", unroll=False) as p:
                        panel(p, [None] * (PANEL // vw))
                    if n % PANEL:       # the last panel's missing columns read as zeros
                        panel(cg.i64(n // PANEL), [cg.lane_mask(cg.i64(n % PANEL - v * vw), vw)
                                                   for v in range(PANEL // vw)])


def _pack_transposed(kb, node, first: int, n: int) -> None:
    """Panel p of (x[first:...])^T: x's rows first + p PANEL ... in vw x vw blocks,
    each turned in registers and stored as vw rows of the panel; a task a panel."""
    from ..lower.codegen import F32
    panels, k, _ = node.shape
    vw = kb.vector_width
    with kb.kernel(f"pack{node.id}", lambda cg: cg.i64(panels), cost=lambda cg: cg.i64(k * PANEL),
                   vector_code=True) as (cg, lo, hi):
        src, dst = cg.ptr(node.inputs[0]), cg.ptr(node.id)
        with cg.loop(hi, start=lo, name="p") as p:
            with cg.loop(cg.i64(k // vw), name="c", unroll=False) as c:
                c0 = cg.imul(c, vw)
                for g in range(PANEL // vw):
                    r0 = cg.iadd(cg.imul(p, PANEL), first + g * vw)
                    rows = [cg.load(src, cg.iadd(cg.imul(cg.iadd(r0, i), n), c0), F32, vw) for i in range(vw)]
                    for j, v in enumerate(transpose_block(cg, rows)):
                        at = cg.iadd(cg.imul(cg.iadd(cg.imul(p, k), cg.iadd(c0, j)), PANEL), g * vw)
                        cg.store(v, dst, at)


def unpack_panels(packed: np.ndarray, n: int) -> np.ndarray:
    """The [K, n] matrix of a `pack_panels` result."""
    return np.concatenate(list(packed), axis=1)[:, :n]


def _packed_of(b, n) -> bool:
    """Whether b is the `pack_panels` shape of a matrix of n columns."""
    return b.rank == 3 and b.shape[2] == PANEL and isinstance(n, int) and b.shape[0] == -(-n // PANEL)


class Transpose(Op):
    """x^T for a matrix."""
    name = "transpose"
    traits = frozenset({"moves_data"})
    surface = True

    def shape(self, x) -> TensorType:
        expect(x.rank == 2, f"transpose needs a matrix, got {x}")
        return TensorType((x.shape[1], x.shape[0]), x.dtype)

    def vjp(self, b, g, out, x):
        return [b.transpose(g)]

    def reference(self, x):
        return np.ascontiguousarray(x.T)

    def samples(self):
        return [Sample(((5, 7),)), Sample(((17, 33),)), Sample(((32, 48),))]

    def lower(self, kb, node, epilogue):
        from ..lower.codegen import F32
        rows_d, cols_d = kb.graph.nodes[node.inputs[0]].shape
        vw = kb.vector_width
        # a task's blocks of vw rows (`TRANSPOSE_BLOCKS`)
        stack = TRANSPOSE_BLOCKS if all(isinstance(d, int) for d in (rows_d, cols_d)) \
            and 4 * rows_d * cols_d >= TRANSPOSE_STACKED_BYTES else 1

        def tasks(cg):
            return cg.ceil_div(cg.dim(rows_d), vw * stack)

        with kb.kernel(f"transpose{node.id}", tasks, cost=lambda cg: cg.imul(cg.dim(cols_d), vw * stack),
                       vector_code=True, skippable=True) as (cg, lo, hi):
            if cg is None:      # lowered before: its recorded text stands in (`KernelBuilder.kernel`)
                return
            b = cg.b
            # sizes as constants: read at run time (one text at any size) the transposes
            # of LeNet-5's weights took 15.4 us a step instead of 9.4
            rows, cols = cg.dim(rows_d), cg.dim(cols_d)
            src, dst = cg.ptr(node.inputs[0]), cg.ptr(node.id)

            def block(r0, c0):      # a whole vw x vw block, transposed in registers
                vecs = [cg.load(src, cg.iadd(cg.imul(cg.iadd(r0, i), cols), c0), F32, vw) for i in range(vw)]
                for j, v in enumerate(transpose_block(cg, vecs)):
                    cg.store(v, dst, cg.iadd(cg.imul(cg.iadd(c0, j), rows), r0))

            def edge(r0, r1, c0, c1):   # the ragged right and bottom edges, element by element
                with cg.loop(r1, start=r0, name="r") as r:
                    with cg.loop(c1, start=c0, name="c") as c:
                        cg.store(cg.load(src, cg.iadd(cg.imul(r, cols), c)), dst, cg.iadd(cg.imul(c, rows), r))

            no_edges = all(isinstance(d, int) and d % vw == 0 for d in (rows_d, cols_d))
            # a side known to be under vw: no block is ever whole, and its 64 shuffles
            # would cost LLVM ~20 ms for code that never runs
            no_blocks = any(isinstance(d, int) and d < vw for d in (rows_d, cols_d))

            @contextmanager
            def first_rows(rb):
                """the first rows of the task's blocks (one block: no loop)"""
                if stack == 1:
                    yield cg.imul(rb, vw)
                    return
                first = cg.imul(rb, vw * stack)
                count = cg.imin(cg.i64(stack), cg.ceil_div(b.sub(rows, first), vw))
                with cg.loop(count, name="sb", unroll=False) as sb:
                    yield cg.iadd(first, cg.imul(sb, vw))

            with cg.loop(hi, start=lo, name="rb") as rb:
                # vector blocks: unrolling only costs compile time
                with cg.loop(cols, step=vw, name="cb", unroll=False) as c0, first_rows(rb) as r0:
                    r1 = cg.imin(cg.iadd(r0, vw), rows)
                    if no_edges:
                        block(r0, c0)
                    elif no_blocks:
                        edge(r0, r1, c0, cg.imin(cg.iadd(c0, vw), cols))
                    else:
                        c1 = cg.imin(cg.iadd(c0, vw), cols)
                        full = b.and_(b.icmp_signed("==", b.sub(r1, r0), cg.i64(vw)),
                                      b.icmp_signed("==", b.sub(c1, c0), cg.i64(vw)))
                        with b.if_else(full) as (whole, ragged):
                            with whole:
                                block(r0, c0)
                            with ragged:
                                edge(r0, r1, c0, c1)


#: blocks of vw rows a task of a large transpose (TRANSPOSE_STACKED_BYTES or more, sizes known
#: at compile time) runs, column block by column block over them all: each row of the result
#: then gets 4 vectors in a row, not 1. A [2048, 2048] transpose from beyond the caches (an
#: MLP's weight before dY W^T) took 5.4 ms with tasks of one block, 2.9 ms with four
#: (benchmarks/RESULTS.md, stop 29)
TRANSPOSE_BLOCKS = 4
TRANSPOSE_STACKED_BYTES = 1 << 20


def transpose_block(cg, rows: list) -> list:
    """The columns of a square block held as one vector per row. Each stage
    swaps one bit of the row index with the same bit of the lane index
    (two-source shuffles); log2(n) stages swap them all."""
    from llvmlite import ir
    n = len(rows)
    v = list(rows)
    bit = 1
    while bit < n:
        lo = [j if not j & bit else n + (j ^ bit) for j in range(n)]
        hi = [j | bit if not j & bit else n + j for j in range(n)]
        masks = [ir.Constant(ir.VectorType(ir.IntType(32), n), m) for m in (lo, hi)]
        for i in range(n):
            if not i & bit:
                p = i | bit
                v[i], v[p] = (cg.b.shuffle_vector(v[i], v[p], masks[0]),
                              cg.b.shuffle_vector(v[i], v[p], masks[1]))
        bit <<= 1
    return v
