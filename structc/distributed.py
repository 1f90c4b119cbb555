"""Data-parallel training on MPI: the same model on every rank, a shard of each batch per rank.

    from structc.distributed import DataParallel
    dp = DataParallel(net)                       # parameters broadcast from rank 0
    for batch in batches:                        # the same global batches on every rank
        mine = dp.shard_dense(batch)             # or shard_forests / shard_graphs
        loss = dp.train_step(lr=0.1, **mine)     # the whole batch's loss, on every rank

Run with `mpiexec -n 2 python -m mpi4py script.py` (or `srun`). One step is:

1. `net.grad_into_arena(**shard)`: the shard's loss and gradient, g_r, left in
   the gradient arena, and D_r, what the loss's mean divided by (examples,
   roots, graphs, the mask's sum: `structc.denominator`, recorded by the
   compiler in the artifact).
2. The arena becomes [D_r g_r, D_r, D_r loss_r] (the last two floats sit past
   the gradients) and is summed over the ranks in place: through shared memory
   when every rank is on this machine (`structc.shmsum`), else by one
   `Allreduce` (`train_steps` makes the next feed before the sum). A large
   embedding's gradient goes in by the rows some rank's step wrote
   (`structc.rowsum`).
3. Divided by D = Σ D_r it is the gradient of the whole batch, exactly (up to
   float32 rounding): Σ_r D_r g_r / D = (1/D) Σ_i ∇l_i, however uneven the
   shards. A rank with no examples sends zeros and takes part all the same.
4. `net.apply_update(lr)`: every rank runs the same optimizer step (SGD,
   momentum, Adam, weight decay) on the same arena, so parameters and
   optimizer state stay bitwise equal.

mpi4py is optional (`pip install 'structc[mpi]'`); nothing here imports it
until a `DataParallel` is made.
"""
from __future__ import annotations

import copy
import hashlib
import heapq
import struct
import sys
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np

from ._runtime import lpt_owners, unweigh_arena, weigh_arena
from .heldout import Tally, refuse_empty
from .model import _hyper_value
from .ops.optim import DROPOUT_KEY0, MODES
from . import rowsum
from .rowsum import RowSum, row_tables
from .shmsum import shared_sum

INSTALL = "pip install 'structc[mpi]'"
#: float32 counts are exact up to here
MAX_COUNT = 2 ** 24
#: `settings_hash`'s values are 1..SETTINGS_HASHES; the sums of their squares over
#: up to MAX_CHECKED_RANKS ranks stay exact in float32 (the check is skipped beyond)
SETTINGS_HASHES = 31
_F32 = struct.Struct("=f")
_F32_MAX = float(np.finfo(np.float32).max)
MAX_CHECKED_RANKS = MAX_COUNT // SETTINGS_HASHES ** 2
_DONE = object()           # the end of a sequence of feeds (an empty feed {} is a step)


def mpi():
    """mpi4py's MPI module, or an ImportError that says what to install."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ImportError(f"distributed training needs mpi4py ({e}): {INSTALL} (on a cluster, install mpi4py "
                          "against the site's MPI), then run with `mpiexec -n 2 python -m mpi4py ...`") from None
    return MPI


# -- sharding ----------------------------------------------------------------------

def split_dense(n: int, rank: int, size: int, seed: int | None = None) -> np.ndarray:
    """This rank's indices of n examples: a permutation drawn from `seed` (the same on
    every rank; None: in order), cut into `size` contiguous parts of near-equal length."""
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    return np.array_split(order, size)[rank]


def balance(costs: Sequence[float], size: int) -> list[list[int]]:
    """Items to ranks by cost: the largest first, each to the least-loaded rank (ties
    to the lowest rank), so every rank computes the same assignment. Each rank's
    items are returned in their original order."""
    costs = np.asarray(costs, np.float64).reshape(-1)
    order = np.argsort(-costs, kind="stable")              # the largest first; equal costs by position
    owner = np.empty(len(costs), np.int64)
    loads = [(0.0, r) for r in range(size)]                # a heap: the least-loaded rank on top
    for k, cost in zip(order.tolist(), costs[order].tolist()):
        load, r = loads[0]
        owner[k] = r
        heapq.heapreplace(loads, (load + cost, r))
    return [np.flatnonzero(owner == r).tolist() for r in range(size)]


def balance_batches(costs: Sequence[float], batch: int, size: int) -> np.ndarray:
    """The rank of every item when each run of `batch` consecutive items (the last
    may be shorter) is split by `balance`: the same assignment, computed for all
    the batches of an epoch at once (sorted by numpy, assigned in C)."""
    costs = np.asarray(costs, np.float64).reshape(-1)
    batch = max(1, min(batch, len(costs)))                  # a batch past the data is all of it
    rows = -(-len(costs) // batch)
    padded = np.full(rows * batch, -np.inf)                 # padding sorts last and is never assigned
    padded[:len(costs)] = costs
    padded = padded.reshape(rows, batch)
    order = np.argsort(-padded, axis=1, kind="stable")      # per batch: the largest first, ties by position
    ranked = np.take_along_axis(padded, order, axis=1)
    owner = np.empty((rows, batch), np.int64)
    lpt_owners(ranked, size, owner)                         # position by position, in C: it runs every epoch
    np.put_along_axis(owner, order, owner.copy(), axis=1)   # back to the items' positions
    return owner.reshape(-1)[:len(costs)]


def forest_cost(forest) -> int:
    """Work of a forest: its node count (each node is one body evaluation)."""
    return forest.nodes


def graph_cost(graph) -> int:
    """Work of a graph: nodes + edges (dense layers per node, messages per edge)."""
    return graph.num_nodes + graph.num_edges


def halo_subgraph(graph, owned, hops: int):
    """The piece of one big `graph` that a rank needs to compute, exactly, `hops` layers
    of message passing at its `owned` nodes: every edge into a node within `hops`
    in-hops of them (so those nodes' in-degrees, which normalised aggregations read,
    are the whole graph's), and the nodes those edges touch. Returns the subgraph and
    the global id of each of its nodes, the owned ones first (in the order given).

    A loss on the owned nodes only (a mask that is zero on the halo) then has the
    whole graph's value and gradient on those nodes; see docs/DISTRIBUTED.md."""
    from .graphs import Graph
    if graph.num_graphs != 1:
        raise ValueError(f"halo_subgraph takes one graph, got a batch of {graph.num_graphs}")
    if graph.node_order is not None:
        raise ValueError("halo_subgraph takes a graph in node order: cut the graph as it is, then reorder "
                         "each rank's subgraph (sub.reordered()) if it is worth it")
    if not isinstance(hops, int) or hops < 0:
        raise ValueError(f"hops must be a non-negative integer (the message-passing layers), got {hops!r}")
    owned = np.asarray(owned, np.int64).reshape(-1)
    if not owned.size:
        raise ValueError("owned is empty: a rank that owns no nodes has no examples (call train_step with none)")
    if owned.size and (owned.min() < 0 or owned.max() >= graph.num_nodes or len(np.unique(owned)) != len(owned)):
        raise ValueError(f"owned must be distinct node ids in [0, {graph.num_nodes})")
    src, dst = graph.edge_index                    # in the graph's stored (CSR) edge order
    near = np.zeros(graph.num_nodes, bool)
    near[owned] = True
    for _ in range(hops):                          # nodes within `hops` in-hops
        near[src[near[dst]]] = True
    keep = near[dst]
    touched = np.zeros(graph.num_nodes, bool)
    touched[src[keep]] = touched[dst[keep]] = True
    touched[owned] = False
    nodes = np.concatenate([owned, np.flatnonzero(touched)])
    local = np.full(graph.num_nodes, -1, np.int64)
    local[nodes] = np.arange(len(nodes))
    types = graph.arrays.get("type")
    sub = Graph(np.stack([local[src[keep]], local[dst[keep]]]), num_nodes=len(nodes),
                x=None if graph.x is None else graph.x[nodes],
                edge_x=None if graph.edge_x is None else graph.edge_x[keep],
                edge_type=None if types is None else types[keep])
    return sub, nodes


# -- training ----------------------------------------------------------------------

class DataParallel:
    """`net` trained across the ranks of `comm` (default: MPI.COMM_WORLD).

    Every rank makes one (collectively: each call below is collective, so every
    rank must make it, in the same order). Rank 0's parameters and optimizer
    state are broadcast at start. `shared_memory=False`: sum the gradients with
    `Allreduce` even when every rank is on this machine."""

    def __init__(self, net, comm=None, *, abort_on_error: bool = True, shared_memory: bool = True):
        MPI = mpi()
        self._MPI = MPI
        self.net = net
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        found = net.meta.get("loss_denominator")
        if found is None:
            raise TypeError(f"model {net.name} declares no loss, so it cannot be trained")
        normalised = batch_normalised(net.meta)
        if normalised:
            # Each rank would normalise with its own shard's statistics (the gradient
            # is then not the big batch's) and keep running statistics of its own.
            # A frozen layer normalises with its running statistics: constants, exact.
            raise ValueError(f"model {net.name} cannot be trained data-parallel with exact gradients: batch_norm "
                             "normalises with each rank's own batch statistics (buffers "
                             f"{', '.join(normalised)}); freeze those layers (they then normalise with their "
                             "running statistics), use layer_norm, or train in one process")
        why = found["why"] if found["kind"] == "unsupported" else net.meta.get("batch_statistic")
        if why:
            raise ValueError(f"model {net.name} cannot be trained data-parallel with exact gradients: {why}")
        # a plain sum, or terms each weighed by the rank's share (`_term_weights`): the gradients just add up
        self._normalise = found["kind"] not in ("sum", "terms")
        self._terms = found["terms"] if found["kind"] == "terms" else None
        # the arena: gradients, then the count and the loss, then the settings' check (2 floats);
        # the buffer a sum adds up is it (views made once), or `RowSum.pack`'s, laid out alike
        arena = net._grad_arena
        self._whole = (arena, arena[:-2], arena[-2:])      # (buffer, what the count weighs, the check)
        self._summed = self._whole
        self._weights: tuple[float, float] | None = None     # this step's (count, loss); None: no examples
        self._settings, self._lr = 0.0, None  # this step's `settings_hash` (0: no update follows) and lr
        if abort_on_error:
            install_abort_hook(self.comm)
        self._check_same_model()
        self.broadcast_state()
        # ranks on one machine sum through shared memory (`structc.shmsum`); else `Allreduce`.
        # Every rank must take the same way (one rank's Barrier against another's Allreduce
        # would pair collectives that do not match), so the ranks agree on the flag first.
        shared_memory = bool(self.comm.allreduce(int(bool(shared_memory)), op=MPI.MIN))
        self._shared_sum = shared_sum(MPI, self.comm, len(net._grad_arena)) if shared_memory else None
        # The sums write the arena: a record of an embedding's rows holds only if every rank's
        # becomes the union of all ranks' records (`structc.rowsum`), worth an `Allreduce` more a
        # step for a large table only; else the tables are zeroed and updated whole. The ranks
        # agree on the way, as above (a library compiled before the tables were listed has none).
        net._load_deferred("update")        # its metadata lists the tables with a record of rows
        tables = row_tables(net)
        by_rows = any(t["rows"] * t["width"] * 4 >= rowsum.SPARSE_SUM_BYTES for t in tables)
        self._rows = RowSum(net, self.comm, MPI, tables) if self.comm.allreduce(int(by_rows), op=MPI.MIN) else None
        if self._rows is None:
            net._expose_grads()

    def _check_same_model(self) -> None:
        """Refuse, on every rank alike, ranks whose models differ in their parameters'
        layout: rank 0's parameters broadcast into another layout, or gradients summed
        at other offsets, would train a model nobody asked for without an error."""
        net = self.net
        layout = (net.name, net.meta["param_size"], net.meta["loss_denominator"]["kind"],
                  tuple((p["name"], tuple(p["shape"]), p["offset"]) for p in net.meta["params"]))
        digest = hashlib.sha256(repr(layout).encode()).hexdigest()[:16]
        odd, seen = unlike_rank_0(self.comm, digest, (net.name, net.meta["param_size"]))
        if odd:
            name, size = seen[odd[0]]
            raise ValueError(f"{_ranks(odd)} built another model than rank 0 (rank {odd[0]}: {name} with a "
                             f"{size}-float parameter arena; rank 0: {seen[0][0]} with {seen[0][1]}, or the same "
                             "size laid out otherwise): every rank must compile the same .snet source")

    @property
    def is_root(self) -> bool:
        """Rank 0: the one that prints and writes files."""
        return self.rank == 0

    def broadcast_state(self) -> None:
        """Rank 0's parameters, optimizer choice, options, moments, step count and lr
        schedule, on every rank (a schedule set on one rank alone would scale its
        updates alone: the ranks' parameters would drift apart without an error)."""
        net = self.net
        with net._lock:
            self.comm.Bcast(net._param_arena, root=0)
            self.comm.Bcast(net._state_arena, root=0)
            optimizer, options, step, schedule = self.comm.bcast(
                (net.optimizer, dict(net._opt), net._step, net.schedule), root=0)
            net.optimizer, net._step, net.schedule = optimizer, step, schedule
            net._opt.update(options)
            if net.meta.get("random"):
                # Every rank's rows are other examples at the same positions: with one key
                # they would share their dropout masks. Rank 0 keeps its key (one rank is
                # one process); the others derive theirs from it and their rank.
                key = self.comm.bcast(net._hyper_bits[DROPOUT_KEY0:DROPOUT_KEY0 + 2].copy(), root=0)
                if self.rank:
                    key = np.random.SeedSequence([*map(int, key), self.rank]).generate_state(2, np.uint32)
                net._hyper_bits[DROPOUT_KEY0:DROPOUT_KEY0 + 2] = key

    def grad(self, **inputs) -> tuple[float, dict[str, np.ndarray]]:
        """The whole batch's loss and gradient (copies), from this rank's shard `inputs`
        (none: this rank has no examples); no update."""
        self._settings, self._lr = 0.0, None  # no update follows
        loss = self._reduce_gradient(inputs)
        return loss, {name: g.copy() for name, g in self.net._grad_views.items()}

    def train_step(self, lr: float = 0.01, **inputs) -> float:
        """One optimizer step on the whole batch (the union of every rank's shard);
        returns its loss. A rank with no examples calls it with none."""
        self._settings, self._lr = settings_hash(self.net, lr), lr
        loss = self._reduce_gradient(inputs)
        self.net.apply_update(lr)
        return loss

    def train_steps(self, feeds: Iterable[Mapping], lr: float = 0.01) -> Iterator[float]:
        """`train_step` on each of `feeds` in turn (this rank's shares, made lazily, e.g.
        by a generator), yielding each step's loss. Each step's next feed is made
        between its gradient and its `Allreduce`, so a rank that finished its share
        first spends the other's lead assembling the next one instead of polling.
        Making a feed must not call this net (it holds the net's lock then: its
        arena holds the unsummed gradient)."""
        feeds = iter(feeds)
        inputs = next(feeds, _DONE)
        while inputs is not _DONE:
            with self.net._lock:
                self._settings, self._lr = settings_hash(self.net, lr), lr
                self._weigh(inputs)
                try:
                    upcoming = next(feeds, _DONE)
                finally:
                    self._sum()             # also on an error: the other ranks wait in it
                loss = self._finish_reduce()
            self.net.apply_update(lr)
            yield loss
            inputs = upcoming

    def _reduce_gradient(self, inputs: Mapping) -> float:
        """Leave the whole batch's gradient in the arena; return its loss."""
        with self.net._lock:
            self._weigh(inputs)
            self._sum()
            return self._finish_reduce()

    def _weigh(self, inputs: Mapping) -> None:
        """The shard's gradient in the arena, and its loss denominator and loss, which
        `_sum` weighs it by (no examples: a zero arena, no weights)."""
        net = self.net
        self._weights = None
        if self._terms is not None:
            self._weigh_terms(inputs)
        elif inputs:
            loss, count = net.grad_into_arena(**inputs)
            if not 0 <= count < MAX_COUNT:
                raise ValueError(f"rank {self.rank}: a shard's loss denominator must be in [0, {MAX_COUNT}) "
                                 f"(float32 counts are exact up to there), got {count}")
            self._weights = (count, loss)
        else:
            net._grad_arena[:] = 0.0

    def _weigh_terms(self, inputs: Mapping) -> None:
        """A loss of terms with different denominators: every rank's denominators of
        every term (one `allgather`), then the shard's gradient with term j weighed by
        D_jr / D_j (`denominator.weigh_loss_terms`), so that the ranks' gradients and
        losses simply add up; the count is 1 (0 for no examples)."""
        from .denominator import evaluate as denominator_of
        from .ops.optim import LOSS_WEIGHT0
        net = self.net
        mine = [0.0] * len(self._terms)
        if inputs:
            dims = net.feed_dims(**inputs)
            mine = [denominator_of(t, dims, inputs) for t in self._terms]
        seen = self.comm.allgather((bool(inputs), mine))
        table = np.array([counts for _, counts in seen], np.float64)       # [ranks, terms]
        # every rank checks every rank's share, so all raise alike (one rank raising
        # alone would leave the others waiting in the sum)
        for r, (given, counts) in enumerate(seen):
            for j, t in enumerate(self._terms):
                if given and t["kind"] == "mean" and counts[j] == 0:
                    raise ValueError(f"rank {r}: its shard has examples but none for loss term {j + 1} (a mean "
                                     f"over {', '.join(t['dims'])}), whose mean would be 0/0; no rank took the step")
        weights = _term_weights(table, self._terms, self.rank)
        if not inputs:
            net._grad_arena[:] = 0.0
            return
        slots = net._hyper[LOSS_WEIGHT0:LOSS_WEIGHT0 + len(weights)]
        slots[:] = 1.0 - weights                   # the slot holds 1 - weight (zero: weight 1)
        try:
            loss, _ = net.grad_into_arena(**inputs)
        finally:
            slots[:] = 0.0                         # every other call weighs each term 1
        self._weights = (1.0, loss)

    def _sum(self) -> None:
        """The arena (or, with tables summed by rows, its packed buffer: `structc.rowsum`)
        as [D_r g_r, D_r, D_r loss_r, the settings' check], summed over the ranks in
        place: through shared memory when every rank is on this machine, else a blocking
        `Allreduce` (with MPICH between 2 local ranks it measured 1-8 us cheaper per call
        than `Iallreduce` + `Wait`, which made progress only inside `Wait` anyway)."""
        if self._rows is None:
            buffer, weighed, check = self._summed = self._whole
        else:
            buffer = self._rows.pack()
            buffer, weighed, check = self._summed = (buffer, buffer[:-2], buffer[-2:])
        if self._weights is not None:
            weigh_arena(weighed, *self._weights)        # the gradients times count; count, loss * count
        else:
            weighed[-2:] = 0.0                          # no examples: the gradients are zero already
        check[0] = self._settings                       # small whole numbers: their sums are exact
        check[1] = self._settings * self._settings
        if self._shared_sum is not None:
            self._shared_sum(buffer)
        else:
            self.comm.Allreduce(self._MPI.IN_PLACE, buffer, op=self._MPI.SUM)

    def _finish_reduce(self) -> float:
        """After the sum: the whole batch's gradient (divided by the denominators'
        sum) in the arena; returns its loss."""
        buffer, weighed, check = self._summed
        # sum(h)^2 == ranks * sum(h^2) only where every rank's h is the same (Cauchy-Schwarz):
        # every rank sees the same sums, so every rank takes the same way here
        h, hh = check.tolist()
        if h * h != self.size * hh and self.size <= MAX_CHECKED_RANKS:
            self._settings_differ()
        total = float(weighed[-2])
        if total == 0:
            raise ValueError("no rank had an example in this step (the loss denominators sum to 0)")
        loss = unweigh_arena(weighed, total if self._normalise else 1.0)    # in float32, as numpy divided
        if self._rows is not None:
            self._rows.unpack(buffer)
        return loss

    def _settings_differ(self) -> None:
        """Raise, on every rank, naming what differs from rank 0 (one `allgather`:
        every rank found the mismatch in the same sums, so every rank makes it)."""
        net = self.net
        mine = {"updates": self._settings != 0, "optimizer": net.optimizer, "step": net._step, **net._opt,
                "schedule": net.schedule, "lr": self._lr}
        seen = self.comm.allgather(mine)
        odd = {r: [k for k in mine if s.get(k) != seen[0].get(k)] for r, s in enumerate(seen)}
        parts = "; ".join(f"rank {r}: {', '.join(f'{k}={seen[r][k]!r}' for k in ks)} (rank 0: "
                          f"{', '.join(f'{k}={seen[0][k]!r}' for k in ks)})" for r, ks in odd.items() if ks)
        raise ValueError(f"the ranks' update settings differ at rank 0's step {seen[0]['step'] + 1} "
                         f"({parts or 'a hash differs'}): "
                         "every rank must pass the same lr and make the same set_optimizer and set_schedule "
                         "calls, and only through this DataParallel; this step's update was not applied")

    # -- sharding a global batch ---------------------------------------------------
    def check_same_data(self, data) -> None:
        """Refuse, on every rank alike (collective), ranks whose copy of a data set
        (`structc.datasets.load`'s kinds) differs from rank 0's: what
        `distributed.train` does before its first step, for a loop that shards a
        data set with this object itself."""
        check_same_data(self, data, _train_items(data), item_costs(data))

    def shard_dense(self, batch: Mapping[str, np.ndarray], seed: int | None = None) -> dict:
        """This rank's rows of a batch of arrays (all split along axis 0, the same rows;
        `seed`: shuffle first, the same way on every rank). Empty: {} (no examples)."""
        sizes = {len(v) for v in batch.values()}
        if len(sizes) != 1:
            raise ValueError(f"shard_dense splits arrays along their first axis, which must agree; got {sizes}")
        idx = split_dense(sizes.pop(), self.rank, self.size, seed)
        return {k: np.asarray(v)[idx] for k, v in batch.items()} if len(idx) else {}

    def shard_items(self, costs: Sequence[float]) -> list[int]:
        """This rank's share of items with these costs (`balance`)."""
        return balance(costs, self.size)[self.rank]

    def shard_forests(self, forests: Sequence) -> list[int]:
        """Indices of this rank's forests (trees), balanced by node count."""
        return self.shard_items([forest_cost(f) for f in forests])

    def shard_graphs(self, graphs: Sequence) -> list[int]:
        """Indices of this rank's graphs, balanced by nodes + edges."""
        return self.shard_items([graph_cost(g) for g in graphs])

    # -- metrics ---------------------------------------------------------------------
    def sum(self, values: Mapping[str, float]) -> dict[str, float]:
        """Each value summed over the ranks (float64)."""
        keys = sorted(values)
        buf = np.array([float(values[k]) for k in keys], np.float64)
        self.comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._MPI.SUM)
        return dict(zip(keys, buf.tolist()))

    def weighted_mean(self, metrics: Mapping[str, float], weight: float) -> dict[str, float]:
        """Metrics that are means over `weight` examples on each rank, as means over all."""
        sums = self.sum({**{k: v * weight for k, v in metrics.items()}, "\0weight": weight})
        total = sums.pop("\0weight")
        return {k: v / total for k, v in sums.items()} if total else {k: float("nan") for k in sums}

    def in_sync(self) -> bool:
        """Whether every rank's parameters and optimizer state are bitwise equal to rank 0's."""
        import zlib
        net = self.net
        mine = zlib.crc32(net._param_arena.tobytes() + net._state_arena.tobytes())
        return all(c == mine for c in self.comm.allgather(mine))

    def close(self) -> None:
        """Release the shared-memory window of the gradients' sum (collective; the
        sums after it take the `Allreduce`). `with DataParallel(net) as dp:` closes
        it at the end; a process that makes many of them should."""
        if self._shared_sum is not None:
            self._shared_sum.free()
            self._shared_sum = None

    def __enter__(self) -> "DataParallel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def batch_normalised(meta) -> list[str]:
    """The running statistics of the batch-norm layers that train with the batch's
    statistics (not frozen: `batch_counts` lists their variances), each layer's mean
    and variance; a model compiled before `batch_counts` existed: all its buffers."""
    if "batch_counts" not in meta:
        return list(meta.get("buffers", ()))
    layers = {c["buffer"].rsplit(".", 1)[0] for c in meta["batch_counts"]}
    return [b for b in meta.get("buffers", ()) if b.rsplit(".", 1)[0] in layers]


def settings_hash(net, lr) -> float:
    """A whole number in [1, SETTINGS_HASHES] from what a step's update depends on
    besides the summed gradient: lr, the optimizer, its options, the schedule and the
    step count. Python hashes numbers and tuples of them alike in every process
    (strings not: the optimizer goes in as its mode, a schedule's kind as its crc32).
    A rank whose settings differ changes the hash with odds of 30 in 31 each step,
    and the step count changes it every step."""
    sched = net.schedule
    try:                                # as native code reads it: 0.1 and float32(0.1) alike
        lr32 = _F32.unpack(_F32.pack(lr))[0]
    except (struct.error, TypeError, OverflowError):   # not a float32 number: the update's own error
        _hyper_value("lr", lr)
        raise
    if not -_F32_MAX <= lr32 <= _F32_MAX:      # NaN (hashed by identity) or infinite: the update's error
        _hyper_value("lr", lr)
    key = (lr32, net._step, MODES[net.optimizer], *net._opt.values(),
           0 if sched is None else (zlib.crc32(sched["kind"].encode()), sched["warmup"], sched["decay_steps"] or 0,
                                    sched["gamma"], sched["floor"]))
    return float(hash(key) % SETTINGS_HASHES + 1)


def _term_weights(table: np.ndarray, terms: list, rank: int) -> np.ndarray:
    """Each loss term's weight on `rank`, from every rank's denominators `table`
    [ranks, terms]: its share D_jr / D_j of the term's examples (0 when no rank has
    any); a plain sum's is 1 on every rank with examples (the ranks' sums add up); a term
    on parameters alone counts once, on the first rank with examples."""
    totals = table.sum(axis=0)
    weights = np.divide(table[rank], totals, out=np.zeros(len(terms)), where=totals > 0)
    busy = np.flatnonzero(table.sum(axis=1) > 0)
    for j, t in enumerate(terms):
        if t["kind"] == "params":
            weights[j] = 1.0 if len(busy) and busy[0] == rank else 0.0
        elif t["kind"] == "sum":
            weights[j] = 1.0 if rank in busy else 0.0
    return weights


def install_abort_hook(comm) -> None:
    """An uncaught exception on one rank ends the whole job (MPI_Abort) after saying
    which rank failed, instead of leaving the others waiting in a collective."""
    if getattr(sys.excepthook, "_structc_abort", False) or comm.Get_size() == 1:
        return
    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        print(f"structc: rank {comm.Get_rank()} of {comm.Get_size()} failed ({kind.__name__}: {value}); "
              "ending the job", file=sys.stderr, flush=True)
        _abort(comm, 1)

    hook._structc_abort = True
    sys.excepthook = hook


def threads_per_rank(comm) -> int:
    """This machine's cores shared among the ranks on it (at least 1), so that ranks
    do not each start a thread per core."""
    import os
    local = comm.Split_type(mpi().COMM_TYPE_SHARED).Get_size()
    return max(1, (os.cpu_count() or 1) // local)


def rank0_first(comm, make):
    """`make()` on rank 0, then on the others (a compile: they find it in the cache)."""
    if comm.Get_rank() == 0:
        result = make()
        comm.Barrier()
        return result
    comm.Barrier()
    return make()


def abort_job(code: int, message: str = "") -> None:
    """End every rank (the CLI, after it printed an error on this one)."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    if comm.Get_size() > 1:
        print(f"structc: rank {comm.Get_rank()} of {comm.Get_size()} failed{': ' + message if message else ''}; "
              "ending the job", file=sys.stderr, flush=True)
        _abort(comm, code or 1)


#: how long a failing rank waits between saying why and MPI_Abort (seconds)
ABORT_GRACE = 0.2


def _abort(comm, code: int) -> None:
    """MPI_Abort, after a moment for the launcher to pass on what this rank just
    wrote: under load, mpiexec (MPICH's hydra) tore the job down with the
    message still unforwarded (once in a full test run)."""
    import time
    sys.stderr.flush()
    time.sleep(ABORT_GRACE)
    comm.Abort(code)


# -- the data sets of `structc train` ------------------------------------------------

def sequence_costs(seqs) -> np.ndarray:
    """Work of each of a batch of sequences: its length (each position is one step)."""
    return seqs.lengths.astype(np.float64)


def item_costs(data) -> np.ndarray | None:
    """The cost of every training item, by item id, computed once (None: dense data,
    split by index)."""
    from .graph_datasets import GraphDataset
    from .seqdata import SequenceDataset
    from .treedata import TreeDataset
    if isinstance(data, TreeDataset):
        return np.array([forest_cost(f) for f in data.train], np.float64)
    if isinstance(data, GraphDataset):
        return np.array([graph_cost(g) for g in data.graphs], np.float64)
    if isinstance(data, SequenceDataset):
        return sequence_costs(data.train)
    return None


def feeder(data):
    """items -> the feed of those training items of a data set (as its `batches`
    makes them; {} for none). Trees and graphs come from the data set's pool,
    looked up once here (once per epoch), so a feed is one pass in C."""
    from .graph_datasets import GraphDataset
    from .treedata import TreeDataset
    if isinstance(data, TreeDataset):
        forests = data.pool()
        return lambda items: data.feed(forests.take(items)) if len(items) else {}
    if isinstance(data, GraphDataset):
        graphs, target, name = data.pool(), data.target["name"], data.graph_name
        return lambda items: {name: graphs.take(items), target: data.labels[items]} if len(items) else {}
    from .seqdata import SequenceDataset
    if isinstance(data, SequenceDataset):
        seqs, target = data.input, data.target["name"]
        return lambda items: ({seqs: data._subset(data.train, np.asarray(items)), target: data.y_train[items]}
                              if len(items) else {})
    x, y = data.input["name"], data.target["name"]
    return lambda items: {x: data.x_train[items], y: data.y_train[items]} if len(items) else {}


#: how many batches' forests or graphs are asked for at a time (`take_many`)
CHUNK = 16


def feeds(data, shares) -> Iterator[dict]:
    """The feed of each of `shares` (arrays of training items) in turn, as `feeder`
    makes them; forests and graphs are asked for `CHUNK` batches at a time
    (`take_many`: every batch of a chunk checked before any is made)."""
    from .graph_datasets import GraphDataset
    from .treedata import TreeDataset
    if isinstance(data, TreeDataset):
        pool, make = data.pool(), data.feed
    elif isinstance(data, GraphDataset):
        pool, name, target = data.pool(), data.graph_name, data.target["name"]
        make = None
    else:
        feed = feeder(data)
        yield from (feed(mine) for mine in shares)
        return
    shares = list(shares)
    for at in range(0, len(shares), CHUNK):
        chunk = shares[at:at + CHUNK]
        made = iter(pool.take_many([m for m in chunk if len(m)]))
        for mine in chunk:
            if not len(mine):
                yield {}
            elif make is not None:
                yield make(next(made))
            else:
                yield {name: next(made), target: data.labels[mine]}


def _feed(data, items) -> dict:
    """The feed of these training items of a data set (`feeder`, for one batch)."""
    return feeder(data)(items)


def _train_items(data) -> np.ndarray:
    from .graph_datasets import GraphDataset
    return np.asarray(data.train) if isinstance(data, GraphDataset) else np.arange(len(data))


#: rows of each of a data set's arrays that `data_digest` reads (evenly spaced)
DIGEST_ROWS = 4096
#: items (trees, graphs, sequences) whose contents `data_digest` reads (evenly spaced)
DIGEST_ITEMS = 512


def data_digest(data, items, costs) -> str:
    """A short digest of a data set's training part: its kind, its items and their
    costs (a forest's or a graph's size, a sequence's length), up to DIGEST_ROWS
    evenly spaced rows of its example and label arrays, and the contents (words,
    features, labels, edges) of up to DIGEST_ITEMS evenly spaced items."""
    h = hashlib.sha256(type(data).__name__.encode())
    h.update(np.ascontiguousarray(items).tobytes())
    if costs is not None:
        h.update(np.ascontiguousarray(costs).tobytes())
    for name in ("x_train", "y_train", "labels"):
        a = getattr(data, name, None)
        if isinstance(a, np.ndarray):
            h.update(repr((name, a.shape, a.dtype.str)).encode())
            h.update(np.ascontiguousarray(_evenly(a, DIGEST_ROWS)).tobytes())
    for a in _item_contents(data, _evenly(np.asarray(items), DIGEST_ITEMS)):
        h.update(repr((a.shape, a.dtype.str)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _evenly(a: np.ndarray, most: int) -> np.ndarray:
    return a if len(a) <= most else a[np.linspace(0, len(a) - 1, most).astype(np.int64)]


def _item_contents(data, items) -> Iterator[np.ndarray]:
    """The arrays of each of `items` (ids) in a data set of trees, graphs or sequences:
    what its costs and label arrays do not show (a tree's words and node labels, a
    graph's features and edges, a sequence's tokens)."""
    from .graph_datasets import GraphDataset
    from .seqdata import SequenceDataset
    from .treedata import TreeDataset
    for k in items.tolist():
        if isinstance(data, TreeDataset):
            f = data.train[k]
            yield from (a for a in (f.children, f.words, f.features, f.labels) if a is not None)
        elif isinstance(data, GraphDataset):
            g = data.graphs[k]
            yield from (a for a in (g.x, g.edge_x) if a is not None)
            yield from (g.arrays[name] for name in sorted(g.arrays))
        elif isinstance(data, SequenceDataset):
            yield np.asarray(data.train[k])


def check_same_data(dp: DataParallel, data, items, costs) -> None:
    """Refuse, on every rank alike, ranks that loaded other training data than rank 0
    (a stale copy of a file on one host, say): each rank's share of a batch is picked
    from its own copy by index, so the union would be no batch of anyone's data. Then
    the same for the held-out part (`check_same_held_out`)."""
    odd, seen = unlike_rank_0(dp.comm, data_digest(data, items, costs), len(items))
    if odd:
        raise ValueError(f"{_ranks(odd)} loaded other training data than rank 0 (rank {odd[0]}: {seen[odd[0]]} "
                         f"items, rank 0: {seen[0]}, or the same count with other contents): every rank must load "
                         "the same data set, since a rank's share of each batch is picked from its own copy by index")
    check_same_held_out(dp, data)


def check_same_held_out(dp: DataParallel, data) -> None:
    """Refuse, on every rank alike, ranks whose held-out part differs from rank 0's
    (`data_digest` of it): each rank evaluates its share of its own copy, so the
    metrics reduced over the ranks would measure no one's held-out part."""
    part = _held_out_as_training(data)
    items = _train_items(part)
    odd, seen = unlike_rank_0(dp.comm, data_digest(part, items, item_costs(part)), len(items))
    if odd:
        raise ValueError(f"{_ranks(odd)} loaded other held-out data than rank 0 (rank {odd[0]}: {seen[odd[0]]} "
                         f"items, rank 0: {seen[0]}, or the same count with other contents): every rank must load "
                         "the same data set, since a rank evaluates its share of the held-out part of its own copy")


def _held_out_as_training(data):
    """A copy of `data` whose training part is its held-out part (what `data_digest` reads)."""
    part = copy.copy(data)
    if hasattr(data, "x_test"):                  # arrays
        part.x_train, part.y_train = data.x_test, data.y_test
    elif hasattr(data, "y_test"):                # sequences
        part.train, part.y_train = data.test, data.y_test
    else:                                        # trees; graphs (ids into data.graphs)
        part.train = data.test
    return part


def check_same_run(dp: DataParallel, cfg, rng: np.random.Generator, stopper) -> None:
    """Refuse, on every rank alike, ranks that would train another run than rank 0: other
    settings, epochs, shuffling generator or early-stopping state (a `--resume` from a
    stale copy of the checkpoint on one host). The parameters and optimizer state are
    rank 0's (`broadcast_state`), but each rank shuffles with its own generator: shares
    of different batches would train on no batch of anyone's, and a rank with more
    epochs to go would wait in a sum that the others never join."""
    from dataclasses import asdict
    run = {k: v for k, v in asdict(cfg).items() if k != "progress"}      # bars: rank 0 alone draws them
    run.update(rng=rng.bit_generator.state, early_stop=None if stopper is None else stopper.state())
    digest = hashlib.sha256(repr(sorted(run.items())).encode()).hexdigest()[:16]
    odd, seen = unlike_rank_0(dp.comm, digest, cfg.first_epoch)
    if odd:
        raise ValueError(f"{_ranks(odd)} would train another run than rank 0 (rank {odd[0]}: from epoch "
                         f"{seen[odd[0]]}, rank 0: from epoch {seen[0]}, or from the same epoch with other settings, "
                         "shuffling or early-stopping state): every rank must start alike, and resume the same "
                         "checkpoint (a stale copy on one host?)")


def unlike_rank_0(comm, digest: str, detail) -> tuple[list[int], list]:
    """The ranks whose `digest` differs from rank 0's, and every rank's `detail`
    (what an error names); one `allgather`, so every rank gets the same answer."""
    seen = comm.allgather((digest, detail))
    return [r for r, (d, _) in enumerate(seen) if d != seen[0][0]], [x for _, x in seen]


def _ranks(ranks: list[int]) -> str:
    return f"{'rank' if len(ranks) == 1 else 'ranks'} {', '.join(map(str, ranks))}"


def check_splittable(data) -> None:
    from .graph_datasets import NodeDataset
    if isinstance(data, NodeDataset):
        raise ValueError(f"data set '{data.name}' is one graph, which data-parallel training cannot split by "
                         "examples (it needs a partition with halos: see docs/DISTRIBUTED.md); train it on one "
                         "process")


def shard(dp: DataParallel, items, costs: np.ndarray | None) -> np.ndarray:
    """This rank's share of `items` (ids): by `costs[id]` (`item_costs`) for trees and
    graphs, by position when `costs` is None."""
    items = np.asarray(items)
    if costs is None:
        return np.array_split(items, dp.size)[dp.rank]
    return items[dp.shard_items(costs[items])]


def shard_epoch(dp: DataParallel, order, batch: int, costs: np.ndarray | None) -> list[np.ndarray]:
    """This rank's share of every global batch of an epoch (`order` cut into runs of
    `batch`), as `shard` gives it batch by batch, computed at once."""
    order = np.asarray(order)
    starts = range(0, len(order), batch)
    if costs is None:
        return [np.array_split(order[at:at + batch], dp.size)[dp.rank] for at in starts]
    mine = balance_batches(costs[order], batch, dp.size) == dp.rank
    return [order[at:at + batch][mine[at:at + batch]] for at in starts]


def held_out_part(dp: DataParallel, data):
    """A copy of `data` whose held-out part is this rank's share of it, and the size of
    that share (None, 0: no share)."""
    from .graph_datasets import GraphDataset
    from .seqdata import SequenceDataset
    from .treedata import TreeDataset
    part = copy.copy(data)
    if isinstance(data, SequenceDataset):
        mine = np.array(dp.shard_items(sequence_costs(data.test)), np.int64)
        if len(mine):
            part.test, part.y_test = data._subset(data.test, mine), data.y_test[mine]
    elif isinstance(data, TreeDataset):
        mine = dp.shard_items([forest_cost(f) for f in data.test])
        part.test = [data.test[k] for k in mine]
    elif isinstance(data, GraphDataset):
        mine = dp.shard_items([graph_cost(data.graphs[k]) for k in data.test])
        part.test = data.test[mine]
    else:
        mine = split_dense(len(data.x_test), dp.rank, dp.size)
        part.x_test, part.y_test = data.x_test[mine], data.y_test[mine]
    return (part, len(mine)) if len(mine) else (None, 0)


def evaluate(dp: DataParallel, data) -> dict:
    """The data set's held-out metrics, each rank evaluating its share: the shares'
    tallies (each loss term's sums and denominators, `structc.heldout`) summed over
    the ranks, so the loss is one process's on the whole part."""
    if hasattr(data, "evaluate_share"):          # a streamed file: a share of each chunk
        tally = data.evaluate_share(dp.net, dp.rank, dp.size)
    else:
        part, _ = held_out_part(dp, data)
        tally = part.held_out_tally(dp.net) if part is not None else Tally(dp.net, data.output)
    dp.comm.Allreduce(dp._MPI.IN_PLACE, tally.sums, op=dp._MPI.SUM)
    return tally.metrics()


def train(dp: DataParallel, data, cfg, log=print, rng: np.random.Generator | None = None, on_epoch=None,
          stopper=None):
    """`structc.train.train` across ranks: the same seeded order and global batches of
    `cfg.batch` on every rank, each split among them; held-out (and validation) metrics
    reduced over the ranks, so every rank makes the same early-stopping decision and
    keeps the same best epoch; only rank 0 logs and calls `on_epoch`."""
    from tqdm import tqdm

    from .train import (EarlyStopping, History, _with_validation, configure, epoch_line, finish, show_bars,
                        stops)
    check_splittable(data)
    refuse_empty(data)
    net = dp.net
    configure(net, cfg)              # the same checks, optimizer and schedule as one process
    dp.broadcast_state()
    rng = np.random.default_rng(cfg.seed) if rng is None else rng
    log = log if dp.is_root else (lambda *a, **k: None)
    history = History()
    held_out = data
    data, check = _with_validation(data, cfg, log)     # the same seeded split on every rank
    if stopper is None and cfg.early_stop:
        stopper = EarlyStopping(cfg.early_stop, cfg.monitor)
    check_same_run(dp, cfg, rng, stopper)
    streamed = hasattr(data, "shares")           # a file read a chunk at a time (structc.streams)
    items = None if streamed else _train_items(data)
    costs = None if streamed else item_costs(data)
    if not streamed:                             # every part: training with its validation rows, held-out
        whole = (items, costs) if check is None else (_train_items(held_out), item_costs(held_out))
        check_same_data(dp, held_out, *whole)
    bars = dp.is_root and show_bars(cfg)         # rank 0's steps are every rank's: one bar
    for epoch in range(cfg.first_epoch, cfg.epochs + 1):
        start = time.perf_counter()      # the epoch's own time, as the metrics log's
        if streamed:                             # the global batches one process makes, a share each
            mine = data.shares(cfg.batch, rng, dp.rank, dp.size)
        else:
            mine = feeds(data, shard_epoch(dp, rng.permutation(items), cfg.batch, costs))
        total, steps = 0.0, 0
        bar = tqdm(dp.train_steps(mine, cfg.lr), total=data.batch_count(cfg.batch), leave=False, disable=not bars,
                   desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", file=sys.stderr, dynamic_ncols=True)
        for loss in bar:
            if not np.isfinite(loss):
                raise FloatingPointError(f"the loss became {loss} in epoch {epoch}; try a smaller learning rate")
            total += loss
            steps += 1
            if steps % 10 == 0:
                bar.set_postfix(loss=f"{total / steps:.4f}")
        bar.close()
        metrics = {"epoch": epoch, "train_loss": total / max(steps, 1),
                   **{f"heldout_{k}": v for k, v in evaluate(dp, held_out).items()}}
        if check is not None:
            metrics.update({f"val_{k}": v for k, v in evaluate(dp, check).items()})
        metrics.update(seconds=time.perf_counter() - start, lr=net.last_lr)
        if stopper is not None:      # rank 0's metrics on every rank: the same decisions, the same best epoch
            metrics = dp.comm.bcast(metrics, root=0)
        history.epochs.append(metrics)
        if on_epoch is not None and dp.is_root:
            on_epoch(metrics)
        log(epoch_line(metrics, cfg, f", {dp.size} ranks"))
        if stops(net, stopper, metrics, history, cfg):
            break
    return finish(net, history, rng, stopper, cfg, log)
