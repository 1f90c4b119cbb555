"""dce: drop nodes no output depends on (discarded VJP halves, unused forward work)."""
from __future__ import annotations

import networkx as nx

from ..graph import Graph


def dce(g: Graph) -> Graph:
    live = set()
    for nid in g.outputs.values():
        live |= {nid} | nx.ancestors(g.nx, nid)
    keep = live | set(g.params.values()) | set(g.inputs.values())
    for nid in [n for n in g.nodes if n not in keep]:
        g.remove(nid)
    return g
