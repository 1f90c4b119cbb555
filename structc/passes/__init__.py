"""Graph-to-graph passes, in the order they run.

Each is a function `Graph -> Graph` whose module says why it exists; every
stage can be printed with `structc compile --dump=<name>` and the graph is
verified after each.
"""
from __future__ import annotations

from ..graph import Graph
from .cse import cse
from .dce import dce
from .fuse import fuse
from .legalize import legalize
from .materialize import materialize
from .simplify import simplify

PIPELINE = [
    ("simplify", simplify),
    ("cse", cse),
    ("dce", dce),
    ("legalize", legalize),
    ("cse2", cse),
    ("materialize", materialize),
    ("dce2", dce),
    ("fuse", fuse),
]


def run_pipeline(g: Graph, dump=None, vector_width: int = 16) -> Graph:
    """Run every pass; `dump(name, graph)` sees the graph after each.
    `vector_width`: the target's lanes, for `legalize` (the one pass that
    depends on the target)."""
    for name, pass_ in PIPELINE:
        g = pass_(g, vector_width) if pass_ is legalize else pass_(g)
        g.verify()
        if dump is not None:
            dump(name, g)
    return g
