"""Pictures of a model's graphs for `structc graph`: forward and backward.

DOT text is written directly, one node per op with fused groups outlined
(render it with Graphviz if you have it). SVG, PNG and PDF are drawn with
matplotlib (the optional `graph` extra) at the level a reader can follow:
one box per fused kernel, laid out left to right in layers, the PNG's size
capped.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from .graph import Graph

FORWARD, BACKWARD, SOURCE = "#dbe9f6", "#fde2c8", "#e8e8e8"


def _label(g: Graph, nid: int) -> str:
    node = g.nodes[nid]
    name = node.attrs.get("name")
    head = f"{node.op.name} {name}" if name and "source" in node.op.traits else node.op.name
    where = f"\nline {node.span.line}" if node.span else ""
    return f"%{nid} {head}\n{node.type}{where}"


def _colour(g: Graph, nid: int, forward: set[int]) -> str:
    if g.nodes[nid].op.traits & {"source", "inline"}:
        return SOURCE
    return FORWARD if nid in forward else BACKWARD


def to_dot(g: Graph, forward: set[int]) -> str:
    def q(text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    lines = [f"digraph {q(g.name)} {{", "  rankdir=TB;", '  node [shape=box, style="rounded,filled", fontsize=10];']
    grouped = g.group_of()
    for gr in g.groups:
        lines.append(f"  subgraph cluster_{gr.id} {{")
        lines.append(f"    label={q(f'group {gr.id} ({gr.kind})')}; style=dashed; color=\"#666666\";")
        for m in gr.members:
            lines.append(f"    n{m} [label={q(_label(g, m))}, fillcolor={q(_colour(g, m, forward))}];")
        lines.append("  }")
    for nid in g.topo():
        if nid not in grouped:
            lines.append(f"  n{nid} [label={q(_label(g, nid))}, fillcolor={q(_colour(g, nid, forward))}];")
    for nid in g.topo():
        for k, i in enumerate(g.nodes[nid].inputs):
            lines.append(f"  n{i} -> n{nid} [label={q(str(k))}, fontsize=8];")
    lines.append("}")
    return "\n".join(lines) + "\n"


# -- pictures (matplotlib) ---------------------------------------------------------
#
# A picture shows one box per fused kernel (per op with --unfused) rather than
# one per node: parameters are named inside the boxes that read them, constants
# are left out, views ride with what they view, and a graph input's arrays are
# one box. The forward pass runs left to right along the top; the backward
# pass runs right to left below it, so a layer's gradient sits under the layer.

MAX_PIXELS = 8000           # a PNG's longest side (about 20 Mpx at most); larger pictures get a lower dpi
COLUMN_INCHES, ROW_INCHES, FONT = 1.9, 0.95, 6.0
MAX_OPS_SHOWN = 4


@dataclass
class Box:
    key: str
    members: list[int]                       # node ids, in topological order
    backward: bool
    source: bool                             # an input (grey)
    col: int = 0
    row: float = 0.0
    text: str = ""
    half_width: float = 0.34                 # in columns, from the text's longest line


def _unit_key(g: Graph, nid: int, grouped: dict) -> str | None:
    """Which box node `nid` is drawn in (None: not drawn)."""
    node = g.nodes[nid]
    if nid in grouped:
        return f"g{grouped[nid].id}"
    if node.op.traits & {"inline"} or node.op.name == "param":
        return None
    if "source" in node.op.traits:
        return "in:" + str(node.attrs.get("name", nid)).split(".")[0]    # a graph's arrays: one box
    if "view" in node.op.traits and node.inputs:
        return _unit_key(g, node.inputs[0], grouped)      # a view of a parameter is not drawn either
    return f"n{nid}"


def _links(g: Graph, members: dict[str, list[int]]) -> nx.DiGraph:
    """Box -> box edges: one wherever a node of one reads a node of the other."""
    key_of = {nid: k for k, ms in members.items() for nid in ms}
    links = nx.DiGraph()
    links.add_nodes_from(members)
    links.add_edges_from((key_of[a], key_of[b]) for a, b in g.nx.edges
                         if a in key_of and b in key_of and key_of[a] != key_of[b])
    return links


def _boxes(g: Graph, forward: set[int]) -> tuple[dict[str, Box], nx.DiGraph]:
    grouped, order = g.group_of(), g.topo()
    members: dict[str, list[int]] = {}
    for nid in order:
        key = _unit_key(g, nid, grouped)
        if key is not None:
            members.setdefault(key, []).append(nid)
    links = _links(g, members)
    if not nx.is_directed_acyclic_graph(links):          # never for fused groups; merge cycles to be safe
        scc = nx.condensation(links)
        members = {min(keys): sorted((n for k in keys for n in members[k]), key=order.index)
                   for keys in (data["members"] for _, data in scc.nodes(data=True))}
        links = _links(g, members)
    for key in [k for k in members if k.startswith("in:") and not links.out_degree(k)]:
        del members[key]                 # a target has no reader in the forward graph
        links.remove_node(key)
    boxes = {}
    for key, ms in members.items():
        source = key.startswith("in:")
        # A kernel that computes anything of the forward pass is drawn with it (max-pooling
        # also stores its arg-max for training; the loss kernel may start the gradient).
        boxes[key] = Box(key, ms, backward=not source and all(m not in forward for m in ms), source=source)
    return boxes, links


def _place(boxes: dict[str, Box], links: nx.DiGraph) -> int:
    """Columns: each pass's longest-path layering (the backward one mirrored);
    rows: within a column, by the mean row of what feeds the box. Returns the
    number of columns."""
    for backward in (False, True):
        band = links.subgraph([k for k, b in boxes.items() if b.backward == backward])
        for layer, keys in enumerate(nx.topological_generations(band)):
            for k in keys:
                boxes[k].col = layer
    width = 1 + max((b.col for b in boxes.values()), default=0)
    for b in boxes.values():
        if b.backward:
            b.col = width - 1 - b.col
    fwd_rows = 0
    for backward in (False, True):
        columns: dict[int, list[str]] = {}
        for k in nx.topological_sort(links):
            if boxes[k].backward == backward:
                columns.setdefault(boxes[k].col, []).append(k)
        top = 0.0 if not backward else -(fwd_rows + 0.6)
        for col in sorted(columns, reverse=backward):
            def feed(k):
                rows = [boxes[p].row for p in links.predecessors(k) if boxes[p].backward == backward]
                return sum(rows) / len(rows) if rows else 0.0
            keys = sorted(columns[col], key=feed, reverse=True)
            for r, k in enumerate(keys):
                boxes[k].row = top - r
            if not backward:
                fwd_rows = max(fwd_rows, len(keys))
    return width


def _edge_end(box: Box, other: Box) -> tuple[float, float]:
    """Where an edge between `box` and `other` meets `box`: its left or right
    side, or its top or bottom when the two share a column."""
    if box.col == other.col:
        return box.col, box.row + (0.28 if other.row > box.row else -0.28)
    return box.col + (box.half_width if other.col > box.col else -box.half_width), box.row


def _params_read(g: Graph) -> dict[int, list[str]]:
    """node -> the parameters it reads, directly or through views."""
    read: dict[int, list[str]] = {}
    for name, pid in g.params.items():
        todo = [pid]
        while todo:
            for user in g.users(todo.pop()):
                if "view" in g.nodes[user].op.traits:
                    todo.append(user)
                else:
                    read.setdefault(user, []).append(name)
    return read


def _ops_text(g: Graph, ms: list[int]) -> str:
    names = list(dict.fromkeys(g.nodes[m].op.name for m in ms if "source" not in g.nodes[m].op.traits))
    shown = ", ".join(names[:MAX_OPS_SHOWN])
    return shown + (f" +{len(names) - MAX_OPS_SHOWN}" if len(names) > MAX_OPS_SHOWN else "")


def _box_text(g: Graph, box: Box, group_kind: dict, params_of: dict, outputs_of: dict) -> str:
    ms = box.members
    if box.source:
        arrays = [m for m in ms if "source" in g.nodes[m].op.traits]      # not the views of them
        return f"input {box.key[3:]}\n" + (str(g.nodes[arrays[0]].type) if len(arrays) == 1
                                             else f"{len(arrays)} arrays")
    head = f"kernel {box.key[1:]} ({group_kind[box.key]})" if box.key in group_kind else f"%{ms[0]}"
    last = g.nodes[ms[-1]]
    lines = sorted({g.nodes[m].span.line for m in ms if g.nodes[m].span})
    where = "" if not lines else f" · line {lines[0]}" if len(lines) == 1 else f" · lines {lines[0]}-{lines[-1]}"
    text = [head, _ops_text(g, ms), f"{last.type}{where}"]
    params = sorted({p for m in ms for p in params_of.get(m, ())})
    if params:
        text.append("reads " + ", ".join(params[:3]) + (" ..." if len(params) > 3 else ""))
    outs = [o for m in ms for o in outputs_of.get(m, ())]
    if outs:
        text.append("-> " + ", ".join(outs[:2]) + (" ..." if len(outs) > 2 else ""))
    return "\n".join(text)


def caption(g: Graph, boxes: dict[str, Box], fused: bool) -> str:
    """What the colours and boxes mean, naming only what the picture shows."""
    parts = [f"{g.name}: forward (blue), left to right"]
    if any(b.backward for b in boxes.values()):
        parts.append("backward (orange), right to left below it")
    if any(b.source for b in boxes.values()):
        parts.append("inputs (grey)")
    parts.append("each box is one fused kernel" if fused else "each box is one op (before fusion)")
    return "; ".join(parts)


def draw(g: Graph, forward: set[int], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("drawing SVG/PNG needs matplotlib: pip install 'structc[graph]' "
                           "(or write .dot and render it with Graphviz)") from None
    boxes, links = _boxes(g, forward)
    width = _place(boxes, links)
    params_of = _params_read(g)
    outputs_of = {}
    for name, nid in g.outputs.items():
        outputs_of.setdefault(nid, []).append(name)
    group_kind = {f"g{gr.id}": gr.kind for gr in g.groups}
    for b in boxes.values():
        b.text = _box_text(g, b, group_kind, params_of, outputs_of)
        longest = max(len(line) for line in b.text.splitlines())
        b.half_width = (longest * 0.55 * FONT / 2 + 5) / (72 * COLUMN_INCHES)   # ~0.55 em a character
    rows = [b.row for b in boxes.values()] or [0.0]
    height = max(rows) - min(rows) + 1
    w_in, h_in = max(6.0, COLUMN_INCHES * width), max(3.0, ROW_INCHES * height + 0.6)
    fig, ax = plt.subplots(figsize=(w_in, h_in))
    for a, b in links.edges:
        A, B = boxes[a], boxes[b]
        same = A.backward == B.backward          # edges between the passes are drawn faint
        ax.annotate("", xy=_edge_end(B, A), xytext=_edge_end(A, B), zorder=1,
                    arrowprops={"arrowstyle": "-|>", "lw": 0.6 if same else 0.4, "shrinkA": 0, "shrinkB": 0,
                                "color": "#666666" if same else "#bbbbbb", "alpha": 1.0 if same else 0.6})
    for b in boxes.values():
        colour = SOURCE if b.source else BACKWARD if b.backward else FORWARD
        ax.text(b.col, b.row, b.text, ha="center", va="center",
                fontsize=FONT, bbox={"boxstyle": "round,pad=0.35", "fc": colour, "ec": "#555555", "lw": 0.5})
    ax.set_xlim(-0.6, width - 0.4)
    ax.set_ylim(min(rows) - 0.6, max(rows) + 0.6)
    ax.set_title(caption(g, boxes, bool(g.groups)), fontsize=8)
    ax.axis("off")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.35 / h_in)
    dpi = min(150.0, MAX_PIXELS / w_in, MAX_PIXELS / h_in)      # cap the raster size, whatever the model
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


#: the suffixes `write` knows: Graphviz text, or a picture drawn with matplotlib
FORMATS = (".dot", ".gv", ".svg", ".png", ".pdf")


def unknown_format(path) -> str:
    return f"unknown picture format '{Path(path).suffix.lower()}' (use .svg, .png, .pdf or .dot)"


def write(g: Graph, forward: set[int], path: str) -> None:
    suffix = Path(path).suffix.lower()
    if suffix in (".dot", ".gv"):
        Path(path).write_text(to_dot(g, forward))
    elif suffix in (".svg", ".png", ".pdf"):
        draw(g, forward, path)
    else:
        raise ValueError(unknown_format(path))
