"""dce: drop nodes no output depends on (discarded VJP halves, unused forward work)."""
from __future__ import annotations

from ..graph import Graph


def dce(g: Graph) -> Graph:
    # One walk back from every output at once: a train graph has an output per
    # parameter, and an ancestors() walk per output would be quadratic.
    live = set(g.outputs.values())
    todo = list(live)
    while todo:
        for i in g.nodes[todo.pop()].inputs:
            if i not in live:
                live.add(i)
                todo.append(i)
    keep = live | set(g.params.values()) | set(g.inputs.values())
    for nid in [n for n in g.nodes if n not in keep]:
        g.remove(nid)
    return g
