"""Pictures of a model's graphs for `structc graph`: forward and backward,
fused groups outlined, every node labelled with its op, shape and source line.

DOT text is written directly (render it with Graphviz if you have it); SVG,
PNG and PDF are drawn with matplotlib (the optional `graph` extra), laid out
by networkx in layers of the topological order.
"""
from __future__ import annotations

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


def _layout(g: Graph) -> tuple[dict, dict]:
    """Positions with each fused group kept together: groups are condensed to
    one unit, the units layered top to bottom by networkx's topological
    generations, and a group's members stacked inside its unit."""
    unit_of = {nid: f"g{gr.id}" for gr in g.groups for nid in gr.members}
    members: dict[str, list[int]] = {}
    for nid in g.topo():
        members.setdefault(unit_of.get(nid, f"n{nid}"), []).append(nid)
    condensed = nx.DiGraph()
    condensed.add_nodes_from(members)
    for a, b in g.nx.edges:
        ua, ub = unit_of.get(a, f"n{a}"), unit_of.get(b, f"n{b}")
        if ua != ub:
            condensed.add_edge(ua, ub)
    pos, boxes, top = {}, {}, 0.0
    for row in nx.topological_generations(condensed):
        row = sorted(row, key=lambda u: min(members[u]))
        height = max(len(members[u]) for u in row)
        for col, unit in enumerate(row):
            x = col - (len(row) - 1) / 2
            for k, nid in enumerate(members[unit]):
                pos[nid] = (x * 1.6, top - k)
            if unit.startswith("g"):
                boxes[int(unit[1:])] = (x * 1.6, top, len(members[unit]))
        top -= height + 0.8
    return pos, boxes


def draw(g: Graph, forward: set[int], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle
    except ImportError:
        raise RuntimeError("drawing SVG/PNG needs matplotlib: pip install 'structc[graph]' "
                           "(or write .dot and render it with Graphviz)") from None
    pos, boxes = _layout(g)
    xs = [p[0] for p in pos.values()] or [0]
    ys = [p[1] for p in pos.values()] or [0]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * (max(xs) - min(xs) + 2)), max(6, 0.75 * (max(ys) - min(ys) + 2))))
    nx.draw_networkx_edges(g.nx, pos, ax=ax, arrows=True, arrowsize=8, edge_color="#999999", width=0.7,
                           connectionstyle="arc3,rad=0.08")
    for nid, (x, y) in pos.items():
        ax.text(x, y, _label(g, nid), ha="center", va="center", fontsize=5.5,
                bbox={"boxstyle": "round,pad=0.3", "fc": _colour(g, nid, forward), "ec": "#555555", "lw": 0.5})
    kinds = {gr.id: gr.kind for gr in g.groups}
    for gid, (x, y, n) in boxes.items():
        ax.add_patch(Rectangle((x - 0.72, y - n + 0.5), 1.44, n, fill=False, ls="--", lw=0.9, ec="#333333"))
        ax.text(x - 0.7, y + 0.52, f"group {gid} ({kinds[gid]})", fontsize=5, va="bottom")
    ax.set_xlim(min(xs) - 1, max(xs) + 1)
    ax.set_ylim(min(ys) - 1, max(ys) + 1)
    ax.set_title(f"{g.name}: forward (blue), backward (orange), inputs and constants (grey); "
                 "dashed boxes are fused kernels", fontsize=8)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def write(g: Graph, forward: set[int], path: str) -> None:
    suffix = Path(path).suffix.lower()
    if suffix in (".dot", ".gv"):
        Path(path).write_text(to_dot(g, forward))
    elif suffix in (".svg", ".png", ".pdf"):
        draw(g, forward, path)
    else:
        raise ValueError(f"unknown picture format '{suffix}' (use .svg, .png, .pdf or .dot)")
