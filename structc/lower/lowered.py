"""Kernels lowered before, found by what determines their text (issue 14, item 4).

An edit of one layer changes few kernels, yet lowering the whole model again
in Python costs hundreds of milliseconds. With `compile_model(module_cache=
True)`, `KernelBuilder.kernel` first computes a kernel's *lowering key*: a
hash of everything its text can depend on (`group_spec`: the op, attributes,
types and storage of the group's members, of their operands and of the views
those read through; which of them share a buffer; the kernel's place in its
group, its name's stem, `vector_code`; the compiler's sources, user ops, LLVM
and the target: `salt`). When the disk cache holds a record under that key
(the kernel's text, the functions it calls, which frame slots it reads), the
kernel is not built again: its text is put in the module as it was (a
function that only carries it, `structc_text`) and the entry copies the same
slots, so every module's IR text is the one a fresh lowering gives, and
`compiler._ModuleObjects` finds their objects by that text as before.

A stale kernel would be silently wrong, so the key is conservative and it is
checked when a record is made: while a group is lowered, the op sees the
graph, the frame layout and the `KernelBuilder` through views (`SpecGraph`,
`SpecLayout`, `GroupBuilder`) that note any read outside the spec (another
node, a user list, the plan, `kb.shared`, ...); a group that read anything
else records nothing (`LoweredKernels.refused` says why), and so does a
kernel whose text names its own entry or uses a slot the spec cannot name.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Callable

from llvmlite import ir

from ..types import TensorType

#: bumped when a record's fields change (2: texts stored as bytes, `record_file`)
RECORD_VERSION = 2
_REFERENCE = re.compile(r'@"([^"]+)"')


def record_file(record: dict) -> tuple[dict, bytes]:
    """A record as a cache file: (metadata, payload), its texts (the kernel's,
    its helpers' definitions) as bytes after the metadata, not as JSON strings
    (their quotes escaped, and decoded again on every load: most of a load's
    time), their lengths in the metadata."""
    texts = [record["body"]] + [c[3] for c in record["callees"] if c[3] is not None]
    data = [t.encode() for t in texts]
    meta = dict(record, body=None, callees=[c[:3] + [c[3] is not None] + c[4:] for c in record["callees"]],
                text_bytes=[len(d) for d in data])
    return meta, b"".join(data)


def record_from_file(meta: dict, payload: bytes) -> dict | None:
    """`record_file` undone; None when the parts do not fit together."""
    try:
        sizes, ends = meta["text_bytes"], []
        for size in sizes:
            ends.append((ends[-1] if ends else 0) + size)
        if ends[-1] != len(payload) or any(size < 0 for size in sizes):
            return None
        texts = iter(payload[end - size:end].decode() for end, size in zip(ends, sizes))
        body = next(texts)
        callees = [c[:3] + [next(texts) if c[3] else None] + c[4:] for c in meta["callees"]]
        if next(texts, None) is not None:
            return None
    except (KeyError, IndexError, TypeError, ValueError, StopIteration):
        return None
    return dict((k, v) for k, v in meta.items() if k != "text_bytes") | {"body": body, "callees": callees}


class NotCacheable(Exception):
    """A kernel or group whose lowering this cache cannot key (it is lowered as usual)."""


@dataclass
class LoweredKernels:
    """The kernels' records of one compile: `read(key)` -> dict | None reads
    the disk cache, `write({key: record})` writes the records made (`flush`,
    once lowering is done); `salt`: the compiler, user ops, LLVM and the
    target, as text. Records made in this compile serve it too (a repeated
    layer's kernels)."""
    salt: str
    read: Callable[[str], dict | None]
    write: Callable[[dict], None]
    hits: int = 0
    misses: int = 0
    refused: dict = field(default_factory=dict)     # reason -> count (groups or kernels not recorded)
    made: dict = field(default_factory=dict)

    def load(self, key: str) -> dict | None:
        return self.made[key] if key in self.made else self.read(key)

    def store(self, key: str, record: dict) -> None:
        self.made[key] = record

    def flush(self) -> None:
        self.write(self.made)
        self.made = {}

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1


# -- the spec: what a group's lowering reads ------------------------------------

def _canonical(value):
    """Attribute values as JSON-able data, types kept apart (1 is not 1.0); a value
    of any other kind (a graph, a function) makes the group uncacheable."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return ["int", value]
    if isinstance(value, float):
        return ["float", repr(value)]
    if isinstance(value, (tuple, list)):
        return [type(value).__name__] + [_canonical(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return ["dict"] + [[k, _canonical(value[k])] for k in sorted(value)]
    if isinstance(value, TensorType):
        return ["type", value.dtype, _canonical(tuple(value.shape))]
    raise NotCacheable(f"attribute of type {type(value).__name__}")


def spec_nodes(graph, group) -> list[int]:
    """The nodes a group's lowering may read, in a fixed order: its members and
    anchor, their operands, and the operands of every view among them (views
    are read through)."""
    order: list[int] = []
    seen: set[int] = set()
    members = set(group.members) | {group.anchor}

    def add(nid):
        if nid not in seen:
            seen.add(nid)
            order.append(nid)
    for nid in list(group.members) + [group.anchor]:
        add(nid)
    k = 0
    while k < len(order):
        node = graph.nodes[order[k]]
        if order[k] in members or "view" in node.op.traits:
            for i in node.inputs:
                add(i)
        k += 1
    return order


def group_spec(graph, group, layout) -> tuple[list[int], set[int], str]:
    """(the spec's nodes, those read as buffers only, the spec as text). Node
    ids do not appear: each node is named by its place in the list, so the
    same layer in another model (or at other ids after an edit) has the same
    spec. An operand that is neither a view nor inlined (a constant) is read
    as a buffer: its attributes (a parameter's name and initialiser) are left
    out, and `SpecNodes` notes any read of them."""
    nodes = spec_nodes(graph, group)
    place = {nid: k for k, nid in enumerate(nodes)}
    plan = layout.plan
    roots: dict[int, int] = {}
    rows, bare = [], set()
    members = set(group.members) | {group.anchor}
    for nid in nodes:
        node = graph.nodes[nid]
        root = plan.root(nid)
        st = plan.storage.get(root)
        storage = None if st is None else [st.kind, st.dtype, roots.setdefault(root, place[nid])]
        traits = node.op.traits
        if nid in members or "view" in traits or "inline" in traits:
            attrs = _canonical(dict(node.attrs))
        else:
            attrs = "buffer"
            bare.add(nid)
        rows.append([type(node.op).__module__ + "." + type(node.op).__qualname__, node.op.name,
                     attrs, node.type.dtype, _canonical(tuple(node.type.shape)),
                     [place.get(i, -1) for i in node.inputs], storage,
                     nid in group.members, nid == group.anchor, nid in group.outputs, nid in group.reductions,
                     nid in layout.partials])
    return nodes, bare, json.dumps([group.kind, rows], separators=(",", ":"))


def kernel_key(salt: str, spec: str, ordinal: int, stem: str, vector_code: bool) -> str:
    h = hashlib.sha256()
    for part in (f"lowered kernel {RECORD_VERSION}", salt, spec, str(ordinal), stem, str(vector_code)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


# -- views that note reads outside the spec ------------------------------------

class _Reads:
    """What a group's lowering read outside its spec (the first such read, to report)."""

    def __init__(self, allowed: set[int]):
        self.allowed = allowed
        self.outside: str | None = None

    def note(self, what: str) -> None:
        if self.outside is None:
            self.outside = what

    def node(self, nid) -> None:
        if nid not in self.allowed:
            self.note("a node outside the spec")


class _BufferNode:
    """An operand read as a buffer: its op, operands and type, not its attributes."""

    def __init__(self, node, reads: _Reads):
        self._node, self._reads = node, reads
        self.id, self.op, self.inputs, self.type, self.span = node.id, node.op, node.inputs, node.type, node.span

    @property
    def shape(self):
        return self.type.shape

    def __getattr__(self, name):
        self._reads.note(f"an operand's {name}")
        return getattr(self._node, name)


class SpecNodes:
    def __init__(self, nodes: dict, reads: _Reads, bare: set[int] = frozenset()):
        self._nodes, self._reads, self._bare = nodes, reads, bare

    def __getitem__(self, nid):
        self._reads.node(nid)
        if nid in self._bare:
            return _BufferNode(self._nodes[nid], self._reads)
        return self._nodes[nid]

    def __contains__(self, nid):
        self._reads.node(nid)
        return nid in self._nodes

    def get(self, nid, default=None):
        return self[nid] if nid in self else default

    def __getattr__(self, name):
        self._reads.note(f"graph.nodes.{name}")
        return getattr(self._nodes, name)

    def __iter__(self):
        self._reads.note("graph.nodes (iterated)")
        return iter(self._nodes)

    def __len__(self):
        self._reads.note("len(graph.nodes)")
        return len(self._nodes)


class _OtherMembers:
    """Another group's members, asked only whether they hold a member of the
    group being lowered (never: `fuse` puts each node in one group)."""

    def __init__(self, members: list[int], mine: list[int], reads: _Reads):
        self._members, self._mine, self._reads = members, mine, reads

    def __contains__(self, nid) -> bool:
        if nid not in self._mine:
            self._reads.note("another group's members")
        return nid in self._members

    def __getattr__(self, name):
        self._reads.note("another group's members")
        return getattr(self._members, name)

    def __iter__(self):
        self._reads.note("another group's members")
        return iter(self._members)


class _OtherGroup:
    def __init__(self, group, mine: list[int], reads: _Reads):
        self._group, self._reads = group, reads
        self.members = _OtherMembers(group.members, mine, reads)

    def __getattr__(self, name):
        self._reads.note("another group")
        return getattr(self._group, name)


class SpecGraph:
    """The graph as a group's lowering sees it: its spec's nodes, and `groups`
    to find the group of one of its members (ops do: `next(gr for gr in
    graph.groups if node.id in gr.members)`); anything else is noted."""

    def __init__(self, graph, group, reads: _Reads, bare: set[int] = frozenset()):
        self._graph, self._group, self._reads = graph, group, reads
        self.nodes = SpecNodes(graph.nodes, reads, bare)

    @property
    def groups(self) -> list:
        mine = self._group.members
        return [gr if gr is self._group else _OtherGroup(gr, mine, self._reads) for gr in self._graph.groups]

    def __getattr__(self, name):
        self._reads.note(f"graph.{name}")
        return getattr(self._graph, name)


class _SpecPartials:
    def __init__(self, partials: dict, reads: _Reads):
        self._partials, self._reads = partials, reads

    def __getitem__(self, nid):
        self._reads.node(nid)
        return self._partials[nid]

    def __contains__(self, nid):
        self._reads.node(nid)
        return nid in self._partials

    def __getattr__(self, name):
        self._reads.note(f"layout.partials.{name}")
        return getattr(self._partials, name)


class SpecLayout:
    """The frame layout as a group's lowering sees it (what `CG` reads: dims,
    arenas, hyper-parameters, mode, the spec's buffers and partial sums)."""

    def __init__(self, layout, reads: _Reads):
        self._layout, self._reads = layout, reads
        self.dims, self.arenas = layout.dims, layout.arenas
        self.hyper_slot, self.mode_slot = layout.hyper_slot, layout.mode_slot
        self.partials = _SpecPartials(layout.partials, reads)

    def buffer_slot(self, nid: int) -> int:
        self._reads.node(nid)
        return self._layout.buffer_slot(nid)

    def dim_slot(self, name: str) -> int:
        return self._layout.dim_slot(name)

    def __getattr__(self, name):
        self._reads.note(f"layout.{name}")
        return getattr(self._layout, name)


class GroupBuilder:
    """The `KernelBuilder` as an op's `lower` sees it while its group may be
    recorded: the graph and layout views, the target, `kernel`; any other
    attribute (the module, `shared`, the entry, ...) is noted."""

    def __init__(self, kb, graph: SpecGraph, layout: SpecLayout, reads: _Reads):
        self._kb, self._reads = kb, reads
        self.graph, self.layout = graph, layout
        self.target, self.vector_width = kb.target, kb.vector_width
        self.kernel = kb.kernel

    def after_kernel(self, action) -> None:
        """Entry code after the last kernel (not part of any kernel's text); it may
        read what a kernel's body left behind, so never after a body not run."""
        if self._kb._scope.skipped:
            raise RuntimeError("after_kernel in a group whose kernel was not built (skippable=True): "
                               "its action may need what the body computes")
        self._kb.after_kernel(action)

    def __getattr__(self, name):
        self._reads.note(f"kb.{name}")
        return getattr(self._kb, name)


@dataclass
class GroupScope:
    """A group being lowered with the cache: its spec, the views, the kernels made so far."""
    nodes: list[int]
    spec: str
    reads: _Reads
    graph: SpecGraph
    layout: SpecLayout
    builder: GroupBuilder
    ordinal: int = 0
    skipped: bool = False       # a kernel's body was not run (`skippable`, found)
    pending: list = field(default_factory=list)     # (key, record) to store if the group read nothing else


def open_group(kb, graph, group, layout) -> GroupScope | None:
    """The scope of `group`, or None (noted in `refused`) when it cannot be keyed."""
    try:
        nodes, bare, spec = group_spec(graph, group, layout)
    except NotCacheable as e:
        kb.lowered.refuse(str(e))
        return None
    reads = _Reads(set(nodes))
    g, lay = SpecGraph(graph, group, reads, bare), SpecLayout(layout, reads)
    return GroupScope(nodes, spec, reads, g, lay, GroupBuilder(kb, g, lay, reads))


def close_group(lowered: LoweredKernels, scope: GroupScope) -> None:
    """Store the group's new records, unless its lowering read outside the spec."""
    if scope.reads.outside is not None:
        if scope.pending:
            lowered.refuse(f"read {scope.reads.outside}")
        return
    for key, record in scope.pending:
        lowered.store(key, record)


# -- slots, types and the functions a kernel calls ------------------------------

def slot_names(layout, scope: GroupScope) -> dict[int, list]:
    """Entry frame slot -> a name that holds across models: a dim, an arena, the
    hyper-parameters, the mode, or the buffer / partial sums of a spec node (by place)."""
    names: dict[int, list] = {}
    for k, nid in enumerate(scope.nodes):
        if nid in layout.partials:
            names.setdefault(layout.partials[nid], ["partial", k])
        try:
            names.setdefault(layout.buffer_slot(nid), ["buffer", k])
        except KeyError:
            pass
    names.update({slot: ["dim", s] for s, slot in layout.dims.items()})
    names.update({slot: ["arena", a] for a, slot in layout.arenas.items()})
    names[layout.hyper_slot] = ["hyper"]
    names[layout.mode_slot] = ["mode"]
    return names


def slot_name(names: dict[int, list], index) -> list | None:
    """The name of entry slot `index` in a record (`slot_names`), or of a value the
    entry passes (`module.run_time_value`: `("value", n)`); None if it has none."""
    if isinstance(index, tuple) and len(index) == 2 and index[0] == "value" and type(index[1]) is int:
        return ["value", index[1]]
    return names.get(index) if isinstance(index, int) else None


def slot_of(layout, scope: GroupScope, name: list):
    kind = name[0]
    if kind == "value":
        if len(name) != 2 or type(name[1]) is not int:
            raise ValueError(f"bad value slot {name!r}")
        return ("value", name[1])
    if kind == "buffer":
        return layout.buffer_slot(scope.nodes[name[1]])
    if kind == "partial":
        return layout.partials[scope.nodes[name[1]]]
    if kind == "dim":
        return layout.dims[name[1]]
    if kind == "arena":
        return layout.arenas[name[1]]
    return layout.hyper_slot if kind == "hyper" else layout.mode_slot


_SCALARS = {"void": ir.VoidType(), "float": ir.FloatType(), "double": ir.DoubleType(), "half": ir.HalfType(),
            "ptr": ir.PointerType()}
_VECTOR = re.compile(r"<(\d+) x (.+)>")


def parse_type(text: str) -> ir.Type:
    """The llvmlite type printed as `text` (scalars, pointers, vectors); NotCacheable otherwise."""
    if text in _SCALARS:
        return _SCALARS[text]
    if re.fullmatch(r"i\d+", text):
        return ir.IntType(int(text[1:]))
    vector = _VECTOR.fullmatch(text)
    if vector:
        return ir.VectorType(parse_type(vector.group(2)), int(vector.group(1)))
    raise NotCacheable(f"type {text}")


def function_type(fn: ir.Function) -> list:
    ft = fn.function_type
    return [str(ft.return_type), [str(a) for a in ft.args], bool(ft.var_arg)]


def make_function(module: ir.Module, name: str, ftype: list) -> ir.Function:
    ret, args, var_arg = ftype
    return ir.Function(module, ir.FunctionType(parse_type(ret), [parse_type(a) for a in args], var_arg), name=name)


def callees(text: str, module: ir.Module, function_text) -> list[list]:
    """The functions a kernel's text calls, transitively, as they are in the
    module: [name, type, declaration text | None, definition text | None,
    vector_code], in the module's order; NotCacheable when one cannot be
    remade exactly from these."""
    wanted, todo = set(), [text]
    while todo:
        for name in _REFERENCE.findall(todo.pop()):
            fn = module.globals.get(name)
            if fn is None or name in wanted:
                continue
            if not isinstance(fn, ir.Function):
                raise NotCacheable(f"a call of the global {name}")
            wanted.add(name)
            if fn.blocks:
                todo.append(function_text(fn))
    return [_callee(module, name, function_text) for name in module.globals if name in wanted]


def _callee(module: ir.Module, name: str, function_text) -> list:
    """One callee's entry, checked once per module (helpers are complete when made)."""
    known = module.__dict__.setdefault("structc_callees", {})
    if name not in known:
        fn = module.globals[name]
        ftype = function_type(fn)
        scratch = known.setdefault(None, ir.Module())       # names are unique here as they are in `module`
        made = make_function(scratch, name, ftype)
        if fn.blocks:       # a helper (matmul micro-kernels): its text is what is printed; callers need its type
            if fn.linkage != "internal":
                known[name] = NotCacheable(f"a call of the {fn.linkage or 'external'} function {name}")
            elif str(made.function_type) != str(fn.function_type):
                known[name] = NotCacheable(f"a helper whose type is not remade exactly: {name}")
            else:
                known[name] = [name, ftype, None, function_text(fn), getattr(fn, "structc_vector_code", False)]
        elif str(made) != str(fn):
            known[name] = NotCacheable(f"a declaration not remade exactly: {name}")
        else:
            known[name] = [name, ftype, str(fn), None, False]
    if isinstance(known[name], NotCacheable):
        raise known[name]
    return known[name]
