"""Parameters at the Python boundary: assignment, checkpoints, hyper-parameters, non-finite losses."""
import zipfile

import numpy as np
import pytest

import structc

MLP = """
model P {
  input  x: f32[N, 4]
  target y: class[N] of 3
  loss cross_entropy(dense(dense(x, 5) |> tanh, 3), y)
}
"""


@pytest.fixture
def net():
    return structc.compile(MLP, seed=1)


def feed(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, 4)).astype(np.float32), "y": rng.integers(0, 3, n)}


# -- net.params[name] = array ------------------------------------------------------

def test_assignment_copies_into_the_running_model(net, tmp_path):
    f = feed()
    view = net.params["dense1.w"]
    net.params["dense1.w"] = np.zeros((4, 5))              # float64 in, converted
    assert net.params["dense1.w"] is view                  # still the arena's view
    assert not view.any()
    other = structc.compile(MLP, seed=7)
    other.params["dense1.w"][...] = 0
    for name in net.params:
        if name != "dense1.w":
            other.params[name] = net.params[name]
    np.testing.assert_array_equal(net(x=f["x"]), other(x=f["x"]))   # native code sees the new weights
    saved = net.save_params(tmp_path / "p.npz")
    with np.load(saved) as data:
        assert not data["dense1.w"].any()


@pytest.mark.parametrize("value, error, message", [
    (np.zeros((5, 4)), ValueError, r"shape \(5, 4\), the model expects \(4, 5\)"),
    (np.zeros((4, 5), np.complex64), TypeError, "complex"),
    (np.full((4, 5), np.nan), ValueError, "not finite"),
    (np.full((4, 5), 1e39), ValueError, "not finite in float32"),
    (np.array([["a"] * 5] * 4), TypeError, "must be numbers"),
])
def test_assignment_is_checked(net, value, error, message):
    before = net.params["dense1.w"].copy()
    with pytest.raises(error, match=message):
        net.params["dense1.w"] = value
    np.testing.assert_array_equal(net.params["dense1.w"], before)


def test_names_are_fixed_and_misspellings_suggest(net):
    with pytest.raises(KeyError, match="did you mean 'dense1.w'"):
        net.params["dense1.W"] = np.zeros((4, 5))
    with pytest.raises(KeyError, match="dense2.b"):
        net.params["dense2.bb"]
    with pytest.raises(TypeError, match="cannot delete"):
        del net.params["dense1.w"]
    assert "dense1.w" in net.params and "nope" not in net.params and net.params.get("nope") is None
    assert sorted(net.params) == ["dense1.b", "dense1.w", "dense2.b", "dense2.w"]


# -- save_params / load_params ---------------------------------------------------

def test_save_params_returns_the_path_numpy_wrote_and_load_accepts_both(net, tmp_path):
    written = net.save_params(str(tmp_path / "weights"))
    assert written == str(tmp_path / "weights.npz")
    assert (tmp_path / "weights.npz").exists()
    other = structc.compile(MLP, seed=5)
    other.load_params(tmp_path / "weights")                 # without the suffix numpy added
    for name in net.params:
        np.testing.assert_array_equal(other.params[name], net.params[name])
    assert net.save_params(tmp_path / "w.npz") == tmp_path / "w.npz"


def test_save_params_replaces_the_file_whole_and_follows_no_planted_link(net, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (tmp_path / "w.npz").symlink_to(victim)               # a link planted where the checkpoint goes
    net.save_params(tmp_path / "w.npz")
    assert victim.read_text() == "keep me"
    assert not (tmp_path / "w.npz").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim", "w.npz"]   # no temporary left behind
    with np.load(tmp_path / "w.npz") as data:
        assert sorted(data.files) == sorted(net.params)


def test_load_params_is_all_or_nothing(net, tmp_path):
    good = {k: np.ones_like(v) for k, v in net.params.items()}
    before = {k: v.copy() for k, v in net.params.items()}
    for bad in ({**good, "dense2.w": np.ones((5, 3), np.complex64)},
                {**good, "dense2.w": np.full((5, 3), np.nan)},
                {**good, "dense2.w": np.ones((3, 5))}):
        np.savez(tmp_path / "bad.npz", **bad)
        with pytest.raises((ValueError, TypeError), match="bad.npz: parameter 'dense2.w'"):
            net.load_params(tmp_path / "bad.npz")
        for k, v in before.items():
            np.testing.assert_array_equal(net.params[k], v, err_msg=k)


def test_load_params_names_the_file_and_the_problem(net, tmp_path):
    net.save_params(tmp_path / "ok.npz")
    raw = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "empty.npz").write_bytes(b"")
    np.save(tmp_path / "one.npy", np.zeros(3))
    (tmp_path / "text.npz").write_text("hello")
    for name in ("truncated.npz", "empty.npz", "one.npy", "text.npz"):
        with pytest.raises(ValueError, match=name) as e:
            net.load_params(tmp_path / name)
        assert not isinstance(e.value, zipfile.BadZipFile)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        net.load_params(tmp_path / "missing.npz")


def test_load_params_refuses_a_damaged_member(net, tmp_path):
    """A zip whose directory is intact but whose member data is cut short."""
    net.save_params(tmp_path / "ok.npz")
    raw = bytearray((tmp_path / "ok.npz").read_bytes())
    with zipfile.ZipFile(tmp_path / "ok.npz") as z:
        info = z.getinfo("dense2.w.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 128   # inside the array data
    raw[start:start + 16] = b"\xff" * 16                        # the CRC no longer matches
    (tmp_path / "crc.npz").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="crc.npz"):
        net.load_params(tmp_path / "crc.npz")


# -- hyper-parameters and non-finite losses ----------------------------------------

@pytest.mark.parametrize("call, message", [
    (lambda n: n.train_step(lr=1e39, **feed()), "lr must be a finite float32"),
    (lambda n: n.train_step(lr=-1.0, **feed()), "lr must be"),
    (lambda n: n.train_step(lr=float("nan"), **feed()), "lr must be"),
    (lambda n: n.set_optimizer("adam", eps=1e40), "eps must be"),
    (lambda n: n.set_optimizer("momentum", momentum=1.5), "momentum must be"),
    (lambda n: n.set_optimizer("adam", beta2=1.0), "beta2 must be"),
    # below 1 in float64, 1.0 in float32 (what native code reads): Adam's v would stay 0 and
    # each step move by lr * m / eps; momentum would never forget; Adam's m would stay 0
    (lambda n: n.set_optimizer("adam", beta2=0.99999999), "beta2 must be .* 1.0 in float32"),
    (lambda n: n.set_optimizer("adam", beta1=1 - 1e-9), "beta1 must be .* 1.0 in float32"),
    (lambda n: n.set_optimizer("momentum", momentum=0.99999999), "momentum must be .* 1.0 in float32"),
    (lambda n: n.set_optimizer("adam", weight_decay=-1), "weight_decay must be"),
])
def test_hyper_parameters_are_checked_in_float32(net, call, message):
    before = {k: v.copy() for k, v in net.params.items()}
    with pytest.raises(ValueError, match=message):
        call(net)
    for k, v in before.items():
        np.testing.assert_array_equal(net.params[k], v)


def test_a_derived_hyper_parameter_that_overflows_is_refused(net):
    net.set_optimizer("adam", beta1=0.999)
    with pytest.raises(ValueError, match="overflow float32 at step 1"):
        net.train_step(lr=1e36, **feed())                   # lr / (1 - beta1) > float32 max
    assert np.isfinite(net.train_step(lr=1e-3, **feed()))


def test_check_finite_names_the_step(net):
    f = feed()
    bad = {**f, "x": np.full_like(f["x"], np.nan)}
    assert np.isnan(net.train_step(lr=0.1, **bad))          # the default: returned, as documented
    net.init_params(1)
    net.train_step(lr=0.1, **f)
    with pytest.raises(FloatingPointError, match="loss is nan at step 2"):
        net.train_step(lr=0.1, check_finite=True, **bad)
    net.check_finite = True
    with pytest.raises(FloatingPointError, match="at step 3"):
        net.train_step(lr=0.1, **bad)
    net.init_params(1)
    assert np.isfinite(net.train_step(lr=0.1, **f))
