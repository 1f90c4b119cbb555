"""inference: rewrite a graph as it runs outside training.

Some ops compute something else when the model is used rather than trained:
dropout passes its input through, batch normalisation reads its running
statistics instead of the batch's. Such an op says how with
`inference(builder, node)`, returning the replacement value (or None to stay
as it is); the forward entry (`compiler.forward_graph`) is built from the
rewritten graph, the training entry from the graph as written.
"""
from __future__ import annotations

from ..graph import Graph
from .legalize import rewrite_by_rule


def inference(g: Graph) -> Graph:
    return rewrite_by_rule(g, "inference")
