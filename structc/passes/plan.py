"""plan_memory: decide where every stored value lives.

Inputs, outputs, parameters and gradients live where the caller put them
(its arrays, the two arenas). Everything else goes in one workspace, where
buffers whose lifetimes (in group execution order) do not overlap share a
slot. Sizes are symbolic (`Size`), so a slot's size is the max of its
buffers' sizes, evaluated per call; the assignment is made once, at compile
time, by best fit at a nominal binding of the symbols.

A group never writes where it reads (lifetimes are inclusive), so kernels
need not care about aliasing.
"""
from __future__ import annotations

import bisect
import heapq
import os
from dataclasses import dataclass, field

from ..graph import Graph
from ..types import Size

ALIGN = 16          # floats: 64-byte alignment for every buffer
NOMINAL = 64        # symbol value used to compare sizes when assigning slots


@dataclass(frozen=True)
class Storage:
    kind: str       # input | output | param | grad | workspace
    index: int      # input/output position, arena offset (elements), workspace slot
    dtype: str = "f32"


@dataclass
class Plan:
    storage: dict[int, Storage] = field(default_factory=dict)   # by root node
    alias: dict[int, int] = field(default_factory=dict)         # view -> root
    slots: list[list[Size]] = field(default_factory=list)
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    param_offsets: dict[str, int] = field(default_factory=dict)   # the model's arena layout

    def root(self, nid: int) -> int:
        while nid in self.alias:
            nid = self.alias[nid]
        return nid

    def describe(self, g: Graph) -> str:
        lines = ["memory plan {"]
        for nid, st in sorted(self.storage.items()):
            lines.append(f"  %{nid:<4} {str(g.nodes[nid].type):<20} {st.kind}[{st.index}]")
        for v, r in sorted(self.alias.items()):
            lines.append(f"  %{v:<4} view of %{r}")
        for k, sizes in enumerate(self.slots):
            lines.append(f"  slot {k}: max({', '.join(map(str, sizes))}) floats")
        lines.append("}")
        return "\n".join(lines)


def check_workspace(need: int, binding: dict) -> None:
    """Refuse a call, before any native code runs, whose workspace (bytes, from
    the generated size function) overflows int64 (it returns -1 then) or
    exceeds this machine's memory: allocating it could only fail or thrash."""
    dims = ", ".join(f"{k}={v}" for k, v in binding.items())
    if need < 0:
        raise ValueError(f"this call needs more workspace than int64 can count ({dims}); use smaller inputs")
    if need > physical_memory():
        raise ValueError(f"this call needs {need} bytes of workspace ({dims}), more than this machine's "
                         f"memory ({physical_memory()} bytes); use smaller inputs")


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):      # not a POSIX system: assume 64 TiB
        return 2 ** 46


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def param_layout(params: dict[str, tuple[int, ...]]) -> tuple[dict[str, int], int]:
    """Arena offsets (in floats) of each parameter, in declaration order."""
    offsets, at = {}, 0
    for name, shape in params.items():
        offsets[name] = at
        n = 1
        for d in shape:
            n *= d
        at += aligned(n)
    return offsets, at


def plan_memory(g: Graph, param_offsets: dict[str, int]) -> Plan:
    plan = Plan(param_offsets=dict(param_offsets))
    plan.input_names = [name for name, nid in g.inputs.items() if nid in g.nodes and g.users(nid)]
    for k, name in enumerate(plan.input_names):
        plan.storage[g.inputs[name]] = Storage("input", k, g.nodes[g.inputs[name]].type.dtype)
    for name, nid in g.params.items():
        if nid in g.nodes:
            plan.storage[nid] = Storage("param", param_offsets[name])
    for nid, node in g.nodes.items():
        if "view" in node.op.traits:
            plan.alias[nid] = node.inputs[0]
    out_index = 0
    for name, nid in g.outputs.items():
        if "effect" in g.nodes[nid].op.traits:
            continue
        if name.startswith("grad:"):
            plan.storage[nid] = Storage("grad", param_offsets[name[5:]])
        else:
            plan.storage[nid] = Storage("output", out_index, g.nodes[nid].type.dtype)
            plan.output_names.append(name)
            out_index += 1

    # Lifetimes of the remaining stored values, in group execution order.
    step = {}
    for k, gr in enumerate(g.groups):
        for m in gr.members:
            step[m] = k
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for k, gr in enumerate(g.groups):
        for m in gr.outputs:
            first.setdefault(m, k)
            last[m] = max(last.get(m, k), k)
        for m in gr.members:
            for i in g.nodes[m].inputs:
                r = plan.root(i)
                if r in first:
                    last[r] = max(last[r], k)
    buffers = sorted((nid for nid in first if nid not in plan.storage), key=lambda n: (first[n], n))
    slots = _Slots()
    for nid in buffers:
        size = g.nodes[nid].type.size()
        s = slots.take(first[nid], last[nid], size.eval(_Nominal()))
        if s == len(plan.slots):
            plan.slots.append([])
        plan.slots[s].append(size)
        plan.storage[nid] = Storage("workspace", s, g.nodes[nid].type.dtype)
    return plan


class _Slots:
    """Best fit of buffers into workspace slots, taken in order of their first
    step: a slot free before that step whose nominal size is the smallest at
    least the buffer's, else the largest below it; the lowest slot among equals;
    a new slot when none is free. The slots still in use wait in a heap by the
    step they free up at, the free ones stay sorted by size: a training graph
    holds every layer's activations until the backward pass reads them, so
    comparing each buffer with every slot was quadratic in the layers."""

    def __init__(self):
        self.count = 0
        self.busy: list[tuple[int, int, int]] = []    # (last step, slot, nominal size)
        self.free: list[tuple[int, int]] = []         # (nominal size, slot), sorted

    def take(self, first: int, last: int, nominal: int) -> int:
        """The slot for a buffer live from step `first` to `last` inclusive."""
        while self.busy and self.busy[0][0] < first:
            _, s, size = heapq.heappop(self.busy)
            bisect.insort(self.free, (size, s))
        at = bisect.bisect_left(self.free, (nominal, -1))    # the smallest at least as large
        if at == len(self.free) and self.free:              # none: the largest below, lowest slot first
            at = bisect.bisect_left(self.free, (self.free[-1][0], -1))
        if at < len(self.free):
            size, s = self.free.pop(at)
            nominal = max(size, nominal)
        else:
            s, self.count = self.count, self.count + 1
        heapq.heappush(self.busy, (last, s, nominal))
        return s


class _Nominal(dict):
    def __missing__(self, key):
        return NOMINAL
