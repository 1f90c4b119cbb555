"""PyTorch weights in and out of a compiled model.

    structc.torch.load_state_dict(net, module_or_state_dict, mapping={"dense1": "0", ...})
    sd = structc.torch.state_dict(net)        # {"dense1.weight": tensor, ...}

Names: without a mapping, structc's `L.w` / `L.b` are PyTorch's `L.weight`
/ `L.bias`, a norm's `L.g` its `L.weight`, batch norm's running statistics
`L.mean` / `L.var` its `L.running_mean` / `L.running_var` (its
`num_batches_tracked` is not needed: structc's momentum is fixed; exported as 0);
other names are the same in both. A norm's ε is no tensor: a module given whole
whose BatchNorm or LayerNorm has another ε than the model's layer is refused
(the same weights would predict otherwise); a state dict is taken as it is. A mapping gives structc name
-> PyTorch name, for a parameter (`"dense1.w": "0.weight"`) or for a whole
layer (`"dense1": "0"`: its `.w` and `.b`). Every parameter of the model
must be mapped exactly once and every PyTorch tensor used exactly once;
anything missing, extra, doubly mapped or of the wrong shape is one
`ValueError` naming all of it, raised before any parameter changes.

Layouts: a weight the model multiplies from the right (`x @ W`, as `dense`
does) is `[in, out]` in structc and `[out, in]` in `nn.Linear`, so it is
transposed both ways; convolution kernels (`[out, in, kh, kw]`, conv1d's
`[out, in, k]`), biases and embedding tables are the same in both. Which
weights are transposed is read off the model's graph (its source).

LSTM cells (`lstm_cell`, layer `lstm1`): structc's one `[x, h] @ W + b`
(`W: [in + hidden, 4 hidden]`, gates i, f, g, o: PyTorch's order) is
`nn.LSTM`'s `weight_ih_l0`, `weight_hh_l0` (`W = [W_ih; W_hh]^T`) and
`bias_ih_l0 + bias_hh_l0` (`nn.LSTMCell`'s names without `_l0`). Map an LSTM
by layer (`{"lstm1": "rnn"}`; without a mapping `lstm1` is PyTorch's
`lstm1`); loading sums the two biases, exporting gives the sum as `bias_ih`
and zeros as `bias_hh` (`state_dict(..., lstm_cell=True)`: LSTMCell's names).
One layer, one direction: `nn.LSTM(..., num_layers=2)`'s `_l1` tensors or a
bidirectional one's `_reverse` are reported as not mapped. A `gru_cell` is not
PyTorch's GRU (its candidate reads `W (r h)`, PyTorch's `r (W h + b)`), so its
weights are not converted.

Tensors: every `Net` takes any DLPack tensor as an input (a CPU `torch.Tensor`
of the declared dtype is used in place, no copy) and returns numpy arrays,
which PyTorch reads in place (`torch.from_dlpack(out)`). `wrap(net)` does that
for every output: it calls `net` and returns torch tensors on the outputs' memory
(each call's own). No torch autograd: an input that requires grad is refused.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from .interop import forward_graph_of

#: structc's parameter suffix -> PyTorch's (g, mean, var: a norm's scale and batch norm's running statistics)
_SUFFIXES = {"w": "weight", "b": "bias", "g": "weight", "mean": "running_mean", "var": "running_var"}
_COUNTER = "num_batches_tracked"    # BatchNorm's step counter: structc has none (its momentum is fixed)


def load_state_dict(net, state_dict_or_module, mapping: Mapping[str, str] | None = None, *,
                    source: str | None = None) -> None:
    """Copy PyTorch weights into `net` (layouts converted, everything checked first).
    `source`: the `.snet` text, for a `Net` that does not carry it (`structc.load`)."""
    given = _as_state_dict(state_dict_or_module)
    graph = forward_graph_of(net, source)
    layouts = _layouts(graph)
    names = _torch_names(_resolve(net, mapping), layouts, given)
    mapped = {t for ts in names.values() for t in ts}
    torch_values = {name: _to_numpy(name, v) for name, v in given.items() if not _unused_counter(name, mapped)}
    problems, values = [], {}
    _check_one_to_one(net, names, torch_values, problems)
    if not isinstance(state_dict_or_module, Mapping):
        _check_norm_eps(state_dict_or_module, _norm_eps(graph), names, problems)
    for ours, theirs in names.items():
        if any(t not in torch_values for t in theirs):
            continue
        arr = _converted(layouts.get(ours), [torch_values[t] for t in theirs])
        want = tuple(net.params[ours].shape)
        if arr is None or arr.shape != want:
            problems.append(_shape_problem(ours, theirs, torch_values, layouts.get(ours), want))
            continue
        values[ours] = _checked(ours, ", ".join(theirs), arr, want, problems)
    if problems:
        raise ValueError(f"cannot load the PyTorch weights into model {net.name}: " + "; ".join(problems))
    with net._lock:                      # all or nothing: every value was checked above
        for ours, arr in values.items():
            net.params[ours] = arr


def state_dict(net, mapping: Mapping[str, str] | None = None, *, source: str | None = None,
               lstm_cell: bool = False) -> "OrderedDict[str, object]":
    """`net`'s parameters as a PyTorch state dict (copies, PyTorch layouts); LSTM layers get
    `nn.LSTM`'s names, or `nn.LSTMCell`'s with `lstm_cell=True`."""
    import torch
    layouts = _layouts(forward_graph_of(net, source))
    names = _torch_names(_resolve(net, mapping), layouts, None, "" if lstm_cell else "_l0")
    problems: list[str] = []
    _check_one_to_one(net, names, None, problems)
    if problems:
        raise ValueError(f"cannot name model {net.name}'s parameters for PyTorch: " + "; ".join(problems))
    out = OrderedDict()
    with net._lock:
        for ours, theirs in names.items():
            for name, arr in zip(theirs, _exported(layouts.get(ours), np.array(net.params[ours]))):
                out[name] = torch.from_numpy(np.ascontiguousarray(arr))
                if name.endswith("running_mean"):        # so that BatchNorm loads it strictly
                    out[name[:-len("running_mean")] + _COUNTER] = torch.tensor(0)
    return out


def _unused_counter(name: str, mapped: set) -> bool:
    """A BatchNorm's `num_batches_tracked` beside a running mean that is mapped: nothing to load."""
    return name.endswith(_COUNTER) and name[:-len(_COUNTER)] + "running_mean" in mapped


# -- layouts ------------------------------------------------------------------------------
# A parameter's layout: None (the same in both), "T" (transposed), or for an LSTM
# cell's "lstm.w" (two matrices, W = [W_ih; W_hh]^T) and "lstm.b" (two biases, summed).

def _converted(layout, arrays: list[np.ndarray]) -> np.ndarray | None:
    """PyTorch's tensor(s) in structc's layout (None: they cannot be combined)."""
    if layout == "lstm.w":
        ih, hh = arrays
        if ih.ndim != 2 or hh.ndim != 2 or ih.shape[0] != hh.shape[0]:
            return None
        return np.concatenate([ih.T, hh.T], axis=0)
    if layout == "lstm.b":
        ih, hh = arrays
        return ih.astype(np.float64) + hh if ih.shape == hh.shape else None
    arr = arrays[0]
    return arr.T if layout == "T" and arr.ndim == 2 else arr


def _exported(layout, arr: np.ndarray) -> list[np.ndarray]:
    """structc's parameter in PyTorch's layout: one tensor, or an LSTM's two."""
    if layout == "lstm.w":
        inputs = arr.shape[0] - arr.shape[1] // 4
        return [arr[:inputs].T, arr[inputs:].T]
    if layout == "lstm.b":
        return [arr, np.zeros_like(arr)]
    return [arr.T if layout == "T" else arr]


def _shape_problem(ours: str, theirs: tuple, torch_values: dict, layout, want: tuple) -> str:
    shapes = " and ".join(f"{t!r} has shape {tuple(torch_values[t].shape)}" for t in theirs)
    how = {"T": " (transposed: [out, in] -> [in, out])",
           "lstm.w": f" ([W_ih; W_hh]^T: [4 hidden, in] and [4 hidden, hidden] -> [in + hidden, 4 hidden])",
           "lstm.b": " (bias_ih + bias_hh: two [4 hidden])"}.get(layout, "")
    return f"{shapes}{how}, but {ours!r} is {want}"


def _torch_names(names: dict[str, str], layouts: dict, torch_values: dict | None,
                 suffix: str | None = None) -> dict[str, tuple]:
    """structc name -> its PyTorch name(s): an LSTM cell's weight and bias become the two
    tensors of the PyTorch module the layer maps to, `nn.LSTM`'s (`_l0`) where the state
    dict has them or `suffix` says so, else `nn.LSTMCell`'s."""
    out = {}
    for ours, theirs in names.items():
        kind = layouts.get(ours)
        if kind not in ("lstm.w", "lstm.b"):
            out[ours] = (theirs,)
            continue
        module = theirs.rpartition(".")[0] if theirs.endswith((".weight", ".bias")) else theirs
        stem = "weight" if kind == "lstm.w" else "bias"
        pick = suffix
        if pick is None:
            pick = "_l0" if torch_values is not None and _joined(module, f"{stem}_ih_l0") in torch_values else ""
        out[ours] = tuple(_joined(module, f"{stem}_{part}{pick}") for part in ("ih", "hh"))
    return out


def _joined(module: str, name: str) -> str:
    return f"{module}.{name}" if module else name


def _as_state_dict(obj) -> Mapping:
    if isinstance(obj, Mapping):
        return obj
    sd = getattr(obj, "state_dict", None)
    if callable(sd):
        return sd()
    raise TypeError(f"expected a state_dict (a mapping of names to tensors) or an nn.Module, got "
                    f"{type(obj).__name__}")


def _to_numpy(name: str, value) -> np.ndarray:
    if hasattr(value, "detach"):                       # a torch.Tensor
        value = value.detach().cpu()
        if value.is_complex() or not value.is_floating_point():
            raise TypeError(f"PyTorch tensor {name!r} is {value.dtype}; parameters are real floats")
        value = value.float().numpy()
    return np.asarray(value)


def default_name(ours: str) -> str:
    """structc `L.w` -> PyTorch `L.weight`, `L.b` -> `L.bias`; other names unchanged."""
    layer, dot, suffix = ours.rpartition(".")
    return f"{layer}.{_SUFFIXES[suffix]}" if dot and suffix in _SUFFIXES else ours


def _resolve(net, mapping) -> dict[str, str]:
    """structc parameter name -> PyTorch name, for every parameter `mapping` covers
    (all of them without one). Layer keys expand to their `.w` and `.b`."""
    if mapping is None:
        return {ours: default_name(ours) for ours in net.params}
    if not isinstance(mapping, Mapping):
        raise TypeError(f"mapping must be a dict of structc name -> PyTorch name, got {type(mapping).__name__}")
    names: dict[str, str] = {}
    unknown = []
    for key, theirs in mapping.items():
        if key in net.params:
            expanded = {key: theirs}
        else:
            expanded = {f"{key}.{s}": f"{theirs}.{t}" for s, t in _SUFFIXES.items() if f"{key}.{s}" in net.params}
        if not expanded:
            unknown.append(key)
        for ours, t in expanded.items():
            if ours in names:
                raise ValueError(f"mapping names structc parameter {ours!r} twice")
            names[ours] = t
    if unknown:
        raise ValueError(f"mapping names {unknown}, which are neither parameters nor layers of model "
                         f"{net.name} (its parameters: {', '.join(net.params)})")
    return names


def _check_one_to_one(net, names: dict[str, tuple], torch_values: dict | None, problems: list) -> None:
    """Every structc parameter mapped, each PyTorch name used once and present."""
    missing = [ours for ours in net.params if ours not in names]
    if missing:
        problems.append(f"no PyTorch tensor mapped to {missing}")
    seen: dict[str, str] = {}
    for ours, theirs in names.items():
        for t in theirs:
            if t in seen:
                problems.append(f"PyTorch {t!r} is mapped to both {seen[t]!r} and {ours!r}")
            seen[t] = ours
    if torch_values is None:
        return
    absent = [f"{t!r} (for {o!r})" for o, ts in names.items() for t in ts if t not in torch_values]
    if absent:
        hint = "" if any(t in torch_values for t in seen) else \
            "; name them with mapping={structc parameter or layer: PyTorch name}, e.g. {'dense1': '0'}"
        problems.append(f"the state dict has no {', '.join(absent)} (it has: {', '.join(torch_values)}){hint}")
    extra = [t for t in torch_values if t not in seen]
    if extra:
        problems.append(f"PyTorch tensors {extra} are not mapped to any parameter")


def _checked(ours, theirs, arr, shape, problems):
    from .model import _checked_param
    try:
        return _checked_param(ours, arr, shape, where=f"PyTorch {theirs!r} -> ")
    except (TypeError, ValueError) as e:
        problems.append(str(e))
        return None


def _layouts(graph) -> dict[str, str]:
    """Parameter -> how PyTorch lays it out differently (see the layouts above), read off
    the model's forward graph. Transposed: the right operand of a matrix product (`x @ W`,
    `dense`), [in, out] here and [out, in] in `nn.Linear`. An LSTM cell's: the matmul
    and bias feeding `lstm_gates`. Sub-graphs count (a recursion's cases hold their layers)."""
    out: dict[str, str] = {}
    for g in _graphs(graph):
        for node in g.nodes.values():
            if node.op.name == "matmul" and not node.attrs.get("tb"):
                w = _param_rows(g, node.inputs[1])
                if w is not None:
                    out.setdefault(w.attrs["name"], "T")
            elif node.op.name == "lstm_gates":
                out.update(_lstm_params(g, g.nodes[node.inputs[0]]))
    return out


def _graphs(graph):
    """The graph and its sub-graphs (a recursion's cases), each once."""
    pending = [graph]
    while pending:
        g = pending.pop()
        yield g
        pending += [v for node in g.nodes.values() for v in node.attrs.values() if isinstance(v, type(g))]


def _norm_eps(graph) -> dict[str, float]:
    """A normalisation's scale parameter -> the ε it divides by √(σ² + ε) with, read off
    the forward graph: layer_norm's `x̂ / √(σ² + ε) · g`, batch norm's inference form
    `γ / √(running var + ε)`."""
    out: dict[str, float] = {}
    for g in _graphs(graph):
        def param(nid):
            node = g.nodes[nid]
            return node.attrs["name"] if node.op.name == "param" else None

        for node in g.nodes.values():
            if node.op.name != "sqrt":
                continue
            inner = g.nodes[node.inputs[0]]
            consts = [g.nodes[i] for i in inner.inputs if g.nodes[i].op.name == "const"] if inner.op.name == "add" else []
            if len(consts) != 1 or not isinstance(consts[0].attrs.get("value"), (int, float)):
                continue
            eps = float(consts[0].attrs["value"])
            for d in g.users(node.id):
                div = g.nodes[d]
                if div.op.name != "div" or div.inputs[1] != node.id:
                    continue
                if param(div.inputs[0]) is not None:                        # γ / √(var + ε)
                    out[param(div.inputs[0])] = eps
                    continue
                for m in g.users(div.id):                                 # x̂ / √(σ² + ε) · g
                    mul = g.nodes[m]
                    scales = [param(i) for i in mul.inputs if i != div.id] if mul.op.name == "mul" else []
                    if len(scales) == 1 and scales[0] is not None:
                        out[scales[0]] = eps
    return out


def _check_norm_eps(module, eps_of: dict[str, float], names: dict[str, tuple], problems: list) -> None:
    """A PyTorch norm layer (`nn.BatchNorm*d`, `nn.LayerNorm`, ...) whose ε is not the
    model's layer's: its weights would load and every prediction differ (a state dict
    holds no ε, so only a module given whole can be checked)."""
    modules = dict(module.named_modules()) if hasattr(module, "named_modules") else {}
    for ours, eps in eps_of.items():
        theirs = names.get(ours, ("",))[0]
        owner = modules.get(theirs.rpartition(".")[0])
        theirs_eps = getattr(owner, "eps", None)
        if isinstance(theirs_eps, (int, float)) and not math.isclose(theirs_eps, eps, rel_tol=1e-6):
            layer = ours.rpartition(".")[0] or ours
            problems.append(f"PyTorch {theirs.rpartition('.')[0]!r} ({type(owner).__name__}) normalises with "
                            f"eps={theirs_eps:g}, structc's {layer!r} with eps={eps:g}: the same weights would "
                            f"predict otherwise (give the layer eps={theirs_eps:g} in the model)")


def _param_rows(g, nid):
    """The parameter that node `nid` is, or a block of its rows (lstm_cell's W[:F]); else None."""
    node = g.nodes[nid]
    if node.op.name == "slice" and node.attrs["axis"] % max(1, node.type.rank) == 0:
        node = g.nodes[node.inputs[0]]
    return node if node.op.name == "param" else None


def _lstm_params(g, gates) -> dict[str, str]:
    """The weight and bias of `gates = [x, h] @ W + b` (lstm_cell's, written
    x @ W[:F] + (h @ W[F:] + b); in a recursion x's half is an input of the
    node case), by name."""
    found, todo = {}, [gates.id]
    while todo:
        node = g.nodes[todo.pop()]
        if node.op.name == "add":
            todo += node.inputs
        elif node.op.name == "param":
            found[node.attrs["name"]] = "lstm.b"
        elif node.op.name == "matmul" and _param_rows(g, node.inputs[1]) is not None:
            found[_param_rows(g, node.inputs[1]).attrs["name"]] = "lstm.w"
    return found if sorted(found.values()) == ["lstm.b", "lstm.w"] else {}


def wrap(net) -> "TorchNet":
    """`net` returning torch tensors: `wrap(net)(x=t)` is `net(x=t)` with each output
    array given to PyTorch in place (`torch.from_dlpack`, no copy)."""
    return TorchNet(net)


class TorchNet:
    """A `Net` whose outputs and gradients are torch tensors (its other attributes are the Net's)."""

    def __init__(self, net):
        import torch
        self.net, self._torch = net, torch

    def forward(self, **inputs) -> dict:
        return {name: self._torch.from_dlpack(arr) for name, arr in self.net.forward(**inputs).items()}

    def __call__(self, **inputs):
        outs = self.forward(**inputs)
        return next(iter(outs.values())) if len(outs) == 1 else outs

    def grad(self, **inputs) -> tuple:
        loss, grads = self.net.grad(**inputs)
        return loss, {name: self._torch.from_dlpack(g) for name, g in grads.items()}

    def __getattr__(self, name):
        if name == "net":              # not set yet (a copy being made): no endless recursion
            raise AttributeError(name)
        return getattr(self.net, name)

    def __repr__(self) -> str:
        return f"structc.torch.wrap({self.net!r})"
