"""Evaluate a graph with numpy, op by op, from each op's `reference`.

This is the meaning of a graph: tests compare native code, fused or not,
against it, and finite differences run through it in float64. A row id
outside the rows it picks from is an error here, as at a `Net` call.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from .graph import Graph


def infer_dims(graph: Graph, inputs: Mapping[str, np.ndarray]) -> dict[str, int]:
    dims: dict[str, int] = {}
    for name, nid in graph.inputs.items():
        if name not in inputs:
            continue
        for d, n in zip(graph.nodes[nid].shape, np.shape(inputs[name])):
            if isinstance(d, str):
                dims.setdefault(d, int(n))
    return dims


def evaluate(graph: Graph, inputs: Mapping[str, np.ndarray], params: Mapping[str, np.ndarray],
             dtype=np.float64, outputs: list[str] | None = None,
             dims: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Values of the graph's outputs (all, or those named). Float inputs and
    parameters are cast to `dtype`; integer inputs are kept. `dims` binds
    symbols no input shows (a tree body's per-child `kids`)."""
    dims = {**infer_dims(graph, inputs), **(dims or {})}
    wanted = outputs if outputs is not None else list(graph.outputs)
    needed: set[int] = set()
    for name in wanted:
        nid = graph.outputs[name]
        needed |= {nid} | graph.ancestors(nid)
    vals: dict[int, np.ndarray] = {}
    for nid in graph.topo():
        if nid not in needed:
            continue
        node = graph.nodes[nid]
        if node.op.name == "input":
            v = np.asarray(inputs[node.attrs["name"]])
            vals[nid] = v.astype(dtype) if v.dtype.kind == "f" else v
        elif node.op.name == "param":
            vals[nid] = np.asarray(params[node.attrs["name"]]).astype(dtype)
        else:
            attrs = dict(node.attrs)
            if "needs_dims" in node.op.traits:
                attrs["dims"] = dims
            args = [vals[i] for i in node.inputs]
            for pos, rows in node.op.index_bounds(graph, node).items():
                rows = rows if isinstance(rows, int) else dims.get(rows)
                if rows is not None:        # a size no input shows is not checked
                    _check_row_ids(node, args[pos], rows)
            out = node.op.reference(*args, **attrs)
            vals[nid] = np.asarray(out, dtype=dtype) if node.type.is_float else np.asarray(out)
    return {name: vals[graph.outputs[name]] for name in wanted}


def _check_row_ids(node, ids: np.ndarray, rows: int) -> None:
    """Refuse a row id outside [0, rows), as `Net` does before native code runs (the
    references clamp, as the kernels do, which would silently be another row)."""
    outside = (ids < 0) | (ids >= rows)
    if outside.any():
        where = f" at {node.span.line}:{node.span.col}" if node.span is not None else ""
        raise ValueError(f"{node.op.name}{where}: id {ids[outside][0]} is outside [0, {rows}), the rows it "
                         "picks from")
