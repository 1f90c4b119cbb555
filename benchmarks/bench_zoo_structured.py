"""Structured models no other benchmark measures: structc against PyTorch, one SGD training step.

    python benchmarks/bench_zoo_structured.py                   # every case, 1 thread, 3 rounds
    python benchmarks/bench_zoo_structured.py --cases gcn_10k,gat_5k --threads 2 --rounds 5
    python benchmarks/bench_zoo_structured.py --check           # each model's loss over 20 steps, both frameworks
    python benchmarks/bench_zoo_structured.py --profile --cases sage_10k   # structc's kernels, one step

bench_zoo.py's survey (and its driver: a fresh process per framework and
case, pinned to one core at one thread, rounds alternating the order) for
graphs, trees and sequences at shapes the issues' benchmarks do not use:
bigger graphs and features, molecule-sized batches, edge features, graph
readouts, hidden 256 and a 20,000-word vocabulary over trees, chains against
balanced trees, ragged and long sequences. PyTorch runs what a competent
user writes: a sparse matmul (GCN) or `index_add_`/`scatter_reduce` for
message passing, one matmul per tree level (as bench_trees/bench_treelstm),
`nn.LSTM`/`nn.GRU` over the padded batch (faster than `pack_padded_sequence`). Both
compute the same model from the same batch (sizes, loss, SGD at lr 0.05; 0.005 for GIN),
except that PyTorch's GRU takes its candidate from r·(W h + b) and structc's
`gru_cell` from W (r·h) (the same matmuls; bench_lstm.py says so too), and
PyTorch's embeddings get a dense gradient (its default), structc's a sparse one.
At `--threads 2` the machine must be otherwise idle: at a load average of 3-4
PyTorch's two-thread steps took 5-10x their time at load 1 (its OpenMP threads
wait on a busy core), while structc's pool backs off to one thread.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench_zoo import drive, timed  # noqa: E402  (the survey's driver and timer)
from cores import one_core  # noqa: E402

LR = 0.05


@dataclass(frozen=True)
class Case:
    source: str                                   # the structc model
    data: Callable[[], dict]                      # the batch, the same for both frameworks
    inputs: Callable[[dict], dict]                # structc's train_step inputs from the batch
    torch: Callable[[dict], tuple]                # (parameters, loss of the batch) in PyTorch
    steps: int                                    # steps timed
    lr: float = LR                                # SGD's, in both frameworks


# -- batches --------------------------------------------------------------------------

def random_graph(nodes: int, edges: int, features: int, classes: int, edge_features: int = 0,
                 hubs: bool = False) -> dict:
    """Edges uniform at random (seed 0), a label per node. With `hubs`, destinations
    follow Zipf's law (node i's share ∝ 1/(i+1)): node 0 receives a tenth of the edges."""
    rng = np.random.default_rng(0)
    ends = rng.integers(0, nodes, (2, edges))
    if hubs:
        share = 1 / np.arange(1, nodes + 1)
        ends[1] = rng.choice(nodes, edges, p=share / share.sum())
    d = {"edge_index": ends, "x": rng.normal(size=(nodes, features)).astype(np.float32),
         "y": rng.integers(0, classes, nodes).astype(np.int32)}
    if edge_features:
        d["edge_x"] = rng.normal(size=(edges, edge_features)).astype(np.float32)
    return d


def molecules(graphs: int, sizes: tuple[int, int], features: int, classes: int) -> dict:
    """A batch of small graphs: each a ring with n/4 random chords, both ways
    (about 2.5 incoming edges a node, like molecules), a label per graph. Features
    of scale 0.1: three unnormalised sums and a sum readout then start structc's
    loss near 6, not 60 (where SGD diverged).
    """
    rng = np.random.default_rng(0)
    src, dst, gid, first = [], [], [], 0
    for k in range(graphs):
        n = int(rng.integers(sizes[0], sizes[1] + 1))
        a = np.concatenate([np.arange(n), rng.integers(0, n, n // 4)])
        b = np.concatenate([(np.arange(n) + 1) % n, rng.integers(0, n, n // 4)])
        src += [a + first, b + first]
        dst += [b + first, a + first]
        gid.append(np.full(n, k))
        first += n
    return {"edge_index": np.stack([np.concatenate(src), np.concatenate(dst)]),
            "x": 0.1 * rng.normal(size=(first, features)).astype(np.float32), "graph_id": np.concatenate(gid),
            "y": rng.integers(0, classes, graphs).astype(np.int32)}


def graph_inputs(d: dict) -> dict:
    import structc
    g = structc.Graph(d["edge_index"], x=d["x"], edge_x=d.get("edge_x"), graph_id=d.get("graph_id"))
    return {"g": g, "y": d["y"]}


def _random_tree(rng, leaves: int, vocab: int):
    if leaves == 1:
        return int(rng.integers(vocab))
    k = int(rng.integers(1, leaves))
    return (_random_tree(rng, k, vocab), _random_tree(rng, leaves - k, vocab))


def _balanced_tree(rng, leaves: int, vocab: int):
    if leaves == 1:
        return int(rng.integers(vocab))
    return (_balanced_tree(rng, leaves // 2, vocab), _balanced_tree(rng, leaves - leaves // 2, vocab))


def _chain(rng, leaves: int, vocab: int):
    """Left-branching: ((((w w) w) w) ...), depth leaves - 1."""
    tree = int(rng.integers(vocab))
    for _ in range(leaves - 1):
        tree = (tree, int(rng.integers(vocab)))
    return tree


def forest(shape, trees: int, leaves: int, vocab: int, classes: int = 5) -> Callable[[], dict]:
    def make():
        from structc.forest import Forest
        rng = np.random.default_rng(0)
        return {"t": Forest.from_tuples([shape(rng, leaves, vocab) for _ in range(trees)]),
                "y": rng.integers(0, classes, trees).astype(np.int32)}
    return make


def ragged(batch: int, lengths: tuple[int, int], features: int, classes: int, vocab: int = 0) -> Callable[[], dict]:
    """Sequences of lengths drawn from lengths[0]..lengths[1] (seed 0): feature
    rows, or word ids when `vocab`; flat, sequence after sequence."""
    def make():
        rng = np.random.default_rng(0)
        n = rng.integers(lengths[0], lengths[1] + 1, batch)
        rows = int(n.sum())
        x = rng.integers(0, vocab, rows).astype(np.int32) if vocab else rng.normal(size=(rows, features)).astype(np.float32)
        return {"x": x, "lengths": n, "y": rng.integers(0, classes, batch).astype(np.int32)}
    return make


def sequence_inputs(d: dict) -> dict:
    from structc.seqdata import Sequences
    return {"s": Sequences.from_flat(d["x"], np.concatenate([[0], np.cumsum(d["lengths"])])), "y": d["y"]}


# -- PyTorch: graphs -----------------------------------------------------------------

def _ends(d: dict):
    import torch
    src, dst = (torch.from_numpy(a).long() for a in d["edge_index"])
    return src, dst, len(d["x"])


def _sum_in(h, src, dst, nodes):
    """Σ over each node's incoming edges of the source's row."""
    import torch
    return torch.zeros(nodes, h.shape[1]).index_add_(0, dst, h[src])


def _in_degree(dst, nodes):
    import torch
    return torch.bincount(dst, minlength=nodes).clamp(min=1).float()[:, None]


def _model(*layers):
    import torch
    return torch.nn.ModuleList(layers)


def _tensors(d: dict):
    import torch
    return torch.from_numpy(d["x"]), torch.from_numpy(d["y"]).long()


def torch_gcn(features: int, hidden: int, classes: int):
    """A_hat (A + I, D^-1/2 each side by in-degree) as a sparse CSR matrix, built once."""
    def build(d):
        import torch
        import torch.nn.functional as F
        src, dst, n = _ends(d)
        norm = (torch.bincount(dst, minlength=n) + 1).float() ** -0.5
        rows, cols = torch.cat([dst, torch.arange(n)]), torch.cat([src, torch.arange(n)])
        a = torch.sparse_coo_tensor(torch.stack([rows, cols]), norm[rows] * norm[cols], (n, n)).coalesce().to_sparse_csr()
        x, y = _tensors(d)
        m = _model(torch.nn.Linear(features, hidden), torch.nn.Linear(hidden, classes))
        return m.parameters(), lambda: F.cross_entropy(a @ m[1](torch.relu(a @ m[0](x))), y)
    return build


def torch_sage(features: int, hidden: int, classes: int, layers: int):
    def build(d):
        import torch
        import torch.nn.functional as F
        src, dst, n = _ends(d)
        deg = _in_degree(dst, n)
        x, y = _tensors(d)
        m = _model(*[torch.nn.Linear(2 * (features if k == 0 else hidden), hidden) for k in range(layers)],
                   torch.nn.Linear(hidden, classes))

        def loss():
            h = x
            for lin in m[:-1]:
                h = torch.relu(lin(torch.cat([h, _sum_in(h, src, dst, n) / deg], 1)))
            return F.cross_entropy(m[-1](h), y)
        return m.parameters(), loss
    return build


def torch_edge_mpnn(features: int, edge_features: int, hidden: int, classes: int, layers: int):
    def build(d):
        import torch
        import torch.nn.functional as F
        src, dst, n = _ends(d)
        deg = _in_degree(dst, n)
        x, y = _tensors(d)
        e = torch.from_numpy(d["edge_x"])
        widths = [features] + [hidden] * layers
        m = _model(*[torch.nn.Linear(w, hidden) for w in widths[:-1]],
                   *[torch.nn.Linear(2 * w + edge_features, hidden) for w in widths[:-1]],
                   torch.nn.Linear(hidden, classes))

        def loss():
            h = x
            for k in range(layers):
                msg = torch.relu(m[layers + k](torch.cat([h[src], h[dst], e], 1)))
                h = torch.relu(m[k](h) + torch.zeros(n, hidden).index_add_(0, dst, msg) / deg)
            return F.cross_entropy(m[-1](h), y)
        return m.parameters(), loss
    return build


def torch_gin(features: int, hidden: int, classes: int, layers: int):
    def build(d):
        import torch
        import torch.nn.functional as F
        src, dst, n = _ends(d)
        gid = torch.from_numpy(d["graph_id"]).long()
        x, y = _tensors(d)
        widths = [features] + [hidden] * layers
        m = _model(*[torch.nn.Sequential(torch.nn.Linear(w, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden))
                     for w in widths[:-1]], torch.nn.Linear(hidden, classes))

        def loss():
            h = x
            for mlp in m[:-1]:
                h = torch.relu(mlp(h + _sum_in(h, src, dst, n)))
            return F.cross_entropy(m[-1](torch.zeros(len(y), hidden).index_add_(0, gid, h)), y)
        return m.parameters(), loss
    return build


def torch_readout(features: int, hidden: int, classes: int, layers: int):
    """Sum-aggregating layers, then each graph's mean and max (scatter_reduce amax)."""
    def build(d):
        import torch
        import torch.nn.functional as F
        src, dst, n = _ends(d)
        gid = torch.from_numpy(d["graph_id"]).long()
        x, y = _tensors(d)
        graphs = len(y)
        count = torch.bincount(gid, minlength=graphs).float()[:, None]
        widths = [features] + [hidden] * layers
        m = _model(*[torch.nn.Linear(w, hidden) for w in widths[:-1]],
                   *[torch.nn.Linear(w, hidden, bias=False) for w in widths[:-1]],
                   torch.nn.Linear(2 * hidden, hidden), torch.nn.Linear(hidden, classes))

        def loss():
            h = x
            for k in range(layers):
                h = torch.relu(m[k](h) + _sum_in(m[layers + k](h), src, dst, n))
            mean = torch.zeros(graphs, hidden).index_add_(0, gid, h) / count
            top = torch.full((graphs, hidden), -torch.inf).scatter_reduce(0, gid[:, None].expand(-1, hidden), h, "amax")
            return F.cross_entropy(m[-1](torch.relu(m[-2](torch.cat([mean, top], 1)))), y)
        return m.parameters(), loss
    return build


def torch_gat(features: int, heads: int, width: int, classes: int, slope: float = 0.2):
    """bench_gat.py's layer (self loops added, each node's largest score subtracted)."""
    def build(d):
        import torch
        import torch.nn.functional as F
        src, dst, n = _ends(d)
        src, dst = torch.cat([src, torch.arange(n)]), torch.cat([dst, torch.arange(n)])
        x, y = _tensors(d)

        def params(f, h, w):
            return [torch.nn.Parameter(torch.randn(*s) * 0.1) for s in ((f, h * w), (h, w), (h, w), (h * w,))]
        p1, p2 = params(features, heads, width), params(heads * width, 1, classes)

        def layer(h, p, heads, width):
            w, a_src, a_dst, b = p
            wh = (h @ w).view(n, heads, width)
            e = F.leaky_relu((wh * a_src).sum(-1)[src] + (wh * a_dst).sum(-1)[dst], slope)
            top = torch.full((n, heads), -torch.inf).scatter_reduce(0, dst[:, None].expand(-1, heads), e.detach(), "amax")
            ex = (e - top[dst]).exp()
            alpha = ex / torch.zeros(n, heads).index_add_(0, dst, ex)[dst]
            out = torch.zeros(n, heads, width).index_add_(0, dst, alpha[:, :, None] * wh[src])
            return out.reshape(n, heads * width) + b
        return p1 + p2, lambda: F.cross_entropy(layer(F.elu(layer(x, p1, heads, width)), p2, 1, classes), y)
    return build


# -- PyTorch: trees and sequences ----------------------------------------------------

def _schedule(d: dict):
    """The forest's level schedule (structc's own, as bench_trees uses it)."""
    import torch
    f = d["t"]
    return (torch.tensor(f.children, dtype=torch.long), torch.tensor(f.words, dtype=torch.long),
            torch.tensor(f.roots, dtype=torch.long), [0] + f.level_end.tolist(), torch.from_numpy(d["y"]).long())


def torch_tree_rnn(vocab: int, dim: int, classes: int = 5):
    """Level-batched: one matmul per height, as bench_trees.py's `level_batched`."""
    def build(d):
        import torch
        import torch.nn.functional as F
        ch, words, roots, ends, y = _schedule(d)
        m = _model(torch.nn.Embedding(vocab, dim), torch.nn.Linear(2 * dim, dim), torch.nn.Linear(dim, classes))

        def loss():
            parts = [m[0](words)]
            for lo, hi in zip(ends[1:-1], ends[2:]):
                h, kids = torch.cat(parts), ch[lo:hi]
                parts.append(torch.tanh(m[1](torch.cat([h[kids[:, 0]], h[kids[:, 1]]], 1))))
            return F.cross_entropy(m[2](torch.cat(parts)[roots]), y)
        return m.parameters(), loss
    return build


def torch_tree_lstm(vocab: int, dim: int, hidden: int, classes: int = 5):
    """Child-Sum Tree-LSTM, level-batched, as bench_treelstm.py (binary trees)."""
    def build(d):
        import torch
        import torch.nn.functional as F
        ch, words, roots, ends, y = _schedule(d)
        m = _model(torch.nn.Embedding(vocab, dim), torch.nn.Linear(dim, 3 * hidden),
                   torch.nn.Linear(hidden, 3 * hidden), torch.nn.Linear(hidden, hidden), torch.nn.Linear(hidden, classes))

        def cell(g, kept):
            i, o, u = g.chunk(3, dim=1)
            c = torch.sigmoid(i) * torch.tanh(u) + kept
            return torch.sigmoid(o) * torch.tanh(c), c

        def loss():
            h, c = cell(m[1](m[0](words)), 0.0)
            hs, cs = [h], [c]
            for lo, hi in zip(ends[1:-1], ends[2:]):
                kids = ch[lo:hi].reshape(-1)
                hk = torch.cat(hs)[kids]
                kept = (torch.sigmoid(m[3](hk)) * torch.cat(cs)[kids]).view(-1, 2, hidden).sum(1)
                h, c = cell(m[2](hk.view(-1, 2, hidden).sum(1)), kept)
                hs.append(h)
                cs.append(c)
            return F.cross_entropy(m[4](torch.cat(hs)[roots]), y)
        return m.parameters(), loss
    return build


def _padded(d: dict):
    """[T, B, ...] zero-padded, time first, and the lengths."""
    import torch
    n = d["lengths"]
    out = np.zeros((int(n.max()), len(n), *d["x"].shape[1:]), d["x"].dtype)
    for b, (at, k) in enumerate(zip(np.concatenate([[0], np.cumsum(n)[:-1]]), n)):
        out[:k, b] = d["x"][at:at + k]
    return torch.from_numpy(out), torch.from_numpy(n).long()


def _valid(n, length: int):
    """[T, B, 1]: 1 at each sequence's positions, 0 in its padding."""
    import torch
    return (torch.arange(length)[:, None] < n[None, :]).float()[:, :, None]


def _reversed(xp, n):
    """Each sequence reversed within its length (the padding stays behind it)."""
    import torch
    t = torch.arange(xp.shape[0])[:, None]
    at = torch.where(t < n[None, :], n[None, :] - 1 - t, t)
    return xp.gather(0, at[:, :, None].expand_as(xp))


def torch_birnn(cell: str, features: int, hidden: int, classes: int):
    """Two nn.LSTM/nn.GRU over the padded batch, the second over each sequence
    reversed within its length; each direction's mean state over the real
    positions. (`bidirectional=True` over `pack_padded_sequence` computes the
    same and took 634 ms a step against 254 padded: torch's backward of a
    packed batch is slow on the CPU.)"""
    def build(d):
        import torch
        import torch.nn.functional as F
        xp, n = _padded(d)
        xr, valid = _reversed(xp, n), _valid(n, xp.shape[0])
        y = torch.from_numpy(d["y"]).long()
        rnn = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell]
        m = _model(rnn(features, hidden), rnn(features, hidden), torch.nn.Linear(2 * hidden, classes))

        def loss():
            states = torch.cat([m[0](xp)[0], m[1](xr)[0]], 2)
            return F.cross_entropy(m[2]((states * valid).sum(0) / n[:, None]), y)
        return m.parameters(), loss
    return build


def torch_lstm_last(features: int, hidden: int, classes: int, vocab: int = 0, layers: int = 1):
    """nn.LSTM (after nn.Embedding when `vocab`; `layers` stacked) over the padded
    batch; each sequence's state at its last position (padding after it changes nothing)."""
    def build(d):
        import torch
        import torch.nn.functional as F
        xp, n = _padded(d)
        xp = xp.long() if vocab else xp
        y = torch.from_numpy(d["y"]).long()
        m = _model(torch.nn.Embedding(vocab, features) if vocab else torch.nn.Identity(),
                   torch.nn.LSTM(features, hidden, num_layers=layers), torch.nn.Linear(hidden, classes))
        rows = torch.arange(len(n))

        def loss():
            return F.cross_entropy(m[2](m[1](m[0](xp))[0][n - 1, rows]), y)
        return m.parameters(), loss
    return build


# -- the cases -------------------------------------------------------------------------

def _graph_model(graph: str, target: str, classes: int, body: list[str]) -> str:
    lines = [f"model M {{ input g: graph({graph})  target y: class[g.{target}] of {classes}"] + [f"  {b}" for b in body]
    return "\n".join(lines) + " }"


def _lstm_rec(name: str, step_x: str, hidden: int, backward: bool = False) -> str:
    state, prev, case = (f"({name}, {name}c)", "t.next" if backward else "t.prev", "prev" if backward else "next")
    return (f"rec {state}(t) = init: (zeros({hidden}), zeros({hidden}))\n"
            f"    {case}: lstm_cell({step_x}, {name}({prev}), {name}c({prev}), {hidden})")


def _stacked_lstm_rec(hidden: int) -> str:
    """Two LSTM layers as one recurrence: each step runs layer 1, then layer 2 on its new h."""
    return (f"rec (h1, c1, h, c)(t) = init: (zeros({hidden}), zeros({hidden}), zeros({hidden}), zeros({hidden}))\n"
            f"    next: {{ (a, ac) = lstm_cell(t.x, h1(t.prev), c1(t.prev), {hidden});\n"
            f"            (b, bc) = lstm_cell(a, h(t.prev), c(t.prev), {hidden}); (a, ac, b, bc) }}")


def _gru_rec(name: str, hidden: int, backward: bool = False) -> str:
    prev, case = ("t.next", "prev") if backward else ("t.prev", "next")
    return f"rec {name}(t) = init: zeros({hidden})\n    {case}: gru_cell(t.x, {name}({prev}), {hidden})"


def _tree_rnn(vocab: int, dim: int) -> str:
    return f"""model M {{ input t: forest of word(vocab={vocab})  target y: class[t.trees] of 5
  param E: embedding({vocab}, {dim})
  rec h(n) = leaf: E[n.word]
             node: tanh(dense(concat(h(n.left), h(n.right)), {dim}))
  loss cross_entropy(dense(h(t.root), 5), y) }}"""


def _tree_lstm(vocab: int, dim: int, hidden: int) -> str:
    return f"""model M {{ input t: forest of word(vocab={vocab})  target y: class[t.trees] of 5
  param E: embedding({vocab}, {dim})
  rec (h, c)(n) =
    leaf: {{ s = lstm_state(dense(E[n.word], {3 * hidden}, name="leaf"), 0);
            (chunk(s, 0, 2), chunk(s, 1, 2)) }}
    node: {{ s = lstm_state(dense(sum(h(n.children)), {3 * hidden}, name="iou"),
                           sum(sigmoid(dense(h(k), {hidden}, name="f")) * c(k) for k in n.children));
            (chunk(s, 0, 2), chunk(s, 1, 2)) }}
  loss cross_entropy(dense(h(t.root), 5, name="out"), y) }}"""


def _seq_model(input_type: str, body: list[str], readout: str, classes: int) -> str:
    lines = [f"model M {{ input s: sequence of {input_type}  target y: class[s.sequences] of {classes}"]
    return "\n".join(lines + [f"  {b}" for b in body] + [f"  loss cross_entropy(dense({readout}, {classes}), y) }}"])


GCN = "sum(dense({}, {}) over g.edges, self_loops=true, norm=gcn)"
SAGE = "repeat 2 { h = relu(dense(concat(h, mean(h over g.edges), axis=1), 128)) }"
EDGE = ("repeat 2 { h = relu(dense(h, 64) + mean(relu(dense(concat(h[g.src], h[g.dst], g.e, axis=1), 64)) "
        "over g.edges)) }")
GIN = "repeat 3 { h = relu(dense(relu(dense(h + sum(h over g.edges), 64)), 64)) }"
SUMS = "repeat 2 { h = relu(dense(h, 64) + sum(dense(h, 64, bias=false) over g.edges)) }"
BI_LSTM = [_lstm_rec("h", "t.x", 128), _lstm_rec("b", "t.x", 128, backward=True)]
BI_GRU = [_gru_rec("h", 128), _gru_rec("b", 128, backward=True)]

CASES = {
    # one graph of 10,000 nodes, 8 incoming edges a node, 256 features; two GCN layers (128, 16 classes)
    "gcn_10k": Case(
        _graph_model("features=256", "nodes", 16, [f"h = relu({GCN.format('g.x', 128)})",
                                                   f"loss cross_entropy({GCN.format('h', 16)}, y)"]),
        lambda: random_graph(10_000, 80_000, 256, 16), graph_inputs, torch_gcn(256, 128, 16), 20),
    # GraphSAGE-mean: concat(self, mean of neighbours), 2 layers of 128 on 10,000 nodes x 5 edges
    "sage_10k": Case(
        _graph_model("features=128", "nodes", 16, ["h = g.x", SAGE, "loss cross_entropy(dense(h, 16), y)"]),
        lambda: random_graph(10_000, 50_000, 128, 16), graph_inputs, torch_sage(128, 128, 16, 2), 20),
    # messages from both ends and 16 edge features, mean-aggregated: 5,000 nodes x 8 edges
    "edge_mpnn_5k": Case(
        _graph_model("features=64, edge_features=16", "nodes", 8, ["h = g.x", EDGE, "loss cross_entropy(dense(h, 8), y)"]),
        lambda: random_graph(5_000, 40_000, 64, 8, edge_features=16), graph_inputs,
        torch_edge_mpnn(64, 16, 64, 8, 2), 30),
    # the same layers where destinations follow Zipf's law (hubs of thousands of edges)
    "sage_hubs_10k": Case(
        _graph_model("features=128", "nodes", 16, ["h = g.x", SAGE, "loss cross_entropy(dense(h, 16), y)"]),
        lambda: random_graph(10_000, 50_000, 128, 16, hubs=True), graph_inputs, torch_sage(128, 128, 16, 2), 20),
    # GAT 8 heads x 8 (concatenated), elu, GAT 1 head x 16 classes: 5,000 nodes x 8 edges, 128 features
    "gat_5k": Case(
        _graph_model("features=128", "nodes", 16, ["h = elu(gat(g.x over g.edges, 8, heads=8))",
                                                   "loss cross_entropy(gat(h over g.edges, 16, heads=1), y)"]),
        lambda: random_graph(5_000, 40_000, 128, 16), graph_inputs, torch_gat(128, 8, 8, 16), 20),
    # GIN-like (h + Σ neighbours, 2-layer MLP) x 3 over 64 molecule-sized graphs, sum readout
    "gin_molecules": Case(
        _graph_model("features=32", "graphs", 4, ["h = g.x", GIN, "loss cross_entropy(dense(sum(h over g.nodes), 4), y)"]),
        lambda: molecules(64, (20, 40), 32, 4), graph_inputs, torch_gin(32, 64, 4, 3), 300,
        lr=0.005),     # structc's glorot weights start at loss 6 and diverged at 0.05
    # 2 sum layers, mean + max readout per graph, MLP head: 128 graphs of 10-30 nodes
    "readout_graphs": Case(
        _graph_model("features=16", "graphs", 3, ["h = g.x", SUMS,
                                                  "r = concat(mean(h over g.nodes), max(h over g.nodes), axis=1)",
                                                  "loss cross_entropy(dense(relu(dense(r, 64)), 3), y)"]),
        lambda: molecules(128, (10, 30), 16, 3), graph_inputs, torch_readout(16, 64, 3, 2), 300),
    # tree-RNN and Child-Sum Tree-LSTM at hidden 256, vocabulary 20,000: bench_trees' 32 x 25-leaf trees
    "tree_rnn_256": Case(_tree_rnn(20_000, 256), forest(_random_tree, 32, 25, 20_000), dict,
                         torch_tree_rnn(20_000, 256), 100),
    "tree_lstm_256": Case(_tree_lstm(20_000, 128, 256), forest(_random_tree, 32, 25, 20_000), dict,
                          torch_tree_lstm(20_000, 128, 256), 50),
    # the same 255 nodes a tree, 16 trees, d = 128: left-branching chains (depth 127) against balanced (depth 7)
    "tree_chains_128": Case(_tree_rnn(20_000, 128), forest(_chain, 16, 128, 20_000), dict,
                            torch_tree_rnn(20_000, 128), 50),
    "tree_balanced_128": Case(_tree_rnn(20_000, 128), forest(_balanced_tree, 16, 128, 20_000), dict,
                              torch_tree_rnn(20_000, 128), 200),
    # bidirectional LSTM / GRU, 64 features, 128 units a direction, 64 sequences of 5-200, mean states
    "bilstm_ragged": Case(_seq_model("f32[64]", BI_LSTM, "concat(h(s.mean), b(s.mean))", 10),
                          ragged(64, (5, 200), 64, 10), sequence_inputs, torch_birnn("lstm", 64, 128, 10), 10),
    "bigru_ragged": Case(_seq_model("f32[64]", BI_GRU, "concat(h(s.mean), b(s.mean))", 10),
                         ragged(64, (5, 200), 64, 10), sequence_inputs, torch_birnn("gru", 64, 128, 10), 10),
    # a text classifier: embedding 20,000 x 128, LSTM 128, last state; 64 sentences of 10-50 words
    "text_lstm": Case(
        _seq_model("word(vocab=20000)", ["param E: embedding(20000, 128)", _lstm_rec("h", "E[t.word]", 128)],
                   "h(s.last)", 5),
        ragged(64, (10, 50), 128, 5, vocab=20_000), sequence_inputs, torch_lstm_last(128, 128, 5, vocab=20_000), 30),
    # two stacked LSTM layers of 128 (one recurrence carrying both): 64 sequences of 10-50, 64 features
    "lstm2_stacked": Case(_seq_model("f32[64]", [_stacked_lstm_rec(128)], "h(s.last)", 10),
                          ragged(64, (10, 50), 64, 10), sequence_inputs, torch_lstm_last(64, 128, 10, layers=2), 10),
    # a long sequence: 8 sequences of 500 positions, 32 features, LSTM 128, last state
    "lstm_long": Case(_seq_model("f32[32]", [_lstm_rec("h", "t.x", 128)], "h(s.last)", 10),
                      ragged(8, (500, 500), 32, 10), sequence_inputs, torch_lstm_last(32, 128, 10), 10),
    # one sequence of 1,000 positions: every step a [1, 160] x [160, 512] product
    "lstm_batch1_1000": Case(_seq_model("f32[32]", [_lstm_rec("h", "t.x", 128)], "h(s.last)", 10),
                             ragged(1, (1000, 1000), 32, 10), sequence_inputs, torch_lstm_last(32, 128, 10), 10),
}


# -- the workers -------------------------------------------------------------------------

def structc_step(case: str, threads: int):
    import structc
    structc.set_num_threads(threads)
    c = CASES[case]
    net = structc.compile(c.source)
    inputs = c.inputs(c.data())
    return lambda: float(net.train_step(**inputs, lr=c.lr))


def torch_step(case: str, threads: int):
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    params, loss = CASES[case].torch(CASES[case].data())
    opt = torch.optim.SGD(list(params), lr=CASES[case].lr)

    def step():
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
        return float(value.detach())
    return step


STEPS = {"structc": structc_step, "torch": torch_step}


def worker(framework: str, case: str, threads: int) -> None:
    import json
    print(json.dumps({"step": timed(STEPS[framework](case, threads), CASES[case].steps)}))


def check(cases, threads: int) -> None:
    """Each model trains in both frameworks: its loss at steps 1 and 20."""
    for case in cases:
        losses = {}
        for name, make in STEPS.items():
            step = make(case, threads)
            seen = [step() for _ in range(20)]
            losses[name] = f"{seen[0]:.4f} -> {seen[-1]:.4f}" + ("" if seen[-1] < seen[0] else "  (did not fall)")
        print(f"{case}: " + "   ".join(f"{k} {v}" for k, v in losses.items()), flush=True)


def profile(cases, threads: int) -> None:
    """structc's kernels of one step of each case (net.profile's table)."""
    import structc
    structc.set_num_threads(threads)
    for case in cases:
        c = CASES[case]
        net = structc.compile(c.source)
        print(f"\n{case} ({threads} thread(s), load {os.getloadavg()[0]:.2f})")
        print(net.profile(steps=c.steps, lr=c.lr, **c.inputs(c.data())).table(), flush=True)


def options(ap):
    ap.add_argument("--check", action="store_true", help="the loss over 20 steps in both frameworks, not timed")
    ap.add_argument("--profile", action="store_true", help="structc's per-kernel profile of each case")

    def handle(args, cases) -> bool:
        with one_core(args.threads):
            if args.check:
                check(cases, args.threads)
            elif args.profile:
                profile(cases, args.threads)
        return args.check or args.profile
    return handle


if __name__ == "__main__":
    drive(__file__, CASES, worker, __doc__, options)
