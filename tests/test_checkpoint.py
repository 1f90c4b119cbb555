"""`Net.save_checkpoint` / `Net.load_checkpoint`: a Python training loop saved
and continued in a fresh `Net` is the uninterrupted run, bit for bit (every
parameter, batch norm's statistics, the optimizer's moments), whatever the
optimizer and the thread count; files that are not such a checkpoint, or are
another model's, are refused before anything changes."""
import shutil
import warnings

import numpy as np
import pytest

import structc
from structc import _runtime
from structc.checkpoint import CheckpointWarning
from structc.cli import main

# batch norm (running statistics in the parameters) and dropout (masks drawn at the call count)
SRC = """model Ck {
  input  x: f32[N, 64]
  target y: class[N] of 4
  h = dense(x, 256) |> batch_norm |> relu
  loss cross_entropy(dense(dropout(h, 0.3), 4), y)
}"""
OPTIONS = {"sgd": {}, "momentum": {"momentum": 0.8}, "adam": {"beta1": 0.85, "eps": 1e-6}}


def batches(count, n=128, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(n, 64)).astype(np.float32), "y": rng.integers(0, 4, n)} for _ in range(count)]


def configured(optimizer, seed=3):
    net = structc.compile(SRC, seed=seed)
    net.set_optimizer(optimizer, weight_decay=0.01, clip_norm=0.5, **OPTIONS[optimizer])
    net.set_schedule("cosine", warmup=2, decay_steps=4, floor=0.1)
    return net


def assert_same_state(a, b):
    for name in a.params:
        assert np.array_equal(a.params[name], b.params[name]), name
    for key, value in a.optimizer_state().items():
        assert np.array_equal(value, b.optimizer_state()[key]), key


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    """The pool takes every job at 2 threads (no adapting or backing off to the caller alone)."""
    before, adaptive, backoff = structc.get_num_threads(), _runtime.set_adaptive(0), _runtime.set_backoff(0)
    structc.set_num_threads(request.param)
    yield request.param
    structc.set_num_threads(before)
    _runtime.set_adaptive(adaptive)
    _runtime.set_backoff(backoff)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_training_on_from_a_checkpoint_is_the_uninterrupted_run(optimizer, threads, tmp_path):
    """3 steps (and a gradient: dropout draws one more mask than the steps), a checkpoint,
    3 more; against a fresh net of another seed, still on SGD without a schedule, that loads
    the checkpoint and makes the same 3 steps."""
    feeds = batches(6)
    whole = configured(optimizer)
    whole.grad(**feeds[0])
    for feed in feeds[:3]:
        whole.train_step(lr=0.05, **feed)
    path = whole.save_checkpoint(tmp_path / "run")
    assert path == tmp_path / "run.npz"          # a Path in, a Path out, as save_params
    handoffs = _runtime.handoffs()
    losses = [whole.train_step(lr=0.05, **feed) for feed in feeds[3:]]
    assert (_runtime.handoffs() > handoffs) == (threads == 2)     # 2 threads did share the steps

    resumed = structc.compile(SRC, seed=11)
    resumed.load_checkpoint(path)
    assert (resumed.optimizer, resumed.schedule, resumed.seed) == (optimizer, whole.schedule, 3)
    assert [resumed.train_step(lr=0.05, **feed) for feed in feeds[3:]] == losses
    assert_same_state(whole, resumed)
    assert resumed.last_lr == whole.last_lr
    if threads == 2:                # and a checkpoint of 2 threads' run goes on at 1 thread alike
        structc.set_num_threads(1)
        alone = structc.compile(SRC)
        alone.load_checkpoint(path)
        assert [alone.train_step(lr=0.05, **feed) for feed in feeds[3:]] == losses
        assert_same_state(whole, alone)


def test_parameters_alone_are_another_run(tmp_path):
    """Why the checkpoint exists: `save_params`/`load_params` lose Adam's moments and step."""
    feeds = batches(4)
    whole = configured("adam")
    for feed in feeds[:2]:
        whole.train_step(lr=0.05, **feed)
    whole.save_params(tmp_path / "p")
    for feed in feeds[2:]:
        whole.train_step(lr=0.05, **feed)
    params_only = configured("adam")
    params_only.load_params(tmp_path / "p.npz")
    for feed in feeds[2:]:
        params_only.train_step(lr=0.05, **feed)
    assert not np.array_equal(params_only.params["dense1.w"], whole.params["dense1.w"])


def test_the_checkpoint_wins_over_the_nets_own_settings(tmp_path):
    """Optimizer, every option, schedule and dropout key come from the file: a net set
    otherwise (momentum, no schedule, dropout seeded from fresh entropy) takes the file's."""
    saved = configured("adam")
    saved.set_seed(None)            # fresh entropy: only the key words can carry it over
    saved.train_step(lr=0.05, **batches(1)[0])
    saved.save_checkpoint(tmp_path / "c.npz")
    net = structc.compile(SRC, seed=5)
    net.set_optimizer("momentum", momentum=0.5, weight_decay=0.2, decay_biases=False)
    net.load_checkpoint(tmp_path / "c")                 # `.npz` may be left out
    assert (net.optimizer, net.schedule, net.seed) == ("adam", saved.schedule, None)
    assert net._opt == saved._opt
    feed = batches(2, seed=1)[1]
    assert net.train_step(lr=0.05, **feed) == saved.train_step(lr=0.05, **feed)
    assert_same_state(net, saved)


def checkpoint_of(net, path):
    net.train_step(lr=0.05, **batches(1)[0])
    net.save_checkpoint(path)
    return dict(np.load(path))


def rewritten(path, arrays, **changes):
    np.savez(path, **{**arrays, **changes})
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint of an Adam run, and its arrays."""
    path = tmp_path_factory.mktemp("ckpt") / "c.npz"
    return path, checkpoint_of(configured("adam"), path)


def refused(net, path, error=ValueError):
    """The error `load_checkpoint(path)` raises, and that it changed nothing."""
    before = {name: v.copy() for name, v in net.params.items()}, net.optimizer_state(), net.schedule, net.seed
    with pytest.raises(error) as e:
        net.load_checkpoint(path)
    after = {name: v.copy() for name, v in net.params.items()}, net.optimizer_state(), net.schedule, net.seed
    for one, other in zip(before, after):
        if isinstance(one, dict):
            assert one.keys() == other.keys() and all(np.array_equal(one[k], other[k]) for k in one)
        else:
            assert one == other
    return str(e.value)


def test_what_is_not_a_checkpoint_is_refused(saved, tmp_path):
    path, arrays = saved
    net = structc.compile(SRC, seed=1)
    assert "no such checkpoint" in refused(net, tmp_path / "nowhere.npz", FileNotFoundError)
    net.save_params(tmp_path / "p.npz")
    said = refused(net, tmp_path / "p.npz")
    assert "holds parameters only (save_params writes such files), no optimizer state: load it with load_params" in said
    (tmp_path / "cut.npz").write_bytes(path.read_bytes()[:2000])
    assert "damaged (truncated or corrupt)" in refused(net, tmp_path / "cut.npz")
    (tmp_path / "text.npz").write_text("hello")
    assert "not a checkpoint written by save_checkpoint: not an .npz archive" in refused(net, tmp_path / "text.npz")
    header = rewritten(tmp_path / "h.npz", arrays, structc_checkpoint=np.array("{not json"))
    assert "its header is damaged" in refused(net, header)


def test_the_cli_training_state_is_not_a_checkpoint(tmp_path):
    from structc.train import TrainConfig, save_state
    net = structc.compile(SRC)
    save_state(net, tmp_path / "run.train.npz", 1, TrainConfig(), {}, "data")
    assert "structc train --resume" in refused(net, tmp_path / "run.train.npz")


def test_load_params_of_a_checkpoint_names_load_checkpoint(saved):
    with pytest.raises(ValueError, match="load it with load_checkpoint"):
        structc.compile(SRC).load_params(saved[0])


@pytest.mark.parametrize("other, said", [
    (SRC.replace("model Ck", "model Other"), "a checkpoint of model Ck, not Other"),
    (SRC.replace("dense(x, 256)", "dense(x, 128)"), "parameter 'dense1.w' is [64, 256] there, [64, 128] here"),
    (SRC.replace("|> batch_norm ", ""), "parameters missing none, unexpected ['bn1.g', 'bn1.b', 'bn1.mean'"),
])
def test_a_checkpoint_of_another_model_is_refused(saved, other, said):
    assert said in refused(structc.compile(other), saved[0])


def test_a_checkpoint_of_another_frozen_set_is_refused(saved):
    """The moments are laid out by which parameters train: loaded into a net that freezes
    others, they would update the wrong parameters."""
    said = refused(structc.compile(SRC, freeze=["dense1"]), saved[0])
    assert "it froze none, this net freezes ['dense1.b', 'dense1.w']" in said


@pytest.mark.parametrize("key, value, said", [
    ("param/dense1.w", lambda v: np.where(np.arange(v.size).reshape(v.shape) == 7, np.nan, v),
     "parameter 'dense1.w' has 1 value(s) that are not finite in float32 (the first at (0, 7): nan)"),
    ("param/bn1.var", lambda v: np.full_like(v, np.inf), "parameter 'bn1.var' has 256 value(s) that are not finite"),
    ("optimizer_state", lambda v: np.where(np.arange(v.size) == 3, np.inf, v),
     "optimizer array 'optimizer_state' has 1 value(s) that are not finite"),
    ("optimizer_state", lambda v: v[:-1], "optimizer array 'optimizer_state' has shape"),
    ("optimizer", lambda v: np.array("lbfgs"), "unknown optimizer 'lbfgs'"),
    ("optimizer_options", lambda v: np.array('{"beta1": 1.0}'), "optimizer_options: beta1 must be"),
    ("optimizer_step", lambda v: np.int64(-1), "optimizer_step must be one integer >= 0"),
    ("dropout_key", lambda v: v.astype(np.int64), "dropout_key must be two uint32 words"),
])
def test_bad_values_are_refused(saved, tmp_path, key, value, said):
    path, arrays = saved
    bad = rewritten(tmp_path / "bad.npz", arrays, **{key: value(arrays[key])})
    assert said in refused(structc.compile(SRC), bad)


def test_an_edited_model_of_the_same_parameters_loads_with_a_warning(saved):
    edited = structc.compile(SRC.replace("dropout(h, 0.3)", "dropout(h, 0.5)"))
    with pytest.warns(CheckpointWarning, match="definition differs"):
        edited.load_checkpoint(saved[0])
    assert edited.optimizer == "adam"


def test_a_model_without_a_loss_has_no_checkpoint(tmp_path):
    net = structc.compile("model Fwd { input x: f32[N, 4]\n output y = dense(x, 3) }")
    for call in (net.save_checkpoint, net.load_checkpoint):
        with pytest.raises(TypeError, match="declares no loss, so it has no training to checkpoint: save_params"):
            call(tmp_path / "f.npz")
    assert not (tmp_path / "f.npz").exists()


def test_an_earlier_versions_training_state_still_resumes(tmp_path):
    """`structc train`'s NAME.train.npz of earlier versions: no `optimizer` entry (the
    config names it), and older still no draw count nor options."""
    from structc.train import TrainConfig, load_state, restore_optimizer, save_state
    feeds = batches(3)
    first = configured("momentum")
    for feed in feeds[:2]:
        first.train_step(lr=0.05, **feed)
    save_state(first, tmp_path / "new.train.npz", 1, TrainConfig(optimizer="momentum"), {}, "data")
    arrays = dict(np.load(tmp_path / "new.train.npz"))
    for older in (["optimizer"], ["optimizer", "dropout_draws", "optimizer_options"]):
        np.savez(tmp_path / "old.train.npz", **{k: v for k, v in arrays.items() if k not in older})
        resumed = structc.compile(SRC, seed=3)
        resumed.set_schedule(**first.schedule)
        resumed.set_optimizer(weight_decay=0.01, clip_norm=0.5, momentum=0.8)    # what `configure` sets
        resumed.load_params(first.save_params(tmp_path / "p.npz"))
        assert restore_optimizer(resumed, load_state(tmp_path / "old.train.npz"))
        want = first.optimizer_state()
        want["dropout_draws"] = want["optimizer_step"] if "dropout_draws" in older else want["dropout_draws"]
        got = resumed.optimizer_state()
        assert all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_a_shipped_library_checkpoints_as_a_compiled_net(tmp_path):
    """A library of `structc compile -o` trains on from a checkpoint as a `Net` of
    `structc.compile` does, and each loads the other's."""
    (tmp_path / "ck.snet").write_text(SRC)
    assert main(["compile", str(tmp_path / "ck.snet"), "-o", str(tmp_path / "ck.so")]) == 0
    feeds = batches(4)
    shipped = structc.load(tmp_path / "ck.so", seed=3)
    shipped.set_optimizer("adam", weight_decay=0.01)
    for feed in feeds[:2]:
        shipped.train_step(lr=0.05, **feed)
    shipped.save_checkpoint(tmp_path / "s.npz")
    losses = [shipped.train_step(lr=0.05, **feed) for feed in feeds[2:]]
    again = structc.load(tmp_path / "ck.so")
    again.load_checkpoint(tmp_path / "s.npz")
    assert [again.train_step(lr=0.05, **feed) for feed in feeds[2:]] == losses
    assert_same_state(again, shipped)
    compiled = structc.compile(SRC)
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # the same model: no CheckpointWarning
        compiled.load_checkpoint(tmp_path / "s.npz")
    compiled.save_checkpoint(tmp_path / "c.npz")
    again.load_checkpoint(tmp_path / "c.npz")
    assert_same_state(again, compiled)
    # a library without its training entries: a model with a loss, so its checkpoints still load
    assert main(["compile", str(tmp_path / "ck.snet"), "-o", str(tmp_path / "inference.so"), "--inference"]) == 0
    inference = structc.load(tmp_path / "inference.so")
    inference.load_checkpoint(tmp_path / "c.npz")
    assert_same_state(inference, compiled)


def test_a_resumed_run_with_damaged_moments_is_a_clear_error(tmp_path, capsys):
    """`structc train --resume` restores the optimizer through `Net.set_optimizer_state`,
    which refuses moments that are not finite: an error naming them, not a NaN run."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 64)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x_train=x[:64], y_train=rng.integers(0, 4, 64), x_test=x[64:],
             y_test=rng.integers(0, 4, 16))
    (tmp_path / "ck.snet").write_text(SRC)
    run = ["train", str(tmp_path / "ck.snet"), "--data", str(tmp_path / "d.npz"), "--optimizer", "adam",
           "--no-progress", "--out", str(tmp_path / "run.npz")]
    assert main(run + ["--epochs", "1"]) == 0
    state = dict(np.load(tmp_path / "run.train.npz"))
    state["optimizer_state"][5] = np.nan
    np.savez(tmp_path / "run.train.npz", **state)
    capsys.readouterr()
    assert main(run + ["--epochs", "2", "--resume", str(tmp_path / "run.npz")]) == 1
    assert ("cannot resume: the run's optimizer state is damaged: optimizer array 'optimizer_state' has 1 "
            "value(s) that are not finite" in capsys.readouterr().err)


TREES = """model Words {
  input  t: forest(arity=2) of word(vocab=6)
  target y: class[t.trees] of 2
  param  E: embedding(6, 8) = normal(0.3)
  rec h(n) = leaf: E[n.word]
             node: tanh(dense(concat(h(n.children)), 8))
  loss cross_entropy(dense(h(t.root), 2), y)
}"""
SENTENCES = ["((good movie) (bad plot))", "(fine (good plot))", "(bad movie)"]


@pytest.fixture
def words_checkpoint(tmp_path):
    """A checkpoint of a net trained on words, and that net's outputs for SENTENCES."""
    from structc.forest import Vocab
    net = structc.compile(TREES, seed=1, vocab=Vocab.build(["good", "movie", "bad", "plot"], unk="<unk>"))
    net.set_optimizer("adam")
    net.train_step(t=SENTENCES, y=np.array([1, 1, 0], np.int32), lr=0.1)
    net.numbering = {"labels": ["negative", "positive"]}
    path = net.save_checkpoint(tmp_path / "words")
    return path, net.vocab, net(t=SENTENCES)


def test_the_vocabulary_comes_with_the_checkpoint(words_checkpoint):
    """The embedding's rows are the ids' of the words it was trained on: a net that
    loads the checkpoint reads words with them (the unknown-word id too)."""
    path, vocab, outputs = words_checkpoint
    net = structc.compile(TREES, seed=2)
    net.load_checkpoint(path)
    assert dict(net.vocab) == dict(vocab) and net.vocab.unk == vocab.unk == 4
    assert net.numbering == {"labels": ["negative", "positive"]}
    assert np.array_equal(net(t=SENTENCES), outputs)


def test_a_nets_other_vocabulary_is_replaced_with_a_warning(words_checkpoint):
    path, vocab, outputs = words_checkpoint
    net = structc.compile(TREES, seed=2, vocab={"plot": 0, "bad": 1, "movie": 2, "good": 3, "fine": 4})
    with pytest.warns(CheckpointWarning, match="net.vocab replaced by the checkpoint's 5 words"):
        net.load_checkpoint(path)
    assert dict(net.vocab) == dict(vocab)
    assert np.array_equal(net(t=SENTENCES), outputs)


@pytest.mark.parametrize("vocab, said", [
    ({"words": [["good", 9]], "unk": None}, "outside [0, 6)"),
    ({"words": [["good", 0], ["good", 1]], "unk": None}, "a word twice"),
    ({"words": "good", "unk": None}, "the saved vocabulary is damaged"),
    ({"unk": 1}, "the saved vocabulary is damaged"),
])
def test_a_damaged_vocabulary_is_refused(words_checkpoint, tmp_path, vocab, said):
    import json
    path, _, _ = words_checkpoint
    arrays = dict(np.load(path))
    header = json.loads(str(arrays["structc_checkpoint"]))
    bad = rewritten(tmp_path / "bad.npz", arrays, structc_checkpoint=np.array(json.dumps({**header, "vocab": vocab})))
    net = structc.compile(TREES, seed=2)
    assert said in refused(net, bad)
    assert net.vocab is None
