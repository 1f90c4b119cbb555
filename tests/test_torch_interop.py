"""PyTorch interop (`structc.torch`): the same weights give the same outputs in
both; layouts are converted, and every mapping mistake is named before any
parameter changes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import structc

pytestmark = pytest.mark.slow   # launches processes or compiles many models: not in the fast subset

torch = pytest.importorskip("torch", reason="PyTorch interop needs torch (CPU build: pip install torch==2.13.0)")
st = pytest.importorskip("structc.torch")
nn = torch.nn

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MLP_LAYERS = {"dense1": "0", "dense2": "2", "dense3": "4"}


def mlp() -> "nn.Sequential":
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


class LeNet5(nn.Module):
    """examples/lenet5.snet, with the same layer names."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5)
        self.dense1, self.dense2, self.dense3 = nn.Linear(256, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):
        f = nn.functional
        h = f.max_pool2d(f.relu(self.conv1(x)), 2)
        h = f.max_pool2d(f.relu(self.conv2(h)), 2)
        h = f.relu(self.dense2(f.relu(self.dense1(h.flatten(1)))))
        return self.dense3(h)


def torch_probs(module, x: np.ndarray) -> np.ndarray:
    """The module's logits as probabilities, as structc's classifiers return them."""
    with torch.no_grad():
        return torch.softmax(module(torch.from_numpy(x)), -1).numpy()


def test_digits_mlp_from_a_sequential_gives_its_outputs():
    net, seq = structc.compile(EXAMPLES / "digits_mlp.snet"), mlp()
    st.load_state_dict(net, seq, mapping=MLP_LAYERS)
    np.testing.assert_allclose(net.params["dense1.w"], seq[0].weight.detach().numpy().T)   # [out, in] -> [in, out]
    x = np.random.default_rng(0).random((7, 64), dtype=np.float32)
    np.testing.assert_allclose(net(x=x), torch_probs(seq, x), rtol=1e-4, atol=1e-6)


def test_lenet5_by_matching_names_gives_its_outputs():
    net, module = structc.compile(EXAMPLES / "lenet5.snet"), LeNet5()
    st.load_state_dict(net, module.state_dict())       # conv1.weight -> conv1.w, ...: no mapping needed
    x = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
    np.testing.assert_allclose(net(x=x), torch_probs(module, x), rtol=1e-4, atol=1e-6)


def test_state_dict_round_trips_into_pytorch():
    net = structc.compile(EXAMPLES / "lenet5.snet", seed=4)
    module = LeNet5()
    module.load_state_dict(st.state_dict(net))          # strict: every name and shape as PyTorch expects
    x = np.random.default_rng(1).random((3, 1, 28, 28), dtype=np.float32)
    np.testing.assert_allclose(torch_probs(module, x), net(x=x), rtol=1e-4, atol=1e-6)
    sd = st.state_dict(net, mapping={"dense1.w": "fc.weight"} | {k: k for k in ("conv1", "conv2", "dense2", "dense3")}
                       | {"dense1.b": "fc.bias"})
    assert tuple(sd["fc.weight"].shape) == (120, 256) and "dense2.weight" in sd


def test_conv1d_and_embedding_layouts_are_unchanged():
    net = structc.compile("model M { input s: f32[N, 3, 10]\n input w: class[N] of 7\n param E: embedding(7, 4)\n"
                          " output o = concat(flatten(conv1d(s, 2, kernel=3, stride=2)), E[w], axis=1) }")
    torch.manual_seed(2)
    conv, emb = nn.Conv1d(3, 2, 3, stride=2), nn.Embedding(7, 4)
    st.load_state_dict(net, {"conv1.weight": conv.weight, "conv1.bias": conv.bias, "E": emb.weight})
    rng = np.random.default_rng(0)
    s, w = rng.normal(size=(4, 3, 10)).astype(np.float32), np.array([0, 6, 2, 2], np.int32)
    with torch.no_grad():
        want = torch.cat([conv(torch.from_numpy(s)).flatten(1), emb(torch.from_numpy(w).long())], 1).numpy()
    np.testing.assert_allclose(net(s=s, w=w), want, rtol=1e-5, atol=1e-6)


def snapshot(net) -> dict:
    return {k: np.array(v) for k, v in net.params.items()}


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.pop("4.bias"), r"the state dict has no '4.bias' \(for 'dense3.b'\)"),
    (lambda sd: sd.__setitem__("5.weight", torch.zeros(3)), r"PyTorch tensors \['5.weight'\] are not mapped"),
    (lambda sd: sd.__setitem__("0.weight", torch.zeros(100, 64)),
     r"'0.weight' has shape \(100, 64\) \(transposed.*\), but 'dense1.w' is \(64, 128\)"),
    (lambda sd: sd.__setitem__("2.bias", torch.full((64,), float("nan"))), r"not finite"),
])
def test_mistakes_are_named_and_nothing_changes(change, message):
    net = structc.compile(EXAMPLES / "digits_mlp.snet")
    before = snapshot(net)
    sd = dict(mlp().state_dict())
    change(sd)
    with pytest.raises(ValueError, match=message):
        st.load_state_dict(net, sd, mapping=MLP_LAYERS)
    assert all(np.array_equal(before[k], v) for k, v in net.params.items())


def test_mapping_must_cover_every_parameter_once():
    net = structc.compile(EXAMPLES / "digits_mlp.snet")
    with pytest.raises(ValueError, match=r"no PyTorch tensor mapped to \['dense3.w', 'dense3.b'\]"):
        st.load_state_dict(net, mlp(), mapping={"dense1": "0", "dense2": "2"})
    with pytest.raises(ValueError, match=r"'2.weight' is mapped to both 'dense2.w' and 'dense3.w'"):
        st.load_state_dict(net, mlp(), mapping={"dense1": "0", "dense2": "2", "dense3.w": "2.weight",
                                                "dense3.b": "4.bias"})
    with pytest.raises(ValueError, match=r"mapping names \['dense4'\], which are neither parameters nor layers"):
        st.load_state_dict(net, mlp(), mapping={**MLP_LAYERS, "dense4": "6"})
    with pytest.raises(ValueError, match=r"names structc parameter 'dense1.w' twice"):
        st.load_state_dict(net, mlp(), mapping={**MLP_LAYERS, "dense1.w": "0.weight"})


def test_without_a_mapping_a_sequential_is_refused_with_a_hint():
    net = structc.compile(EXAMPLES / "digits_mlp.snet")
    with pytest.raises(ValueError, match=r"e.g. \{'dense1': '0'\}"):
        st.load_state_dict(net, mlp())


def test_integer_tensors_are_refused():
    net = structc.compile(EXAMPLES / "digits_mlp.snet")
    sd = dict(mlp().state_dict())
    sd["0.bias"] = torch.zeros(128, dtype=torch.int64)
    with pytest.raises(TypeError, match="'0.bias' is torch.int64"):
        st.load_state_dict(net, sd, mapping=MLP_LAYERS)


def test_dense_inside_a_recursion_gets_linears_layout():
    """The node case's `dense` lives in a sub-graph of the model's graph."""
    net = structc.compile(EXAMPLES / "logic_tree.snet")
    sd = st.state_dict(net)
    cell = nn.Linear(3 * 48, 48)
    cell.load_state_dict({"weight": sd["dense1.weight"], "bias": sd["dense1.bias"]})
    np.testing.assert_array_equal(cell.weight.detach().numpy().T, net.params["dense1.w"])
    st.load_state_dict(net, sd)                          # and back: the same values
    np.testing.assert_array_equal(st.state_dict(net)["dense1.weight"].numpy(), sd["dense1.weight"].numpy())


def test_karate_gcn_from_linear_layers_gives_a_dense_gcns_outputs():
    """A GCN written in plain PyTorch: D^-1/2 (A + I) D^-1/2 (h W^T + b)."""
    import networkx as nx
    net = structc.compile(EXAMPLES / "karate_gcn.snet")
    torch.manual_seed(3)
    layers = nn.ModuleDict({"gcn1": nn.Linear(34, 16), "gcn2": nn.Linear(16, 16), "out": nn.Linear(16, 2)})
    st.load_state_dict(net, layers, mapping={"dense1": "gcn1", "dense2": "gcn2", "dense3": "out"})
    G = nx.karate_club_graph()
    a = nx.to_numpy_array(G, nodelist=list(G), weight=None) + np.eye(34)
    norm = torch.tensor(a / np.sqrt(np.outer(a.sum(1), a.sum(1))), dtype=torch.float32)
    with torch.no_grad():
        h = torch.relu(norm @ layers["gcn1"](torch.eye(34)))
        h = torch.relu(norm @ layers["gcn2"](h))
        want = torch.softmax(layers["out"](h), -1).numpy()
    np.testing.assert_allclose(net(g=structc.Graph.from_networkx(G, x=np.eye(34))), want, rtol=1e-4, atol=1e-6)


def test_a_net_without_its_source_needs_it_given():
    net = structc.compile(EXAMPLES / "digits_mlp.snet")
    text = net._compiled_from[0]
    del net._compiled_from                               # as a Net from structc.load
    with pytest.raises(ValueError, match="carries no source"):
        st.state_dict(net)
    st.load_state_dict(net, mlp(), mapping=MLP_LAYERS, source=text)
    assert tuple(st.state_dict(net, MLP_LAYERS, source=text)["0.weight"].shape) == (128, 64)


# -- LSTM cells --------------------------------------------------------------------------

class DigitsLSTM(nn.Module):
    """examples/digits_lstm.snet, with the same layer names."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.lstm1, self.dense1 = nn.LSTM(8, 64, batch_first=True), nn.Linear(64, 10)

    def forward(self, rows):
        _, (h, _) = self.lstm1(rows)
        return self.dense1(h[-1])


def test_digits_lstm_from_an_nn_lstm_gives_its_outputs_and_goes_back():
    net, module = structc.compile(EXAMPLES / "digits_lstm.snet"), DigitsLSTM()
    st.load_state_dict(net, module)        # lstm1.weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0 -> lstm1.w, .b
    images = np.random.default_rng(0).random((6, 8, 8), dtype=np.float32)   # 6 sequences of 8 rows
    np.testing.assert_allclose(net(s=list(images)), torch_probs(module, images), rtol=1e-4, atol=1e-6)
    w = net.params["lstm1.w"]                               # [8 + 64, 4 * 64], gates i, f, g, o
    np.testing.assert_array_equal(w[:8], module.lstm1.weight_ih_l0.detach().numpy().T)
    np.testing.assert_array_equal(w[8:], module.lstm1.weight_hh_l0.detach().numpy().T)
    again = DigitsLSTM()
    torch.manual_seed(9)
    again.lstm1.reset_parameters()
    again.load_state_dict(st.state_dict(net))               # strict: nn.LSTM's names and shapes
    np.testing.assert_allclose(torch_probs(again, images), net(s=list(images)), rtol=1e-4, atol=1e-6)


def test_an_lstm_cell_by_layer_mapping_and_lstm_mistakes():
    net = structc.compile("model Seq { input s: sequence of f32[5]\n"
                          " rec (h, c)(t) = init: (zeros(7), zeros(7))\n"
                          "                 next: lstm_cell(t.x, h(t.prev), c(t.prev), 7)\n"
                          " output last = h(s.last) }")
    torch.manual_seed(6)
    cell = nn.LSTMCell(5, 7)
    st.load_state_dict(net, {f"rnn.{k}": v for k, v in cell.state_dict().items()}, mapping={"lstm1": "rnn"})
    rows = np.random.default_rng(1).normal(size=(4, 5)).astype(np.float32)
    h = c = torch.zeros(1, 7)
    with torch.no_grad():
        for row in rows:
            h, c = cell(torch.from_numpy(row)[None], (h, c))
    np.testing.assert_allclose(net(s=[rows])[0], h[0].numpy(), rtol=1e-5, atol=1e-6)
    assert sorted(st.state_dict(net, lstm_cell=True)) == ["lstm1.bias_hh", "lstm1.bias_ih", "lstm1.weight_hh",
                                                         "lstm1.weight_ih"]
    with pytest.raises(ValueError, match=r"PyTorch tensors \['weight_ih_l1', .*\] are not mapped"):
        st.load_state_dict(net, nn.LSTM(5, 7, num_layers=2), mapping={"lstm1": ""})
    with pytest.raises(ValueError, match=r"'weight_ih_l0' has shape \(32, 5\) and 'weight_hh_l0' has shape "
                                         r"\(32, 8\) \(\[W_ih; W_hh\]\^T.*but 'lstm1.w' is \(12, 28\)"):
        st.load_state_dict(net, nn.LSTM(5, 8), mapping={"lstm1": ""})


# -- normalisation -----------------------------------------------------------------------

class LeNet5BN(nn.Module):
    """examples/lenet5_bn.snet, with the same layer names."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.conv1, self.bn1 = nn.Conv2d(1, 6, 3, padding="same", bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 16, 3, padding="same", bias=False), nn.BatchNorm2d(16)
        self.dense1, self.dense2, self.dense3 = nn.Linear(64, 120), nn.Linear(120, 84), nn.Linear(84, 10)
        with torch.no_grad():                  # running statistics and scales that matter
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)
        self.eval()

    def forward(self, x):
        f = nn.functional
        h = f.max_pool2d(f.relu(self.bn1(self.conv1(x))), 2)
        h = f.max_pool2d(f.relu(self.bn2(self.conv2(h))), 2)
        return self.dense3(f.relu(self.dense2(f.relu(self.dense1(h.flatten(1))))))


def test_batch_norm_weights_and_running_statistics_in_and_out():
    net, module = structc.compile(EXAMPLES / "lenet5_bn.snet"), LeNet5BN()
    st.load_state_dict(net, module)          # bn1.weight -> bn1.g, running_mean -> bn1.mean; the counter unused
    np.testing.assert_array_equal(net.params["bn2.var"], module.bn2.running_var.numpy())
    x = np.random.default_rng(2).random((5, 1, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(net(x=x), torch_probs(module, x), rtol=1e-4, atol=1e-6)   # inference: running ones
    again = LeNet5BN()
    with torch.no_grad():
        again.bn1.running_mean.zero_()
    again.load_state_dict(st.state_dict(net))          # strict: with a num_batches_tracked per BatchNorm
    np.testing.assert_allclose(torch_probs(again, x), net(x=x), rtol=1e-4, atol=1e-6)


def test_a_norm_layer_with_another_eps_is_refused_before_anything_changes():
    """A module's BatchNorm or LayerNorm built with another ε loaded and predicted
    otherwise, silently (eps=0.1 against the model's 1e-5, running variances ~0.03:
    logits off by 3.2); a state dict holds no ε, so it loads as asked."""
    net = structc.compile(EXAMPLES / "lenet5_bn.snet")
    module = LeNet5BN()
    module.bn2.eps = 1e-3
    before = {k: v.copy() for k, v in net.params.items()}
    with pytest.raises(ValueError, match=r"PyTorch 'bn2' \(BatchNorm2d\) normalises with eps=0\.001, "
                                         r"structc's 'bn2' with eps=1e-05"):
        st.load_state_dict(net, module)
    assert all(np.array_equal(net.params[k], v) for k, v in before.items())
    st.load_state_dict(net, module.state_dict())     # a state dict holds no ε: loaded as asked

    ln = structc.compile("model N { input x: f32[N, 4]\n output y = layer_norm(dense(x, 6, name=\"fc\"), "
                         "eps=1e-6, name=\"norm\") }")
    torch.manual_seed(3)
    same = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6, eps=1e-6))
    st.load_state_dict(ln, same, mapping={"fc": "0", "norm": "1"})
    x = np.random.default_rng(4).random((3, 4), dtype=np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(ln(x=x), same(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"PyTorch '1' \(LayerNorm\) normalises with eps=1e-05, "
                                         r"structc's 'norm' with eps=1e-06"):
        st.load_state_dict(ln, nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6)), mapping={"fc": "0", "norm": "1"})


def test_a_patch_embedding_round_trips_into_pytorch():
    """structc runs a 4x4 convolution at stride 4 as patches and a 1x1 convolution; its weight is
    still the [out, in, 4, 4] kernel PyTorch's Conv2d holds, and means the same."""
    net = structc.compile("model P { input x: f32[N, 3, 16, 20]\n"
                          "  output y = conv(x, 6, kernel=4, stride=4) |> relu |> flatten\n}", seed=3)
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 6, 4, stride=4), nn.ReLU(), nn.Flatten())
    st.load_state_dict(net, module, mapping={"conv1": "0"})
    x = np.random.default_rng(2).normal(size=(3, 3, 16, 20)).astype(np.float32)
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(net(x=x), want, rtol=1e-4, atol=1e-5)
    module.load_state_dict(st.state_dict(net, mapping={"conv1": "0"}))
