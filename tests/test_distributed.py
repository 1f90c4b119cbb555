"""Data-parallel training on MPI: exact gradients with uneven shards, ranks bitwise
equal after optimizer steps, a failing rank ending the job; sharding and the loss
denominator without MPI. The MPI tests launch `mpiexec -n 2` (one thread per rank)."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import structc
from structc.distributed import balance, balance_batches, shard, shard_epoch, split_dense
from test_streams import MODELS

pytestmark = pytest.mark.slow   # launches processes or compiles many models: not in the fast subset

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "mpi_worker.py"
FAMILIES = ["mlp", "trees", "words", "graphs", "sequences", "mixed", "nodes", "halo", "empty", "mean_sum",
            "sum_penalty", "frozen_bn", "words_rows", "trees_table", "trees_rows"]
OPTIMIZERS = ["sgd", "momentum", "adam"]
TIMEOUT = 300


def _mpi_missing() -> str | None:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install 'structc[mpi]' mpich)"
    if shutil.which("mpiexec") is None:
        return "no mpiexec on PATH (pip install mpich)"
    return None


def _need_mpi():
    why = _mpi_missing()
    if why is not None:
        if os.environ.get("STRUCTC_REQUIRE_MPI"):
            pytest.fail(f"{why}: .ci/run installs them (and sets STRUCTC_REQUIRE_MPI), so CI must not skip")
        pytest.skip(why)


def mpiexec(*args, timeout=TIMEOUT, ranks=2):
    env = dict(os.environ, STRUCTC_NUM_THREADS="1")
    return subprocess.run(["mpiexec", "-n", str(ranks), sys.executable, *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    _need_mpi()
    out = tmp_path_factory.mktemp("mpi")
    run = mpiexec(WORKER, out)
    assert run.returncode == 0, run.stderr[-3000:]
    return [dict(np.load(out / f"rank{r}.npz")) for r in (0, 1)]


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_equals_one_process_on_the_whole_batch(ranks, family):
    r0, r1 = ranks
    keys = [k for k in r0 if k.startswith(f"{family}:grad:")]
    assert keys
    assert float(r0[f"{family}:loss"]) == pytest.approx(float(r0[f"ref:{family}:loss"]), rel=1e-5)
    for k in keys:
        want = r0[f"ref:{k}"]
        np.testing.assert_allclose(r0[k], want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=k)
        assert np.array_equal(r0[k], r1[k]), k


@pytest.mark.parametrize("family", FAMILIES)
def test_local_ranks_sum_through_shared_memory_as_allreduce_does(ranks, family):
    """Two ranks on this machine sum the arena through shared memory (structc.shmsum);
    the gradient is the Allreduce's, bit for bit (a + b either way)."""
    r0, r1 = ranks
    assert r0[f"{family}:shared_memory"] and r1[f"{family}:shared_memory"]
    keys = [k for k in r0 if k.startswith(f"{family}:grad:")]
    for r in (r0, r1):
        assert r[f"{family}:closed"] and r[f"{family}:closed:loss"] == r[f"{family}:loss"]   # close(): Allreduce
        assert r[f"{family}:mixed"] and r[f"{family}:mixed:loss"] == r[f"{family}:loss"]     # ranks disagreed
        assert r[f"{family}:loss"] == r[f"{family}:allreduce:loss"]
        for k in keys:
            assert np.array_equal(r[k], r[k.replace(":grad:", ":allreduce:grad:")]), k


@pytest.mark.parametrize("family", ["words", "trees_table"])
def test_a_table_summed_by_rows_gives_the_whole_sum_s_bits(ranks, family):
    """With the table summed by the rows some rank's step wrote (`structc.rowsum`: the
    union of the ranks' records, a packed buffer, each record the union afterwards), every
    gradient, parameter and optimizer state is the one the whole arena's sum gives, bit for
    bit: the same additions, each row's in the same place. Three steps of new rows each (so
    a stale record would leave a row unzeroed or not updated), each optimizer."""
    r0, r1 = ranks
    rows = family.replace("_table", "") + "_rows"
    for r in (r0, r1):
        assert r[f"{rows}:rows"] and not r[f"{family}:rows"]
        keys = [k for k in r if k.startswith(f"{family}:") and not k.endswith((":rows", ":made"))]
        assert len(keys) > 20
        for k in keys:
            assert np.array_equal(r[k], r[rows + k[len(family):]]), k
        # a table's first step sums the arena (its record marks every row), the later ones packed rows
        assert all(int(r[f"{rows}:{opt}:packed_sums"]) > 0 for opt in OPTIMIZERS)


def test_ranks_that_disagree_on_summing_by_rows_all_sum_whole(ranks):
    """One rank's threshold would sum the table by rows, the other's whole: the
    ranks agree first (one would otherwise wait in an `Allreduce` the other never
    makes), so both sum it whole, with the record of rows off."""
    for r in ranks:
        assert r["rows_disagree:whole"]
        assert r["rows_disagree:loss"] == r["rows_disagree:want"]


def test_the_shared_memory_sum_adds_in_rank_order_on_every_rank(tmp_path):
    """Three ranks (more than two: the order of the additions matters): every rank gets
    ((x0 + x1) + x2) in float32, bit for bit, over steps that reuse the two slots."""
    _need_mpi()
    run = mpiexec(WORKER, tmp_path, "sum", ranks=3, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    got = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(3)]
    assert all(g["too_large"] for g in got)          # larger arenas take the Allreduce
    for step in range(5):
        x = [g[f"in{step}"] for g in got]
        want = (x[0] + x[1]) + x[2]
        assert not np.array_equal(want, x[0] + (x[1] + x[2]))       # the order shows
        for g in got:
            assert np.array_equal(g[f"out{step}"], want), step


def test_shm_sum_adds_the_slots_in_order_once_every_flag_is_up_and_checks_first():
    """One process stands for rank 1 of 4: the others' slots and flags are written
    already, so the call returns at once with the slots' sum in rank order, its
    arena in its own slot and its flag raised to the sum's number."""
    from structc._runtime import shm_sum
    rng = np.random.default_rng(0)
    slots = [(rng.normal(size=50) * 10.0 ** rng.integers(-8, 8, 50)).astype(np.float32) for _ in range(4)]
    arena = (rng.normal(size=50) * 1e3).astype(np.float32)
    mine = arena.copy()
    flags = [np.array([7], np.uint64) for _ in range(4)]
    flags[1][0] = 6
    shm_sum(arena, slots, flags, 1, 7)
    assert np.array_equal(slots[1], mine) and flags[1][0] == 7
    assert np.array_equal(arena, ((slots[0] + mine) + slots[2]) + slots[3])
    assert not np.array_equal(arena, slots[0] + (mine + (slots[2] + slots[3])))     # the order shows
    with np.errstate(over="ignore"):
        big = [np.full(4, 3e38, np.float32) for _ in range(2)]
    out = big[0].copy()
    shm_sum(out, big, [np.array([1], np.uint64) for _ in range(2)], 0, 1)   # inf, as a sum over ranks, silently
    assert np.isinf(out).all()
    before, kept = arena.copy(), [s.copy() for s in slots]
    two = [np.array([7], np.uint64) for _ in range(2)]
    for args, error in (((slots[:1], flags[:1], 0, 8), ValueError), ((slots, flags[:3], 1, 8), ValueError),
                        ((slots, flags, 4, 8), ValueError), (([slots[0], slots[1][:49]], two, 0, 8), ValueError),
                        (([slots[0], arena], two, 0, 8), ValueError),
                        (([slots[0], slots[1].astype(np.float64)], two, 0, 8), TypeError),
                        (([slots[0], slots[1]], [two[0], np.zeros(1, np.uint8)], 0, 8), ValueError),
                        (([slots[0], 3], two, 0, 8), TypeError)):
        with pytest.raises(error):
            shm_sum(arena, *args)
        assert np.array_equal(arena, before) and all(np.array_equal(s, k) for s, k in zip(slots, kept))
        assert all(f[0] == 7 for f in two)          # checked before anything is written or raised


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_ranks_stay_bitwise_equal(ranks, family, optimizer):
    r0, r1 = ranks
    prefix = f"{family}:{optimizer}:"
    keys = [k for k in r0 if k.startswith(prefix + "param:")] + [prefix + "state"]
    for k in keys:
        assert np.array_equal(r0[k], r1[k]), k
    assert r0[prefix + "in_sync"] and r1[prefix + "in_sync"]
    for k in keys[:-1]:     # and they are the one-process steps on the whole batches
        want = r0[f"ref:{k}"]
        np.testing.assert_allclose(r0[k], want, rtol=1e-4, atol=1e-5 * np.abs(want).max(), err_msg=k)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_train_steps_is_train_step_after_train_step(ranks, family, optimizer):
    """DataParallel.train_steps (the next feed made while the sum is in flight) gives the
    parameters and optimizer state of the same train_step calls, bit for bit."""
    r0, r1 = ranks
    prefix = f"{family}:{optimizer}:"
    keys = [k[len(prefix):] for k in r0 if k.startswith(prefix + "param:")] + ["state"]
    for r in (r0, r1):
        for k in keys:
            assert np.array_equal(r[prefix + "steps:" + k], r[prefix + k]), k
        made = r[prefix + "steps:made"]
        assert made.tolist() == list(range(len(made) - 1)) + [len(made) - 1]     # every feed made once


def test_each_rank_draws_dropout_masks_of_its_own(ranks):
    """The ranks' rows are different examples at the same positions: with rank 0's
    key broadcast as is, every rank would drop the same units of its rows."""
    from structc.model import _dropout_key
    r0, r1 = ranks
    np.testing.assert_array_equal(r0["dropout:key"], _dropout_key(0))     # one rank is one process
    assert not np.array_equal(r0["dropout:key"], r1["dropout:key"])


def test_a_schedule_set_on_rank_0_alone_is_every_rank_s(ranks):
    r0, r1 = ranks
    assert r0["schedule:in_sync"] and r1["schedule:in_sync"]
    assert r0["schedule:last_lr"] == r1["schedule:last_lr"] < 0.1      # cosine decay, step 3 of 4


def test_a_failing_rank_ends_the_job_and_is_named(tmp_path):
    _need_mpi()
    run = mpiexec(WORKER, tmp_path, "crash", timeout=120)
    assert run.returncode != 0, run.stderr[-3000:]
    assert "rank 1 of 2 failed" in run.stderr and "deliberate failure on rank 1" in run.stderr, run.stderr[-3000:]


def test_ranks_that_built_different_models_are_refused_before_any_broadcast(tmp_path):
    _need_mpi()
    run = mpiexec(WORKER, tmp_path, "mismatch", timeout=120)
    assert run.returncode != 0, run.stderr[-3000:]
    assert "rank 1 built another model than rank 0 (rank 1: Trees with a 288-float parameter arena; " \
        "rank 0: Trees with 224" in run.stderr, run.stderr[-3000:]


def test_ranks_whose_update_settings_differ_are_refused_before_the_update(tmp_path):
    """A different lr on one rank, or an optimizer changed on one rank alone after
    the broadcast: every rank raises the same error naming what differs, before any
    update; the ranks stay bitwise equal and train on once they agree again."""
    _need_mpi()
    run = mpiexec(WORKER, tmp_path, "settings", timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    r0, r1 = (dict(np.load(tmp_path / f"settings{r}.npz")) for r in (0, 1))
    for r in (r0, r1):
        assert str(r["same:error"]) == "" and not r["same:unchanged"]
        assert "the ranks' update settings differ at rank 0's step 2 (rank 1: lr=0.2 (rank 0: lr=0.1))" in str(r["lr:error"])
        assert "rank 1: lr=0.3 (rank 0: lr=0.1)" in str(r["steps:error"])
        assert "rank 0's step 1 (rank 1: optimizer='sgd', step=1 (rank 0: optimizer='adam', step=0))" \
            in str(r["optimizer:error"])
        assert "this step's update was not applied" in str(r["optimizer:error"])
        for case in ("lr", "steps", "optimizer"):
            assert r[f"{case}:unchanged"], case
        assert str(r["again:error"]) == "" and not r["again:unchanged"] and r["in_sync"]
    for case in ("lr", "steps", "optimizer"):
        assert str(r0[f"{case}:error"]) == str(r1[f"{case}:error"]), case
    # summed by rows, a mismatch raised after the arena's sum leaves no row stale
    assert r0["rows_after_mismatch:same"] and r1["rows_after_mismatch:same"]


def test_a_share_with_examples_but_none_for_a_term_is_refused_on_every_rank(tmp_path):
    """A loss over graphs and over edges, rank 1's graph without edges: its mean over
    edges would be 0/0. Every rank raises (before: rank 1 alone, and rank 0 waited in
    the sum for good), no rank steps, and the next step trains."""
    _need_mpi()
    run = mpiexec(WORKER, tmp_path, "empty_term", timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    r0, r1 = (dict(np.load(tmp_path / f"empty_term{r}.npz")) for r in (0, 1))
    assert str(r0["empty"]) == str(r1["empty"]) == ("rank 1: its shard has examples but none for loss term 2 (a "
                                                    "mean over g.edges), whose mean would be 0/0; no rank took the step")
    assert str(r0["full"]) == str(r1["full"]) == "" and r0["in_sync"] and r1["in_sync"]


def test_ranks_that_loaded_other_data_are_refused_before_training(tmp_path):
    _need_mpi()
    run = mpiexec(WORKER, tmp_path, "data", timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    for case in ("train", "api"):         # distributed.train's check, and the same for a loop of one's own
        errors = {str(np.load(tmp_path / f"data{r}.npz")[case]) for r in (0, 1)}
        assert len(errors) == 1, case
        assert "rank 1 loaded other training data than rank 0 (rank 1: 1438 items, rank 0: 1438, or the same " \
               "count with other contents)" in errors.pop(), case



def test_held_out_metrics_from_two_ranks_shares_are_one_call_s(tmp_path):
    """`distributed.evaluate` sums the ranks' tallies: each term of a loss over roots and
    nodes (graphs and nodes) weighed by its own count, so the loss is one call's on the
    whole held-out part (before: the ranks' losses weighed by their trees or graphs)."""
    _need_mpi()
    run = mpiexec(WORKER, tmp_path, "heldout", timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    r0, r1 = (np.load(tmp_path / f"heldout{r}.npz") for r in (0, 1))
    for name in ("roots_and_nodes", "nodes", "graphs_and_nodes", "digits_mlp", "streamed"):
        assert float(r0[f"{name}:loss"]) == float(r1[f"{name}:loss"]), name      # every rank's the same
        assert float(r0[f"{name}:loss"]) == pytest.approx(float(r0[f"ref:{name}:loss"]), rel=1e-5), name


def _changed_item(kind: str):
    """(data set, the same with one item's contents changed, its items, costs)
    for trees (a word, then a node label), graphs (a feature) and sequences (a value)."""
    import copy

    from structc import Forest, datasets
    from structc.distributed import DIGEST_ITEMS, _evenly, _train_items, item_costs
    data = datasets.load({"trees": "logic", "labels": "logic", "graphs": "graph_families",
                          "sequences": "digits_rows"}[kind])
    other = copy.copy(data)
    items = _train_items(data)
    k = int(_evenly(items, DIGEST_ITEMS)[DIGEST_ITEMS // 2])      # an item the digest reads
    if kind in ("trees", "labels"):
        f = data.train[k]
        leaves = np.flatnonzero(f.children[:, 0] < 0)        # in schedule order, as f.words lists them
        words, labels = np.zeros(f.nodes, np.int64), np.array(f.labels)
        words[leaves] = f.words
        if kind == "trees":
            words[leaves[0]] = (words[leaves[0]] + 1) % len(data.vocab)
        else:
            labels[-1] = (labels[-1] + 1) % 3
        children = np.array(f.children)
        other.train = list(data.train)
        other.train[k] = Forest.from_arrays(children, words, labels=labels)
        assert other.train[k].nodes == f.nodes
    elif kind == "graphs":
        other.graphs = list(data.graphs)
        other.graphs[k] = data.graphs[k].with_features(x=data.graphs[k].x + 1)
    else:
        from structc.seqdata import Sequences
        seqs = [np.array(s) for s in data.train]
        seqs[k][0, 0] += 1
        other.train = Sequences.from_list(seqs)
    return data, other, items, item_costs(data)


@pytest.mark.parametrize("kind", ["trees", "labels", "graphs", "sequences"])
def test_the_data_digest_sees_one_item_changed_where_its_size_is_not(kind):
    """A stale copy that differs in one tree's word or label, one graph's features
    or one sequence's values (not in any size) is refused by the data check."""
    from structc.distributed import data_digest
    data, other, items, costs = _changed_item(kind)
    same = data_digest(data, items, costs)
    assert data_digest(data, items, costs) == same
    assert data_digest(other, items, costs) != same


_HASHES = """
import structc
from structc.distributed import settings_hash
net = structc.compile("examples/digits_mlp.snet")
out = [settings_hash(net, 0.1)]
net.set_optimizer("adam", weight_decay=0.01)
out.append(settings_hash(net, 0.05))
net.set_schedule("cosine", warmup=3, decay_steps=50)
out.append(settings_hash(net, 0.05))
print(out)
"""


def test_the_settings_hash_is_every_process_s_and_refuses_what_the_update_refuses():
    """The same in processes of different string hash seeds (ranks are such processes),
    lr as native code reads it, and the update's own errors for an lr it refuses."""
    from structc.distributed import settings_hash
    seen = {subprocess.run([sys.executable, "-c", _HASHES], capture_output=True, text=True, cwd=ROOT, check=True,
                           env=dict(os.environ, PYTHONHASHSEED=seed)).stdout for seed in ("1", "2", "random")}
    assert len(seen) == 1 and len(eval(seen.pop())) == 3
    net = structc.compile(ROOT / "examples" / "digits_mlp.snet")
    assert settings_hash(net, 0.1) == settings_hash(net, np.float32(0.1))
    assert len({settings_hash(net, lr) for lr in np.linspace(0.01, 1, 50)}) > 10
    for bad, error in (("0.1", TypeError), (None, TypeError), (float("nan"), ValueError), (1e39, ValueError)):
        with pytest.raises(error, match="lr must be"):
            settings_hash(net, bad)


def _epoch_numbers(text: str) -> list[float]:
    """The losses and accuracies of the `epoch ...` lines of `structc train`."""
    import re
    return [float(v) for line in text.splitlines() if line.startswith("epoch")
            for v in re.findall(r"(?:loss|accuracy) (\d+\.\d+)", line)]


def test_cli_train_distributed_is_the_one_process_run(tmp_path, capsys):
    _need_mpi()
    from structc.cli import main
    args = ["train", ROOT / "examples" / "digits_mlp.snet", "--data", "digits", "--epochs", "2", "--optimizer",
            "adam", "--lr", "0.01", "--no-progress", "--schedule", "cosine", "--decay-steps", "30"]  # both must apply it
    run = mpiexec("-m", "mpi4py", "-m", "structc", *args, "--distributed", "--out", tmp_path / "two.npz")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("saved parameters") == 1 and run.stdout.count("epoch   2/2") == 1, run.stdout
    assert main([str(a) for a in args] + ["--out", str(tmp_path / "one.npz")]) == 0
    alone = capsys.readouterr().out
    assert _epoch_numbers(run.stdout) == pytest.approx(_epoch_numbers(alone), abs=2e-4), (run.stdout, alone)
    assert len(_epoch_numbers(alone)) == 6
    two, one = ([json.loads(line) for line in (tmp_path / f"{n}.metrics.jsonl").read_text().splitlines()]
                for n in ("two", "one"))
    for field in ("epoch", "loss", "heldout_loss", "heldout_accuracy", "lr"):    # the log: rank 0's global numbers
        assert [r[field] for r in two] == pytest.approx([r[field] for r in one], rel=1e-5), field
    assert set(two[0]) == set(one[0]) and two[-1]["lr"] < 0.01      # the schedule's lr, not the base rate
    assert sorted(p.name for p in tmp_path.glob("two.*")) == ["two.metrics.jsonl", "two.npz", "two.train.npz"]
    evaluated = mpiexec("-m", "mpi4py", "-m", "structc", "eval", ROOT / "examples" / "digits_mlp.snet", "--data",
                        "digits", "--params", tmp_path / "two.npz", "--distributed")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    accuracy = run.stdout.split("held-out accuracy ")[1].strip()
    assert evaluated.stdout.count("accuracy") == 1 and f"accuracy {accuracy}" in evaluated.stdout


LOGIC_ROOTS = """
model LogicRoots {
  input  t: forest(arity=3) of word(vocab=6)
  target y: class[t.trees] of 2
  param  E: embedding(6, 16) = normal(0.3)
  rec h(n) = leaf: E[n.word]
             node: tanh(dense(concat(h(n.children)), 16))
  logits = dense(h(t.root), 2)
  output truth = softmax(logits)
  loss cross_entropy(logits, y)
}
"""


@pytest.mark.parametrize("family", ["graphs", "trees", "sequences", "mixed"])
def test_cli_distributed_trains_and_evaluates_like_one_process(family, tmp_path, capsys):
    """Sharding by cost and the held-out metrics reduced over the ranks: `eval --distributed`
    reports what one process reports (mixed: logic_tree's loss, a mean over trees plus one
    over nodes, each term weighed by the rank's share)."""
    _need_mpi()
    from structc.cli import main
    if family == "graphs":
        model, data = ROOT / "examples" / "graph_families.snet", "graph_families"
    elif family == "mixed":
        model, data = ROOT / "examples" / "logic_tree.snet", "logic"
    elif family == "sequences":
        model, data = ROOT / "examples" / "digits_lstm.snet", "digits_rows"
    else:
        model, data = tmp_path / "roots.snet", "logic"
        model.write_text(LOGIC_ROOTS)
    out = tmp_path / "run.npz"
    run = mpiexec("-m", "mpi4py", "-m", "structc", "train", model, "--data", data, "--epochs", "1",
                  "--optimizer", "adam", "--lr", "0.005", "--distributed", "--out", out, "--no-progress")
    assert run.returncode == 0, run.stderr[-3000:]
    evaluated = mpiexec("-m", "mpi4py", "-m", "structc", "eval", model, "--data", data, "--params", out,
                        "--distributed")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert main(["eval", str(model), "--data", data, "--params", str(out)]) == 0
    alone = capsys.readouterr().out
    loss = [float(text.split("loss ")[1].split(",")[0]) for text in (evaluated.stdout, alone)]
    accuracy = [text.split("accuracy ")[1].strip() for text in (evaluated.stdout, alone)]
    assert accuracy[0] == accuracy[1] and loss[0] == pytest.approx(loss[1], abs=2e-4), (evaluated.stdout, alone)
    if family == "mixed":       # and training is the one-process run's
        assert main(["train", str(model), "--data", data, "--epochs", "1", "--optimizer", "adam", "--lr", "0.005",
                     "--out", str(tmp_path / "one.npz"), "--no-progress"]) == 0
        once = capsys.readouterr().out
        assert _epoch_numbers(run.stdout) == pytest.approx(_epoch_numbers(once), abs=2e-4), (run.stdout, once)


def _bracketed(rng, depth: int) -> str:
    if depth == 0 or rng.random() < 0.3:
        return f"(0 w{int(rng.integers(10))})"          # test_streams' Tree model: 10 words
    return f"({int(rng.integers(2))} {_bracketed(rng, depth - 1)} {_bracketed(rng, depth - 1)})"


@pytest.mark.parametrize("model", ["Table", "Tree"])
def test_cli_streams_a_file_on_two_ranks_as_one_process_does(model, tmp_path, capsys):
    """--stream with --distributed: the same chunks, orders and global batches as one
    process (3 chunks of 4096 examples), each rank parsing its share; the same epochs'
    losses and accuracies, and `eval --distributed --stream` reports what one process does."""
    _need_mpi()
    from structc import streams
    from structc.cli import main
    rng = np.random.default_rng(1)
    n = 2 * streams.CHUNK + 500
    if model == "Table":
        data = tmp_path / "big.csv"
        x = rng.normal(size=(n, 4)).round(4)
        np.savetxt(data, np.column_stack([x, x[:, 0] + x[:, 1] > 0]), fmt="%g", delimiter=",")
    else:
        data = tmp_path / "bank.txt"
        data.write_text("\n".join(_bracketed(rng, 4) for _ in range(n)) + "\n")
    (tmp_path / "m.snet").write_text(MODELS)          # test_streams' Tree and Table
    args = ["train", tmp_path / "m.snet", "--model", model, "--data", data, "--epochs", "2", "--optimizer", "adam",
            "--lr", "0.01", "--batch", "64", "--stream", "--no-progress"]
    run = mpiexec("-m", "mpi4py", "-m", "structc", *args, "--distributed", "--out", tmp_path / "two.npz")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "streamed 4096 at a time" in run.stderr and run.stdout.count("epoch   2/2") == 1, (run.stdout, run.stderr)
    assert main([str(a) for a in args] + ["--out", str(tmp_path / "one.npz")]) == 0
    alone = capsys.readouterr().out
    assert len(_epoch_numbers(alone)) == 6
    assert _epoch_numbers(run.stdout) == pytest.approx(_epoch_numbers(alone), abs=2e-4), (run.stdout, alone)
    evaluated = mpiexec("-m", "mpi4py", "-m", "structc", "eval", tmp_path / "m.snet", "--model", model, "--data",
                        data, "--params", tmp_path / "two.npz", "--stream", "--distributed")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert main(["eval", str(tmp_path / "m.snet"), "--model", model, "--data", str(data), "--params",
                 str(tmp_path / "two.npz"), "--stream"]) == 0
    once = capsys.readouterr().out
    for text in (evaluated.stdout, once):
        assert text.count("accuracy") == 1, text
    assert evaluated.stdout.split("accuracy ")[1] == once.split("accuracy ")[1]


@pytest.mark.parametrize("data", ["noise", "graphs"])
def test_cli_stops_early_on_two_ranks_where_one_process_does(data, tmp_path, capsys):
    """--val-split and --early-stop with --distributed: the same seeded validation part,
    its metrics reduced over the ranks, the same stopping epoch, the best epoch's
    parameters saved (labels with no signal: validation gets worse within a few epochs)."""
    _need_mpi()
    from structc.cli import main
    if data == "noise":
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(300, 8)).astype(np.float32), rng.integers(0, 2, 300).astype(np.int32)
        np.savez(tmp_path / "noise.npz", x_train=x[:240], y_train=y[:240], x_test=x[240:], y_test=y[240:])
        (tmp_path / "m.snet").write_text("model Noise { input x: f32[N, 8]  target y: class[N] of 2\n"
                                         "  logits = dense(relu(dense(x, 256)), 2)\n  output p = softmax(logits)\n"
                                         "  loss cross_entropy(logits, y) }")
        args = ["train", tmp_path / "m.snet", "--data", tmp_path / "noise.npz", "--lr", "0.5", "--epochs", "30"]
    else:
        args = ["train", ROOT / "examples" / "graph_families.snet", "--data", "graph_families", "--epochs", "4",
                "--optimizer", "adam", "--lr", "0.005"]     # few, small steps: rounding does not grow to a flip
    args += ["--val-split", "0.2", "--early-stop", "2", "--no-progress"]
    run = mpiexec("-m", "mpi4py", "-m", "structc", *args, "--distributed", "--out", tmp_path / "two.npz")
    assert run.returncode == 0, run.stderr[-3000:]
    assert main([str(a) for a in args] + ["--out", str(tmp_path / "one.npz")]) == 0
    alone = capsys.readouterr().out
    assert _epoch_numbers(run.stdout) == pytest.approx(_epoch_numbers(alone), abs=2e-4), (run.stdout, alone)
    said = [[line for line in text.splitlines() if line.startswith(("validation:", "early stopping:"))]
            for text in (run.stdout, alone)]
    assert said[0] == said[1] and len(said[0]) == 2 and said[0][0].startswith("validation:"), said
    if data == "noise":
        assert "stopped after epoch" in said[0][1]
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    for k in one.files:
        np.testing.assert_allclose(two[k], one[k], rtol=1e-4, atol=1e-5, err_msg=k)


def mpiexec_each(*commands, timeout=120):
    """`structc` with other arguments on each rank (one rank each, MPMD): what
    ranks on hosts with other copies of a file run."""
    each = [["-n", "1", sys.executable, "-m", "mpi4py", "-m", "structc", *map(str, c)] for c in commands]
    return subprocess.run(["mpiexec", *[a for c in each for a in [":", *c]][1:]], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, STRUCTC_NUM_THREADS="1"), cwd=ROOT)


def test_ranks_whose_held_out_or_validation_part_differs_are_refused(tmp_path):
    """A stale copy of the file on one host that differs only in its held-out labels, or
    only in a validation row: each rank evaluates its share of its own copy, so the
    metrics (and early stopping's choice) would mix two data sets. `eval --distributed`
    and `train --distributed` refuse it on every rank, naming rank 1."""
    _need_mpi()
    from structc.cli import main
    from structc.train import _parts
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    (tmp_path / "m.snet").write_text("model Lin { input x: f32[N, 8]  target y: class[N] of 2\n  logits = dense(x, 2)\n"
                                     "  output p = softmax(logits)\n  loss cross_entropy(logits, y) }")
    np.savez(tmp_path / "d.npz", x_train=x[:100], y_train=y[:100], x_test=x[100:], y_test=y[100:])
    np.savez(tmp_path / "test.npz", x_train=x[:100], y_train=y[:100], x_test=x[100:], y_test=1 - y[100:])
    shifted = x[:100].copy()
    shifted[_parts(y[:100], 0.2, 0, "examples")[1][0]] += 1         # a validation row
    np.savez(tmp_path / "val.npz", x_train=shifted, y_train=y[:100], x_test=x[100:], y_test=y[100:])
    model, params, out = tmp_path / "m.snet", tmp_path / "p.npz", tmp_path / "t.npz"
    assert main(["train", str(model), "--data", str(tmp_path / "d.npz"), "--epochs", "2", "--out", str(params)]) == 0
    train = ["train", model, "--epochs", "2", "--no-progress", "--distributed", "--out", out]
    for stale, command in (("test", train), ("val", [*train, "--val-split", "0.2"]),
                           ("test", ["eval", model, "--params", params, "--distributed"])):
        run = mpiexec_each(*([*command, "--data", tmp_path / name] for name in ("d.npz", f"{stale}.npz")))
        assert run.returncode != 0 and "accuracy" not in run.stdout, (command, run.stdout)
        part = "held-out" if stale == "test" else "training"
        assert f"rank 1 loaded other {part} data than rank 0" in run.stderr, (command, run.stderr[-3000:])
        assert not out.exists()


def test_ranks_that_resume_different_checkpoints_are_refused_before_training(tmp_path):
    """--resume read from a stale copy of the run on one host (the state of epoch 1 on
    rank 1, of epoch 2 on rank 0): its shuffling and epoch count are its own, so the
    ranks' shares would be of different batches, and rank 1 would wait for one more
    epoch than rank 0 trains. Refused on every rank, naming rank 1, before any step."""
    _need_mpi()
    from structc.cli import main
    args = [str(ROOT / "examples" / "digits_mlp.snet"), "--data", "digits", "--no-progress"]
    for host, epochs in (("h0", "2"), ("h1", "1")):
        (tmp_path / host).mkdir()
        assert main(["train", *args, "--epochs", epochs, "--out", str(tmp_path / host / "run.npz")]) == 0
    run = mpiexec_each(*(["train", *args, "--epochs", "4", "--distributed", "--resume", tmp_path / host / "run.npz"]
                         for host in ("h0", "h1")))
    assert run.returncode != 0 and "epoch   3/4" not in run.stdout, run.stdout
    assert "rank 1 would train another run than rank 0 (rank 1: from epoch 2, rank 0: from epoch 3" in run.stderr, \
        run.stderr[-3000:]
    assert (tmp_path / "h0" / "run.metrics.jsonl").read_text().count("\n") == 2     # left as it was


def test_cli_says_a_refusal_once_on_two_ranks(tmp_path):
    """A model that cannot be trained data-parallel is refused on every rank alike:
    rank 0 says why, once, and the job fails."""
    _need_mpi()
    run = mpiexec("-m", "mpi4py", "-m", "structc", "train", ROOT / "examples" / "lenet5_bn.snet", "--data",
                  "digits", "--epochs", "1", "--distributed", "--out", tmp_path / "bn.npz", timeout=120)
    assert run.returncode != 0
    assert run.stderr.count("cannot be trained data-parallel") == 1, run.stderr[-3000:]
    assert not (tmp_path / "bn.npz").exists()


def test_cli_without_mpi4py_says_what_to_install(monkeypatch, capsys):
    from structc.cli import main
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    code = main(["train", str(ROOT / "examples" / "digits_mlp.snet"), "--data", "digits", "--distributed"])
    assert code == 1 and "pip install 'structc[mpi]'" in capsys.readouterr().err


def test_cli_refuses_to_split_one_graph(tmp_path, capsys):
    pytest.importorskip("mpi4py")
    from structc.cli import main
    code = main(["train", str(ROOT / "examples" / "karate_gcn.snet"), "--data", "karate", "--distributed",
                 "--out", str(tmp_path / "k.npz")])
    assert code == 1 and "docs/DISTRIBUTED.md" in capsys.readouterr().err


# -- without MPI -------------------------------------------------------------------

def test_split_dense_is_a_shared_seeded_partition():
    parts = [split_dense(11, r, 3, seed=5) for r in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(11))
    assert [len(p) for p in parts] == [4, 4, 3]
    assert np.array_equal(parts[1], split_dense(11, 1, 3, seed=5))
    assert not np.array_equal(np.concatenate(parts), np.arange(11))


def test_balance_gives_the_largest_first_to_the_least_loaded():
    costs = [3, 50, 2, 40, 45, 41, 44]       # 2 small items, 5 large
    parts = balance(costs, 2)
    loads = [sum(costs[k] for k in p) for p in parts]
    assert sorted(sum(parts, [])) == list(range(7))
    # 50 -> 0, 45 -> 1, 44 -> 1 (45 < 50), 41 -> 0, 40 -> 1, 3 -> 0, 2 -> 0
    assert parts == [[0, 1, 2, 5], [3, 4, 6]] and loads == [96, 129]
    assert balance([], 2) == [[], []] and balance([1], 3) == [[0], [], []]


def test_an_epoch_sharded_at_once_is_each_batch_sharded_alone():
    """balance_batches / shard_epoch (all of an epoch's batches at once) give what
    balance / shard give batch by batch, ties, a short last batch and a batch past
    the data included."""
    rng = np.random.default_rng(4)
    for trial in range(60):
        n, batch, size = int(rng.integers(1, 90)), int(rng.integers(1, 20 if trial % 3 else 150)), int(rng.integers(1, 6))
        costs = rng.integers(0, 5, size=n).astype(float) if trial % 2 else rng.random(n)
        owner = balance_batches(costs, batch, size)
        for at in range(0, n, batch):
            for r, part in enumerate(balance(costs[at:at + batch], size)):
                assert np.flatnonzero(owner[at:at + batch] == r).tolist() == part
        order = rng.permutation(n) + 7                       # item ids, not positions
        by_id = np.zeros(n + 7)
        by_id[order] = costs
        for rank in range(size):
            dp = type("DP", (), {"rank": rank, "size": size, "shard_items": lambda self, c: balance(c, size)[rank]})()
            for cost_table in (by_id, None):
                whole = shard_epoch(dp, order, batch, cost_table)
                alone = [shard(dp, order[at:at + batch], cost_table) for at in range(0, n, batch)]
                assert len(whole) == len(alone) and all(np.array_equal(a, b) for a, b in zip(whole, alone))


def test_lpt_owners_refuses_arrays_of_another_type_or_shape():
    from structc._runtime import lpt_owners
    ranked, owner = np.zeros((2, 3)), np.zeros((2, 3), np.int64)
    for bad in ((ranked.astype(np.float32), 2, owner), (ranked, 2, owner[:1]), (ranked, 2, owner.astype(np.int32)),
                (ranked[0], 2, owner[0])):
        with pytest.raises(TypeError):
            lpt_owners(*bad)
    with pytest.raises(ValueError):
        lpt_owners(ranked, 0, owner)


@pytest.mark.parametrize("example, want", [
    ("digits_mlp", {"kind": "mean", "dims": ["N"], "factor": 1.0}),
    ("perceptron", {"kind": "mean", "dims": ["N"], "factor": 10.0}),
    ("graph_families", {"kind": "mean", "dims": ["g.graphs"], "factor": 1.0}),
    ("karate_gcn", {"kind": "weights", "input": "train"}),
    ("logic_tree", {"kind": "terms", "terms": [{"kind": "mean", "dims": ["t.trees"], "factor": 1.0},
                                               {"kind": "mean", "dims": ["t.nodes"], "factor": 1.0}]}),
])
def test_the_compiler_records_the_loss_denominator(example, want):
    net = structc.compile(ROOT / "examples" / f"{example}.snet")
    assert net.meta["loss_denominator"] == want


def test_terms_with_different_denominators_are_weighed_one_by_one():
    """A mean over trees plus a mean over nodes (and a penalty): each term gets a weight
    (1 unless set), and splitting the terms by their weights gives the whole gradient."""
    net = structc.compile(ROOT / "examples" / "logic_tree.snet")
    parts = _terms_one_by_one(net, "logic", 16, rtol=1e-5, atol=1e-7)
    assert not np.any(parts[0][1]["root.w"]) and not np.any(parts[1][1]["node.w"])


def _terms_one_by_one(net, dataset: str, batch: int, rtol: float, atol: float) -> list:
    """The loss and gradient of a batch with each of the first two terms' weights
    set to 0 in turn (its hyper-parameter slot to 1): the two add up to the whole."""
    from structc.ops.optim import LOSS_WEIGHT0
    data = __import__("structc.datasets", fromlist=["load"]).load(dataset).bind(net)
    feed = next(iter(data.batches(batch, np.random.default_rng(0))))
    loss, whole = net.grad(**feed)
    parts = []
    for off in (0, 1):
        net._hyper[LOSS_WEIGHT0 + off] = 1.0           # that term's weight 0
        parts.append(net.grad(**feed))
        net._hyper[LOSS_WEIGHT0 + off] = 0.0
    assert loss == pytest.approx(parts[0][0] + parts[1][0], rel=1e-6)
    for k in whole:
        np.testing.assert_allclose(parts[0][1][k] + parts[1][1][k], whole[k], rtol=rtol, atol=atol, err_msg=k)
    return parts


def test_terms_of_one_shape_share_a_kernel_yet_are_weighed_one_by_one():
    """Two cross-entropies of the same shape (the sentiment Tree-LSTM's per-sentence
    and per-phrase losses) read their weights' slots at run time, so their gradient
    is one kernel, compiled once; each term is still weighed by its own slot."""
    from structc import api
    from structc.model import Net
    from structc.native import JitModule, host_target
    path = ROOT / "examples" / "sentiment_treelstm.snet"
    art = api.compile_artifact(path.read_text(), str(path), cache=False, parts=["forward", "training"])
    assert len(re.findall(r'^define [^@]*@"sc_\w+_xentgrad"', art.llvm_ir, re.M)) == 1
    net = Net(art.meta, JitModule(art.object, host_target()))     # the artifact read above, not a second compile
    parts = _terms_one_by_one(net, "sentiment", 8, rtol=1e-4, atol=1e-6)
    assert not np.any(parts[0][1]["root.w"]) and np.any(parts[0][1]["node.w"])
    assert not np.any(parts[1][1]["node.w"]) and np.any(parts[1][1]["root.w"])


#: a tree model with a target per tree and one per node; its losses are written after it
ROOTS_AND_NODES = """
model RootsAndNodes {
  input  t: forest(arity=2) of word(vocab=5)
  target y: class[t.trees] of 2
  target s: class[t.nodes] of 2
  param  E: embedding(5, 4)
  rec h(n) = leaf: E[n.word]
             node: tanh(dense(concat(h(n.children)), 4))
  %s
}"""


def test_terms_over_the_same_things_share_a_weight():
    net = structc.compile(ROOTS_AND_NODES % """loss cross_entropy(dense(h(t.root), 2), y)
  loss cross_entropy(dense(h(t.nodes), 2), s)
  loss 0.5 * cross_entropy(dense(h(t.root), 2, name="again"), y) + 0.01 * sum(E * E)""")
    trees, nodes = ({"kind": "mean", "dims": [d], "factor": 1.0} for d in ("t.trees", "t.nodes"))
    assert net.meta["loss_denominator"] == {"kind": "terms", "terms": [trees, nodes, {"kind": "params"}]}


def test_a_plain_sum_and_a_penalty_are_two_terms():
    """A plain sum's ranks add up; a penalty on parameters added to it must count once,
    not once per rank (before, `sum(...) + 0.01 * sum(w * w)` was one "sum" and 2 ranks
    doubled the penalty's gradient): two terms, the sum's weight 1 on every rank with
    examples, the penalty's 1 on the first."""
    from structc.distributed import _term_weights
    net = structc.compile(ROOTS_AND_NODES.replace("target s: class[t.nodes] of 2", "")
                          % "loss sum(dense(h(t.root), 2)) + 0.01 * sum(E * E)")
    terms = [{"kind": "sum"}, {"kind": "params"}]
    assert net.meta["loss_denominator"] == {"kind": "terms", "terms": terms}
    mean_sum = [{"kind": "mean", "dims": ["N"], "factor": 1.0}, *terms]
    table = np.array([[3.0, 1.0, 0.0], [5.0, 1.0, 0.0], [0.0, 0.0, 0.0]])      # rank 2: no examples
    weights = [_term_weights(table, mean_sum, r).tolist() for r in range(3)]
    assert weights == [[3 / 8, 1.0, 1.0], [5 / 8, 1.0, 0.0], [0.0, 0.0, 0.0]]


def test_a_loss_that_is_not_a_sum_of_means_is_refused():
    pytest.importorskip("mpi4py")
    from structc.distributed import DataParallel
    net = structc.compile(ROOTS_AND_NODES % "loss cross_entropy(dense(h(t.root), 2), y) * "
                                            "cross_entropy(dense(h(t.nodes), 2), s)")
    assert net.meta["loss_denominator"]["kind"] == "unsupported"
    with pytest.raises(ValueError, match="cannot be trained data-parallel with exact gradients"):
        DataParallel(net)


NORMED = """
model Normed {
  input x: f32[N, 4]
  target y: class[N] of 3
  loss cross_entropy(dense(batch_norm(dense(x, 4)) + batch_norm(x, frozen=true), 3), y)
}"""


def test_batch_norm_is_refused_rather_than_normalised_per_rank():
    """Unless every batch-norm layer is frozen: it then normalises with its running
    statistics, constants of the step (the MPI test `frozen_bn` checks the step)."""
    pytest.importorskip("mpi4py")
    from structc.distributed import DataParallel
    with pytest.raises(ValueError, match=r"batch_norm normalises with each rank's own batch statistics \(buffers "
                                         r"bn1.mean, bn1.var\); freeze those layers"):
        DataParallel(structc.compile(NORMED))
    for freeze in (["bn1"], ["bn1.mean", "bn1.var"]):
        net = structc.compile(NORMED, freeze=freeze)
        assert net.meta["buffers"] == ["bn1.mean", "bn1.var", "bn2.mean", "bn2.var"]
        with DataParallel(net) as dp:
            x, y = np.ones((3, 4), np.float32), np.zeros(3, np.int32)
            assert dp.train_step(0.1, x=x, y=y) > 0


#: losses whose per-example terms read a statistic over the batch, each with what it is over
POOLED = {
    "loss cross_entropy(dense(x - mean(x, axes=(0,), keepdims=true), 3), y)": "`sum` over N",
    "loss cross_entropy(dense(x / (max(x) + 9.0), 3), y)": "`max` over N",
    "loss cross_entropy(tanh(x @ (transpose(x) @ x)) @ w, y)": "`matmul` over N",
    "loss 0.5 * mean(square(softmax(sum(x, axes=(1,)))))": "`softmax` over N",
    "loss 0.5 * mean(square(sum(reshape(x, 4, N), axes=(0,))))": "`reshape` over N",
    "loss cross_entropy(x @ w, y) + 0.5 * mean(square(dense(x, 2) - sum(x)))": "`sum` over N",
}
#: and their per-example counterparts (rows normalised, pooled per graph or sequence)
PER_EXAMPLE = ["loss cross_entropy(dense(x - mean(x, axes=(1,), keepdims=true), 3), y)",
               "loss cross_entropy(dense(layer_norm(softmax(x)), 3), y)",
               "loss cross_entropy(x @ w, y) + 0.5 * mean(square(dense(x, 2) - sum(x, axes=(1,), keepdims=true)))",
               "loss 0.5 * mean(square(flatten(reshape(x, N, 2, 2) * 2.0)))"]


@pytest.mark.filterwarnings("ignore::structc.errors.GradientWarning")     # w, where the loss does not read it
@pytest.mark.parametrize("loss", [*POOLED, *PER_EXAMPLE])
def test_a_loss_that_reads_a_statistic_over_the_batch_is_refused(loss):
    """Each rank would compute the statistic over its own shard, so no weighing of the
    ranks' gradients gives the whole batch's (before: the loss's denominator alone
    was read, `mean over N`, and the step was silently another model's)."""
    pytest.importorskip("mpi4py")
    from structc.distributed import DataParallel
    net = structc.compile("model Pooled {\n  input x: f32[N, 4]\n  target y: class[N] of 3\n"
                          f"  param w: f32[4, 3]\n  {loss}\n}}")
    if loss in PER_EXAMPLE:
        assert net.meta["batch_statistic"] is None
        DataParallel(net).close()
        return
    why = f"the loss reads a statistic over the batch ({POOLED[loss]}, line 5), which each rank would compute"
    assert net.meta["batch_statistic"].startswith(why)
    with pytest.raises(ValueError, match="cannot be trained data-parallel with exact gradients: " + re.escape(why)):
        DataParallel(net)


@pytest.mark.parametrize("example, pooled", [("graph_families", None), ("logic_tree", None), ("digits_lstm", None),
                                             ("karate_gat", None), ("lenet5_bn", "`sum` over N, line 12")])
def test_structure_pooled_within_an_example_is_no_statistic_over_the_batch(example, pooled):
    """Aggregations over edges, pooling per graph, recursions over trees and sequences
    combine rows within an example; batch norm's training form combines the batch."""
    net = structc.compile(ROOT / "examples" / f"{example}.snet")
    found = net.meta["batch_statistic"]
    assert found == pooled if pooled is None else pooled in found


def test_rows_of_the_batch_picked_by_ids_given_with_it_are_refused():
    """`h[ids]` reads another example's row (in a shard: another one's); a forest's
    own ids (its roots, `h(t.root)`) pick within an example."""
    pytest.importorskip("mpi4py")
    from structc.distributed import DataParallel
    net = structc.compile("model Picked {\n  input x: f32[N, 4]\n  input ids: class[N] of 3\n"
                          "  target y: class[N] of 3\n  loss cross_entropy(dense(tanh(dense(x, 4))[ids], 3), y)\n}")
    with pytest.raises(ValueError, match=r"statistic over the batch \(`gather_rows` over N, line 5\)"):
        DataParallel(net)
    assert structc.compile(LOGIC_ROOTS).meta["batch_statistic"] is None


def test_statistics_over_the_nodes_of_a_batch_of_graphs_or_trees_are_refused():
    pytest.importorskip("mpi4py")
    from structc.distributed import DataParallel
    graphs = structc.compile("""
model G {
  input g: graph(features=3)
  target y: class[g.graphs] of 2
  h = relu(dense(g.x, 4) + mean(dense(g.x, 4) over g.edges))
  loss cross_entropy(dense(mean(h - mean(h, axes=(0,), keepdims=true) over g.nodes), 2), y)
}""")
    trees = structc.compile(ROOTS_AND_NODES.replace("target s: class[t.nodes] of 2", "")
                            % "loss cross_entropy(dense(h(t.root) - max(h(t.nodes)), 2), y)")
    for net, over in ((graphs, "`sum` over g.nodes, line 6"), (trees, "`max` over t.nodes, line 9")):
        with pytest.raises(ValueError, match=f"statistic over the batch \\({over}\\)"):
            DataParallel(net)


def test_a_penalty_on_parameters_keeps_the_mean_s_denominator():
    net = structc.compile("""
model Penalised {
  input x: f32[N, 4]
  target y: class[N] of 3
  param w: f32[4, 3]
  loss cross_entropy(x @ w, y) + 0.01 * sum(w * w)
}""")
    assert net.meta["loss_denominator"] == {"kind": "mean", "dims": ["N"], "factor": 1.0}


@pytest.mark.parametrize("optimizer, options", [("sgd", {}), ("momentum", {"momentum": 0.8}),
                                                ("adam", {"weight_decay": 0.01})])
def test_grad_into_arena_then_apply_update_is_train_step(optimizer, options, rng):
    a = structc.compile(ROOT / "examples" / "digits_mlp.snet")
    b = structc.compile(ROOT / "examples" / "digits_mlp.snet")
    for net in (a, b):
        net.set_optimizer(optimizer, **options)
    for _ in range(3):
        x, y = rng.random((17, 64)).astype(np.float32), rng.integers(0, 10, 17).astype(np.int32)
        loss = a.train_step(lr=0.05, x=x, y=y)
        got, denominator = b.grad_into_arena(x=x, y=y)
        b.apply_update(lr=0.05)
        assert got == loss and denominator == 17
    for k in a.params:
        assert np.array_equal(a.params[k], b.params[k]), k
    assert np.array_equal(a._state_arena, b._state_arena)


def test_without_mpi4py_the_message_says_what_to_install(monkeypatch):
    from structc import distributed
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(ImportError, match=r"pip install 'structc\[mpi\]'"):
        distributed.mpi()


class _RecordingComm:
    """MPI.COMM_WORLD of this one process, noting each sum of the gradient arena."""

    def __init__(self, comm, log):
        self.comm, self.log = comm, log

    def Allreduce(self, *args, **kwargs):
        self.log.append("Allreduce")
        self.comm.Allreduce(*args, **kwargs)

    def Iallreduce(self, *args, **kwargs):
        self.log.append("Iallreduce")
        return self.comm.Iallreduce(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.comm, name)


def test_train_steps_sums_with_a_blocking_allreduce_after_the_next_feed(rng):
    """One blocking Allreduce per step (MPICH's shared-memory path; Iallreduce + Wait
    ran a slower generic schedule), made after the next feed, also when making that
    feed fails; the losses and parameters are those of train_step after train_step."""
    _need_mpi()
    from structc.distributed import DataParallel, mpi
    nets = [structc.compile(ROOT / "examples" / "digits_mlp.snet") for _ in range(2)]
    log: list[str] = []
    comm = _RecordingComm(mpi().COMM_WORLD, log)
    dps = [DataParallel(net, comm, abort_on_error=False) for net in nets]
    batches = [{"x": rng.random((9, 64)).astype(np.float32), "y": rng.integers(0, 10, 9).astype(np.int32)}
               for _ in range(3)]

    def feeds():
        for k, feed in enumerate(batches):
            log.append(f"feed {k}")
            yield feed
    log.clear()
    lazily = list(dps[0].train_steps(feeds(), lr=0.05))
    assert log == ["feed 0", "feed 1", "Allreduce", "feed 2", "Allreduce", "Allreduce"]
    assert lazily == [dps[1].train_step(0.05, **feed) for feed in batches]
    for k in nets[0].params:
        assert np.array_equal(nets[0].params[k], nets[1].params[k]), k

    def failing():
        yield batches[0]
        raise RuntimeError("no second feed")
    log.clear()
    with pytest.raises(RuntimeError, match="no second feed"):
        list(dps[0].train_steps(failing(), lr=0.05))
    assert log == ["Allreduce"]             # this rank still took part in the step's sum


def test_rank_0_shows_the_epoch_s_progress_on_a_terminal(monkeypatch):
    """distributed.train draws one bar (rank 0's steps are every rank's), as one process does."""
    import io
    pytest.importorskip("mpi4py")
    from structc import datasets
    from structc.distributed import DataParallel, mpi, train
    from structc.train import TrainConfig

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True
    net = structc.compile(ROOT / "examples" / "digits_mlp.snet")
    data = datasets.load("digits").bind(net)
    dp = DataParallel(net, mpi().COMM_SELF)
    for progress in (True, False):
        terminal = Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        train(dp, data, TrainConfig(epochs=1, batch=64, progress=progress), log=lambda *a: None)
        shown = terminal.getvalue()
        assert ("epoch 1/1" in shown and f"/{data.batch_count(64)}" in shown) == progress, shown


def test_feed_dims_are_the_sizes_a_call_binds():
    """What a data-parallel step reads its loss terms' denominators from, before it runs."""
    net = structc.compile(ROOT / "examples" / "logic_tree.snet")
    from structc.forest import Forest
    forest = Forest.from_brackets(["(1 (0 T) (2 and) (1 T))", "(0 F)"], {"T": 0, "F": 1, "and": 2})
    feed = {"t": forest, "y": forest.root_labels, "s": forest.labels}
    dims = net.feed_dims(**feed)
    assert dims["t.trees"] == 2 and dims["t.nodes"] == 5
    bound = {}
    net._run("train", feed, 0, dims_out=bound)
    assert all(bound[k] == v for k, v in dims.items() if k in bound)
    mlp = structc.compile(ROOT / "examples" / "digits_mlp.snet")
    assert mlp.feed_dims(x=np.zeros((7, 64), np.float32), y=np.zeros(7, np.int32)) == {"N": 7}
