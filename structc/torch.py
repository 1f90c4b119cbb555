"""PyTorch weights in and out of a compiled model.

    structc.torch.load_state_dict(net, module_or_state_dict, mapping={"dense1": "0", ...})
    sd = structc.torch.state_dict(net)        # {"dense1.weight": tensor, ...}

Names: without a mapping, structc's `L.w` / `L.b` are PyTorch's `L.weight`
/ `L.bias` (other names are the same in both). A mapping gives structc name
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

Tensors: every `Net` takes any DLPack tensor as an input (a CPU `torch.Tensor`
of the declared dtype is used in place, no copy) and returns numpy arrays,
which PyTorch reads in place (`torch.from_dlpack(out)`). `wrap(net)` does that
for every output: it calls `net` and returns torch tensors on the outputs' memory.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from .interop import forward_graph_of

#: structc's parameter suffix -> PyTorch's
_SUFFIXES = {"w": "weight", "b": "bias"}


def load_state_dict(net, state_dict_or_module, mapping: Mapping[str, str] | None = None, *,
                    source: str | None = None) -> None:
    """Copy PyTorch weights into `net` (layouts converted, everything checked first).
    `source`: the `.snet` text, for a `Net` that does not carry it (`structc.load`)."""
    torch_values = {name: _to_numpy(name, v) for name, v in _as_state_dict(state_dict_or_module).items()}
    names = _resolve(net, mapping)
    transposed = _transposed_params(net, source)
    problems, values = [], {}
    _check_one_to_one(net, names, torch_values, problems)
    for ours, theirs in names.items():
        if theirs not in torch_values:
            continue
        arr = torch_values[theirs]
        arr = arr.T if ours in transposed and arr.ndim == 2 else arr
        want = tuple(net.params[ours].shape)
        if arr.shape != want:
            shown = f"{tuple(torch_values[theirs].shape)}" + (" (transposed: [out, in] -> [in, out])"
                                                               if ours in transposed else "")
            problems.append(f"{theirs!r} has shape {shown}, but {ours!r} is {want}")
            continue
        values[ours] = _checked(ours, theirs, arr, want, problems)
    if problems:
        raise ValueError(f"cannot load the PyTorch weights into model {net.name}: " + "; ".join(problems))
    with net._lock:                      # all or nothing: every value was checked above
        for ours, arr in values.items():
            net.params[ours] = arr


def state_dict(net, mapping: Mapping[str, str] | None = None, *,
               source: str | None = None) -> "OrderedDict[str, object]":
    """`net`'s parameters as a PyTorch state dict (copies, PyTorch layouts)."""
    import torch
    names = _resolve(net, mapping)
    problems: list[str] = []
    _check_one_to_one(net, names, None, problems)
    if problems:
        raise ValueError(f"cannot name model {net.name}'s parameters for PyTorch: " + "; ".join(problems))
    transposed = _transposed_params(net, source)
    out = OrderedDict()
    with net._lock:
        for ours, theirs in names.items():
            arr = np.array(net.params[ours])
            out[theirs] = torch.from_numpy(np.ascontiguousarray(arr.T if ours in transposed else arr))
    return out


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


def _check_one_to_one(net, names: dict[str, str], torch_values: dict | None, problems: list) -> None:
    """Every structc parameter mapped, each PyTorch name used once and present."""
    missing = [ours for ours in net.params if ours not in names]
    if missing:
        problems.append(f"no PyTorch tensor mapped to {missing}")
    seen: dict[str, str] = {}
    for ours, theirs in names.items():
        if theirs in seen:
            problems.append(f"PyTorch {theirs!r} is mapped to both {seen[theirs]!r} and {ours!r}")
        seen[theirs] = ours
    if torch_values is None:
        return
    absent = [f"{t!r} (for {o!r})" for o, t in names.items() if t not in torch_values]
    if absent:
        hint = "" if any(t in torch_values for t in names.values()) else \
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


def _transposed_params(net, source: str | None = None) -> set[str]:
    """Parameters used as the right operand of a matrix product (`x @ W`,
    `dense`): [in, out] here, [out, in] in `nn.Linear`. Sub-graphs count (a
    recursion's node case holds its own `dense`)."""
    out: set[str] = set()
    pending = [forward_graph_of(net, source)]
    while pending:
        g = pending.pop()
        for node in g.nodes.values():
            if node.op.name == "matmul" and not node.attrs.get("tb"):
                w = g.nodes[node.inputs[1]]
                if w.op.name == "param":
                    out.add(w.attrs["name"])
            pending += [v for v in node.attrs.values() if isinstance(v, type(g))]
    return out


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
