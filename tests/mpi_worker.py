"""Run under `mpiexec -n 2` by tests/test_distributed.py: data-parallel gradients and
optimizer steps for each family, written to OUT/rank<r>.npz for the test to compare.

    python tests/mpi_worker.py OUT [crash | mismatch | settings | data | sum | heldout | empty_term]

Rank 0 also writes the single-process gradient of the concatenated batch (a Net of
its own, the same initial parameters) and the single-process parameters after the
same three steps, under `ref:` keys. `sum` (any number of ranks): the shared-memory
sum of random arrays, each rank's result and inputs. `heldout`: `distributed.evaluate`'s
held-out loss of each family, and rank 0's one call on the whole held-out part.
"""
import sys
import warnings

import numpy as np

warnings.simplefilter("ignore")

import structc  # noqa: E402
from structc import rowsum  # noqa: E402
from structc.distributed import DataParallel, halo_subgraph, rank0_first  # noqa: E402
from structc.forest import Forest  # noqa: E402
from structc.ops.optim import DROPOUT_KEY0  # noqa: E402
from structc.graphs import Graph, batch  # noqa: E402
from structc.seqdata import Sequences  # noqa: E402

TREES = """
model Trees {
  input  t: forest of word(vocab=5)
  target y: class[t.trees] of 2
  param  E: embedding(5, 8) = normal(0.5)
  rec h(n) = leaf: E[n.word]
             node: tanh(dense(concat(h(n.left), h(n.right)), 8))
  loss cross_entropy(dense(h(t.root), 2), y)
}
"""

GRAPHS = """
model Graphs {
  input  g: graph(features=3)
  target y: class[g.graphs] of 3
  h = g.x
  repeat 2 { h = relu(dense(h, 16) + mean(dense(h, 16) over g.edges)) }
  loss cross_entropy(dense(concat(mean(h over g.nodes), max(h over g.nodes), axis=1), 3), y)
}
"""

NODES = """
model Nodes {
  input  g: graph(features=3)
  input  m: f32[g.nodes]
  target y: class[g.nodes] of 2
  h = relu(sum(dense(g.x, 8) over g.edges, self_loops=true, norm=gcn))
  loss masked_cross_entropy(dense(h, 2), y, m)
}
"""

HALO = """
model Halo {
  input  g: graph(features=3)
  input  m: f32[g.nodes]
  target y: class[g.nodes] of 2
  h = g.x
  repeat 2 { h = relu(sum(dense(h, 8) over g.edges, self_loops=true, norm=gcn)) }
  h = relu(dense(h, 8) + mean(dense(h, 8) over g.edges))
  loss masked_cross_entropy(dense(h, 2), y, m)
}
"""

MIXED = """
model Mixed {
  input  t: forest(arity=2) of word(vocab=5)
  target y: class[t.trees] of 3
  target s: class[t.nodes] of 3
  param  E: embedding(5, 8) = normal(0.5)
  rec h(n) = leaf: E[n.word]
             node: tanh(dense(concat(h(n.children)), 8))
  loss cross_entropy(dense(h(t.root), 3, name="root"), y)
  loss cross_entropy(dense(h(t.nodes), 3, name="node"), s) + 0.01 * sum(E * E)
}
"""

SEQUENCES = """
model Seqs {
  input  s: sequence of f32[3]
  target y: class[s.sequences] of 2
  rec (h, c)(t) = init: (zeros(8), zeros(8))
                  next: lstm_cell(t.x, h(t.prev), c(t.prev), 8)
  loss cross_entropy(dense(h(s.last), 2), y)
}
"""

SUMS = """
model Sums {
  input  x: f32[N, 4]
  target t: f32[N, 3]
  param  w: f32[4, 3] = normal(0.5)
  loss %s
}
"""
#: a mean plus a plain sum plus a penalty: a weight per term, the sum's 1 on every rank
MEAN_SUM = SUMS % "mse(x @ w, t) + 0.1 * sum((x @ w - t) * (x @ w - t)) + 0.01 * sum(w * w)"
#: a plain sum plus a penalty: two terms (the penalty counts once, not once per rank)
SUM_PENALTY = SUMS % "sum((x @ w - t) * (x @ w - t)) + 0.01 * sum(w * w)"

MLP = open(__file__.replace("tests/mpi_worker.py", "examples/digits_mlp.snet")).read()

#: batch norm frozen: bn1's running statistics by name at compile (its scale and shift train), bn2 whole
FROZEN_BN = """
model FrozenNorm {
  input  x: f32[N, 6]
  target y: class[N] of 3
  h = relu(batch_norm(dense(x, 8)))
  loss cross_entropy(dense(batch_norm(dense(h, 8), frozen=true), 3), y)
}
"""
# a table of 300 rows, each rank's ids others than the other's and than its last step's:
# the summed gradient holds rows a rank's own step never wrote (`ops/embedding.py`, `record`)
WORDS = """
model Words {
  input  a: i32[N]
  target y: class[N] of 3
  param  E: embedding(300, 6) = normal(0.5)
  loss cross_entropy(dense(tanh(E[a]), 3), y)
}
"""
ROWSUM_DEFAULT = rowsum.SPARSE_SUM_BYTES
#: what each case's compile freezes
FREEZE = {"frozen_bn": ["bn1.mean", "bn1.var"]}


def tree(rng, leaves):
    if leaves == 1:
        return int(rng.integers(5))
    k = int(rng.integers(1, leaves))
    return (tree(rng, k), tree(rng, leaves - k))


def random_graph(rng, n):
    m = 3 * n
    return Graph(np.stack([rng.integers(0, n, m), rng.integers(0, n, m)]), num_nodes=n, x=rng.normal(size=(n, 3)))


DROPOUT = """
model Dropped {
  input  x: f32[N, 8]
  target y: class[N] of 2
  loss cross_entropy(dense(dropout(relu(dense(x, 16)), 0.5), 2), y)
}
"""


def cases():
    """name -> (source, [rank 0's feeds per step], [rank 1's feeds per step], concatenated feeds)."""
    rng = np.random.default_rng(0)
    out = {}

    x = rng.random((200, 64)).astype(np.float32)
    y = rng.integers(0, 10, 200).astype(np.int32)
    steps = [(slice(s, s + 13), slice(s + 13, s + 60)) for s in (0, 60, 120)]      # 13 against 47
    out["mlp"] = (MLP, [{"x": x[a], "y": y[a]} for a, _ in steps], [{"x": x[b], "y": y[b]} for _, b in steps],
                  [{"x": np.concatenate([x[a], x[b]]), "y": np.concatenate([y[a], y[b]])} for a, b in steps])
    x4, t = x[:, :4], rng.normal(size=(200, 3)).astype(np.float32)
    for name, source in (("mean_sum", MEAN_SUM), ("sum_penalty", SUM_PENALTY)):
        out[name] = (source, [{"x": x4[a], "t": t[a]} for a, _ in steps], [{"x": x4[b], "t": t[b]} for _, b in steps],
                     [{"x": np.concatenate([x4[a], x4[b]]), "t": np.concatenate([t[a], t[b]])} for a, b in steps])
    x6 = x[:, :6]
    out["frozen_bn"] = (FROZEN_BN, [{"x": x6[a], "y": y[a] % 3} for a, _ in steps],
                        [{"x": x6[b], "y": y[b] % 3} for _, b in steps],
                        [{"x": np.concatenate([x6[a], x6[b]]), "y": np.concatenate([y[a], y[b]]) % 3}
                         for a, b in steps])
    out["empty"] = (MLP, [{"x": x[s:s + 40], "y": y[s:s + 40]} for s in (0, 40, 80)], [{}, {}, {}],
                    [{"x": x[s:s + 40], "y": y[s:s + 40]} for s in (0, 40, 80)])

    ids = rng.permutation(300).astype(np.int32)
    words = [(ids[s:s + 9], ids[s + 9:s + 40]) for s in (0, 40, 80)]      # 9 against 31, new rows each step
    yw = [(rng.integers(0, 3, len(a)).astype(np.int32), rng.integers(0, 3, len(b)).astype(np.int32)) for a, b in words]
    out["words"] = (WORDS, [{"a": a, "y": ya} for (a, _), (ya, _) in zip(words, yw)],
                    [{"a": b, "y": yb} for (_, b), (_, yb) in zip(words, yw)],
                    [{"a": np.concatenate([a, b]), "y": np.concatenate([ya, yb])} for (a, b), (ya, yb) in zip(words, yw)])

    out["words_rows"] = out["words"]      # the same steps, the table summed by rows (`structc.rowsum`)

    def forest_step():   # 2 small trees against 5 large ones
        small = [tree(rng, int(rng.integers(1, 4))) for _ in range(2)]
        large = [tree(rng, int(rng.integers(12, 30))) for _ in range(5)]
        ys, yl = rng.integers(0, 2, 2).astype(np.int32), rng.integers(0, 2, 5).astype(np.int32)
        fs, fl = Forest.from_tuples(small), Forest.from_tuples(large)
        return ({"t": fs, "y": ys}, {"t": fl, "y": yl},
                {"t": Forest.concat([fs, fl]), "y": np.concatenate([ys, yl])})
    out["trees"] = (TREES, *map(list, zip(*[forest_step() for _ in range(3)])))
    # a table read in a recursion's leaf case, of 300 rows (the steps read the first 5): summed
    # whole, and by rows (`structc.rowsum`)
    out["trees_table"] = (TREES.replace("vocab=5", "vocab=300").replace("embedding(5,", "embedding(300,"),
                          *out["trees"][1:])
    out["trees_rows"] = out["trees_table"]

    def graph_step():    # 3 graphs of 4-9 nodes against 6 of 15-40
        parts = [[random_graph(rng, int(rng.integers(4, 10))) for _ in range(3)],
                 [random_graph(rng, int(rng.integers(15, 41))) for _ in range(6)]]
        labels = [rng.integers(0, 3, len(p)).astype(np.int32) for p in parts]
        feeds = [{"g": batch(p), "y": lab} for p, lab in zip(parts, labels)]
        return (*feeds, {"g": batch(parts[0] + parts[1]), "y": np.concatenate(labels)})
    out["graphs"] = (GRAPHS, *map(list, zip(*[graph_step() for _ in range(3)])))

    def bracketed(leaves):
        if leaves == 1:
            return f"({int(rng.integers(3))} w{int(rng.integers(5))})"
        k = int(rng.integers(1, leaves))
        return f"({int(rng.integers(3))} {bracketed(k)} {bracketed(leaves - k)})"

    def mixed_step():        # a mean over trees and one over nodes: 2 small trees against 5 large
        vocab = {f"w{k}": k for k in range(5)}
        small = Forest.from_brackets([bracketed(int(rng.integers(1, 4))) for _ in range(2)], vocab)
        large = Forest.from_brackets([bracketed(int(rng.integers(12, 30))) for _ in range(5)], vocab)
        feed = lambda f: {"t": f, "y": f.root_labels, "s": f.labels}        # noqa: E731
        return feed(small), feed(large), feed(Forest.concat([small, large]))
    out["mixed"] = (MIXED, *map(list, zip(*[mixed_step() for _ in range(3)])))

    def sequence_step():     # 2 sequences of 1-3 positions against 5 of 20-60
        parts = [[rng.normal(size=(int(rng.integers(lo, hi)), 3)).astype(np.float32) for _ in range(k)]
                 for k, lo, hi in ((2, 1, 4), (5, 20, 61))]
        labels = [rng.integers(0, 2, len(p)).astype(np.int32) for p in parts]
        feeds = [{"s": Sequences.from_list(p), "y": lab} for p, lab in zip(parts, labels)]
        return (*feeds, {"s": Sequences.from_list(parts[0] + parts[1]), "y": np.concatenate(labels)})
    out["sequences"] = (SEQUENCES, *map(list, zip(*[sequence_step() for _ in range(3)])))

    def node_step():     # labelled nodes: 3 on one rank, 20 on the other
        feeds = []
        for n, labelled in ((10, 3), (30, 20)):
            g = random_graph(rng, n)
            m = np.zeros(n, np.float32)
            m[rng.choice(n, labelled, replace=False)] = 1
            feeds.append({"g": g, "m": m, "y": rng.integers(0, 2, n).astype(np.int32)})
        both = {"g": batch([feeds[0]["g"], feeds[1]["g"]]), "m": np.concatenate([f["m"] for f in feeds]),
                "y": np.concatenate([f["y"] for f in feeds])}
        return (*feeds, both)
    out["nodes"] = (NODES, *map(list, zip(*[node_step() for _ in range(3)])))

    # one graph of 120 nodes (a ring and 3 chords), 3 layers: rank 0 owns 50 nodes, rank 1 70, each with its
    # 3-hop halo
    ring = np.arange(120)
    chords = rng.integers(0, 120, (2, 3))
    g = Graph(np.concatenate([np.stack([ring, (ring + 1) % 120]), np.stack([(ring + 1) % 120, ring]), chords],
                             axis=1), num_nodes=120, x=rng.normal(size=(120, 3)))
    labels = rng.integers(0, 2, 120).astype(np.int32)
    train = np.zeros(120, np.float32)
    train[rng.choice(120, 60, replace=False)] = 1
    parts = []
    for owned in (np.arange(50), np.arange(50, 120)):
        sub, nodes = halo_subgraph(g, owned, hops=3)
        assert sub.num_nodes < 100, sub        # not the whole graph
        mask = np.where(np.arange(len(nodes)) < len(owned), train[nodes], 0).astype(np.float32)
        parts.append({"g": sub, "m": mask, "y": labels[nodes]})
    out["halo"] = (HALO, [parts[0]] * 3, [parts[1]] * 3, [{"g": g, "m": train, "y": labels}] * 3)
    return out


OPTIMIZERS = [("sgd", {}), ("momentum", {"momentum": 0.9}), ("adam", {"weight_decay": 0.01})]


def main():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    out_dir = sys.argv[1]
    if len(sys.argv) > 2 and sys.argv[2] == "crash":
        net = rank0_first(comm, lambda: structc.compile(MLP))
        dp = DataParallel(net)
        if rank == 1:
            raise RuntimeError("deliberate failure on rank 1")
        dp.train_step(lr=0.1, x=np.zeros((4, 64), np.float32), y=np.zeros(4, np.int32))   # waits for rank 1
        return
    if len(sys.argv) > 2 and sys.argv[2] == "mismatch":
        # rank 1 builds a wider model: every rank refuses before rank 0's parameters are broadcast
        DataParallel(structc.compile(TREES if rank == 0 else TREES.replace("8)", "9)")))
        return
    if len(sys.argv) > 2 and sys.argv[2] == "data":
        return other_data(comm, out_dir)
    if len(sys.argv) > 2 and sys.argv[2] == "settings":
        return differing_settings(comm, out_dir)
    if len(sys.argv) > 2 and sys.argv[2] == "empty_term":
        return empty_term(comm, out_dir)
    if len(sys.argv) > 2 and sys.argv[2] == "sum":
        return shared_sums(comm, out_dir)
    if len(sys.argv) > 2 and sys.argv[2] == "heldout":
        return held_out(comm, out_dir)
    results = {}
    for name, (source, mine0, mine1, whole) in cases().items():
        # rank 0 compiles into the cache first; the other rank's initial parameters differ: the broadcast fixes them
        freeze = FREEZE.get(name, ())
        net = rank0_first(comm, lambda: structc.compile(source, seed=rank, freeze=freeze))
        mine = mine0 if rank == 0 else mine1
        for k, buffer in net.params.items():      # running statistics of their own (rank 0's are broadcast)
            if k in net.meta["buffers"]:
                buffer[...] = np.random.default_rng(rank).random(buffer.shape) + 0.5
        rowsum.SPARSE_SUM_BYTES = 0 if name.endswith("_rows") else ROWSUM_DEFAULT
        dp = DataParallel(net)
        results[f"{name}:rows"] = dp._rows is not None
        start = {k: v.copy() for k, v in net.params.items()}
        loss, grads = dp.grad(**mine[0])
        results[f"{name}:loss"] = loss
        results[f"{name}:shared_memory"] = dp._shared_sum is not None
        for k, g in grads.items():
            results[f"{name}:grad:{k}"] = g
        loss, grads = DataParallel(net, shared_memory=False).grad(**mine[0])      # summed by Allreduce
        results[f"{name}:allreduce:loss"] = loss
        for k, g in grads.items():
            results[f"{name}:allreduce:grad:{k}"] = g
        mixed = DataParallel(net, shared_memory=rank == 0)   # the ranks disagree: all take the Allreduce
        results[f"{name}:mixed"] = mixed._shared_sum is None
        results[f"{name}:mixed:loss"] = mixed.grad(**mine[0])[0]
        with DataParallel(net) as closing:                # closed: its sums take the Allreduce
            pass
        results[f"{name}:closed"] = closing._shared_sum is None
        loss, grads = closing.grad(**mine[0])
        results[f"{name}:closed:loss"] = loss
        ref = structc.compile(source, freeze=freeze) if rank == 0 else None
        if rank == 0:
            for k, v in start.items():
                ref.params[k] = v
            ref_loss, ref_grads = ref.grad(**whole[0])
            results[f"ref:{name}:loss"] = ref_loss
            for k, g in ref_grads.items():
                results[f"ref:{name}:grad:{k}"] = g
        for opt, options in OPTIMIZERS:
            for k, v in start.items():
                net.params[k] = v
            net.set_optimizer("sgd")       # resets the moments, then the optimizer under test
            net.set_optimizer(opt, **options)
            dp.broadcast_state()
            for feed in mine:
                dp.train_step(lr=0.05, **feed)
            results[f"{name}:{opt}:in_sync"] = dp.in_sync()
            for k, v in net.params.items():
                results[f"{name}:{opt}:param:{k}"] = v.copy()
            results[f"{name}:{opt}:state"] = net._state_arena.copy()
            if dp._rows is not None:    # the first step's record marks every row: the arena, then packed
                results[f"{name}:{opt}:packed_sums"] = dp._rows.packed
            # the same steps through train_steps (each next feed made while the sum is in flight)
            for k, v in start.items():
                net.params[k] = v
            net.set_optimizer("sgd")
            net.set_optimizer(opt, **options)
            dp.broadcast_state()
            made = []
            losses = list(dp.train_steps((made.append(k) or feed for k, feed in enumerate(mine)), lr=0.05))
            results[f"{name}:{opt}:steps:made"] = np.array(made + [len(losses)])
            for k, v in net.params.items():
                results[f"{name}:{opt}:steps:param:{k}"] = v.copy()
            results[f"{name}:{opt}:steps:state"] = net._state_arena.copy()
            if rank == 0:
                for k, v in start.items():
                    ref.params[k] = v
                ref.set_optimizer("sgd")
                ref.set_optimizer(opt, **options)
                for feed in whole:
                    ref.train_step(lr=0.05, **feed)
                for k, v in ref.params.items():
                    results[f"ref:{name}:{opt}:param:{k}"] = v.copy()
    # dropout: each rank's masks are its own (rank 0's key is the seed's), though both ranks use one seed
    net = rank0_first(comm, lambda: structc.compile(DROPOUT, seed=0))
    DataParallel(net)
    results["dropout:key"] = net._hyper_bits[DROPOUT_KEY0:DROPOUT_KEY0 + 2].copy()
    # a schedule set on rank 0 alone is broadcast with the rest of its optimizer
    net = rank0_first(comm, lambda: structc.compile(MLP))
    if rank == 0:
        net.set_schedule("cosine", warmup=1, decay_steps=4)
    dp = DataParallel(net)
    rng = np.random.default_rng(rank)
    for _ in range(3):
        dp.train_step(lr=0.1, x=rng.random((5, 64)).astype(np.float32), y=rng.integers(0, 10, 5).astype(np.int32))
    results["schedule:in_sync"] = dp.in_sync()
    results["schedule:last_lr"] = net.last_lr
    # ranks that disagree on summing a table by rows (a threshold set on rank 0 alone) all sum it whole
    source, mine0, mine1, whole = cases()["words"]
    net = rank0_first(comm, lambda: structc.compile(source, seed=0))
    rowsum.SPARSE_SUM_BYTES = 0 if rank == 0 else ROWSUM_DEFAULT
    dp = DataParallel(net)
    rowsum.SPARSE_SUM_BYTES = ROWSUM_DEFAULT
    results["rows_disagree:whole"] = dp._rows is None and not net._rows_kept.alive
    results["rows_disagree:loss"] = dp.grad(**(mine0 if rank == 0 else mine1)[0])[0]
    results["rows_disagree:want"] = results["words:loss"]
    np.savez(f"{out_dir}/rank{rank}.npz", **results)


EDGES = """
model Edges {
  input  g: graph(features=3)
  target y: class[g.graphs] of 2
  target e: class[g.edges] of 2
  h = tanh(dense(g.x, 4))
  loss cross_entropy(dense(mean(h over g.nodes), 2), y)
  loss cross_entropy(dense(concat(h[g.src], h[g.dst], axis=1), 2), e)
}
"""


def empty_term(comm, out_dir):
    """A loss over graphs and over edges, rank 1's share without edges: every rank's
    error (or none) for that step, then a step whose shares all have edges."""
    rank = comm.Get_rank()
    net = rank0_first(comm, lambda: structc.compile(EDGES))
    dp = DataParallel(net, abort_on_error=False)
    rng = np.random.default_rng(rank)
    results = {}
    for case, edges in (("empty", rank != 1), ("full", True)):
        m = 4 if edges else 0
        g = Graph(rng.integers(0, 3, (2, m)), num_nodes=3, x=rng.normal(size=(3, 3)))
        try:
            dp.train_step(0.1, g=g, y=np.zeros(1, np.int32), e=np.zeros(m, np.int32))
            results[case] = ""
        except ValueError as e:
            results[case] = str(e)
    results["in_sync"] = dp.in_sync()
    np.savez(f"{out_dir}/empty_term{rank}.npz", **results)


def differing_settings(comm, out_dir):
    """Steps where one rank's update settings differ from the other's: each rank's
    error message (or none), and its parameters after each case, under `case:`."""
    rank = comm.Get_rank()
    net = rank0_first(comm, lambda: structc.compile(MLP))
    dp = DataParallel(net, abort_on_error=False)
    rng = np.random.default_rng(rank)
    feed = {"x": rng.random((5, 64)).astype(np.float32), "y": rng.integers(0, 10, 5).astype(np.int32)}
    results = {}

    def attempt(case, step):
        before = {k: v.copy() for k, v in net.params.items()}
        try:
            step()
            results[f"{case}:error"] = ""
        except ValueError as e:
            results[f"{case}:error"] = str(e)
        results[f"{case}:unchanged"] = all(np.array_equal(before[k], v) for k, v in net.params.items())
    attempt("same", lambda: dp.train_step(lr=0.1, **feed))
    attempt("lr", lambda: dp.train_step(lr=0.1 if rank == 0 else 0.2, **feed))
    attempt("steps", lambda: list(dp.train_steps([feed, feed], lr=0.1 if rank == 0 else 0.3)))
    if rank == 0:
        net.set_optimizer("adam")               # on one rank alone, after the broadcast
    attempt("optimizer", lambda: dp.train_step(lr=0.1, **feed))
    dp.broadcast_state()                        # rank 0's again on every rank
    attempt("again", lambda: dp.train_step(lr=0.1, **feed))
    results["in_sync"] = dp.in_sync()
    # A table summed by rows, whose steps write most of its rows (the arena is summed whole),
    # through a mismatch that raises after the sum: the steps after it are those of a run
    # that sums the table whole (no rank's record may miss a row the sum wrote).
    rng = np.random.default_rng(rank)
    feeds = [{"a": rng.choice(np.arange(160) + 140 * rank, 100, replace=False).astype(np.int32),
              "y": rng.integers(0, 3, 100).astype(np.int32)} for _ in range(4)]
    params = {}
    for way, threshold in (("rows", 0), ("whole", 1 << 40)):
        net = rank0_first(comm, lambda: structc.compile(WORDS, seed=0))
        rowsum.SPARSE_SUM_BYTES = threshold
        dp = DataParallel(net, abort_on_error=False)
        rowsum.SPARSE_SUM_BYTES = ROWSUM_DEFAULT
        net.set_optimizer("momentum")           # reads every row of the gradient
        dp.train_step(lr=0.1, **feeds[0])
        try:
            dp.train_step(lr=0.1 if rank == 0 else 0.2, **feeds[1])
        except ValueError:
            pass
        for feed in feeds[2:]:
            dp.train_step(lr=0.1, **feed)
        params[way] = {k: v.copy() for k, v in net.params.items()}
    results["rows_after_mismatch:same"] = all(np.array_equal(params["rows"][k], params["whole"][k])
                                              for k in params["rows"])
    np.savez(f"{out_dir}/settings{rank}.npz", **results)


def other_data(comm, out_dir):
    """distributed.train, then DataParallel.check_same_data, where rank 1's copy of
    the digits has one label changed: each rank's error messages (`train`, `api`)."""
    from structc import datasets
    from structc.distributed import train
    from structc.train import TrainConfig
    rank = comm.Get_rank()
    net = rank0_first(comm, lambda: structc.compile(MLP))
    data = datasets.load("digits").bind(net)
    if rank == 1:
        data.y_train = data.y_train.copy()
        data.y_train[100] = (data.y_train[100] + 1) % 10
    dp = DataParallel(net, abort_on_error=False)
    errors = {}
    for case, run in (("train", lambda: train(dp, data, TrainConfig(epochs=1, batch=64, progress=False),
                                               log=lambda *a: None)),
                      ("api", lambda: dp.check_same_data(data))):
        try:
            run()
            errors[case] = ""
        except ValueError as e:
            errors[case] = str(e)
    np.savez(f"{out_dir}/data{rank}.npz", **errors)


def shared_sums(comm, out_dir):
    """Five sums of 1,000 random floats per rank (of very different sizes, so that
    the order of the additions shows in the bits), each rank's inputs and results."""
    from mpi4py import MPI

    from structc.shmsum import MAX_READ, shared_sum
    rank = comm.Get_rank()
    rng = np.random.default_rng(rank)
    total = shared_sum(MPI, comm, 1000)
    results = {}
    for step in range(5):
        mine = (rng.normal(size=1000) * 10.0 ** rng.integers(-8, 8, 1000)).astype(np.float32)
        arena = mine.copy()
        total(arena)
        results[f"in{step}"], results[f"out{step}"] = mine, arena
    total.free()
    results["too_large"] = shared_sum(MPI, comm, MAX_READ // 4 // comm.Get_size() + 1) is None
    np.savez(f"{out_dir}/rank{rank}.npz", **results)


def held_out(comm, out_dir):
    """Each family's held-out metrics from the ranks' shares (`distributed.evaluate`),
    and on rank 0 the loss of one call on the whole held-out part."""
    from pathlib import Path

    from structc import datasets, distributed, readers, streams
    from structc.forest import Forest, Vocab
    from structc.graphs import batch as joined
    from structc.treedata import TreeDataset
    from test_heldout_metrics import (DATA, GRAPHS_AND_NODES, MIXED_TREES, NODE_LOSS, ROOTS_AND_NODES, WORDS,
                                      shaken)
    rank = comm.Get_rank()
    bank = Path(out_dir) / "bank.txt"
    if rank == 0:
        bank.write_text("\n".join(MIXED_TREES * 8) + "\n")
    comm.Barrier()
    trees = MIXED_TREES * 3

    def tree_data(net):
        return TreeDataset("mixed", trees, trees, Vocab.build(WORDS)).bind(net)

    def whole_trees(net, data):
        return net.evaluate_batch(**data.feed(Forest.concat(data.test)))[1]

    def whole_graphs(net, data):
        return net.evaluate_batch(g=joined([data.graphs[k] for k in data.test]), y=data.labels[data.test])[1]

    def whole_streamed(net, data):
        eager = readers.read(bank, split=0.5).bind(net)
        return net.evaluate_batch(**eager.feed(Forest.concat(eager.test)))[1]
    families = {
        "roots_and_nodes": (ROOTS_AND_NODES, tree_data, whole_trees),
        "nodes": (NODE_LOSS, tree_data, whole_trees),
        "graphs_and_nodes": (GRAPHS_AND_NODES, lambda net: readers.read(DATA / "tu_tiny").bind(net), whole_graphs),
        "digits_mlp": (MLP, lambda net: datasets.load("digits").bind(net),
                       lambda net, data: net.evaluate_batch(x=data.x_test, y=data.y_test)[1]),
        "streamed": (ROOTS_AND_NODES, lambda net: streams.stream_treebank(bank, split=0.5, chunk=4).bind(net),
                     whole_streamed),
    }
    results = {}
    for name, (source, load, whole) in families.items():
        net = shaken(rank0_first(comm, lambda: structc.compile(source)))
        data = load(net)
        dp = DataParallel(net)
        for key, value in distributed.evaluate(dp, data).items():
            results[f"{name}:{key}"] = value
        if rank == 0:
            results[f"ref:{name}:loss"] = whole(net, data)
        dp.close()
    np.savez(f"{out_dir}/heldout{rank}.npz", **results)


if __name__ == "__main__":
    main()
