"""`structc graph`: pictures of real models stay readable and small, with
captions that describe what is drawn."""
from pathlib import Path

import pytest

from structc import draw
from structc.build import build_model
from structc.cli import main
from structc.compiler import forward_graph, train_graph
from structc.passes import run_pipeline
from structc.passes.plan import param_layout
from structc.syntax import parse

EXAMPLES = Path(__file__).parent.parent / "examples"


def fused(example: str, which: str):
    path = EXAMPLES / example
    mdef = build_model(parse(path.read_text(), str(path)), None)
    if which == "train":
        _, size = param_layout({n: p.type.shape for n, p in mdef.params.items()})
        return run_pipeline(train_graph(mdef, size)), set(mdef.graph.nodes)
    return run_pipeline(forward_graph(mdef)), set(mdef.graph.nodes)


@pytest.mark.parametrize("example", ["lenet5.snet", "graph_families.snet"])
def test_one_box_per_fused_kernel(example):
    g, forward = fused(example, "train")
    boxes, links = draw._boxes(g, forward)
    kernels = {k for k in boxes if not k.startswith("in:")}
    assert kernels == {f"g{gr.id}" for gr in g.groups}        # no box per parameter, constant or view
    assert len(boxes) - len(kernels) <= 2                      # inputs: x and y; a graph's arrays are one box


def test_layers_run_left_to_right_forward_and_back_below():
    g, forward = fused("lenet5.snet", "train")
    boxes, links = draw._boxes(g, forward)
    draw._place(boxes, links)
    for a, b in links.edges:
        A, B = boxes[a], boxes[b]
        if A.backward == B.backward and not A.source:
            assert (B.col > A.col) if not A.backward else (B.col < A.col), (a, b)
    assert max(b.row for b in boxes.values() if b.backward) < min(b.row for b in boxes.values() if not b.backward)


def test_caption_names_only_what_is_drawn():
    g, forward = fused("lenet5.snet", "forward")
    boxes, _ = draw._boxes(g, forward)
    text = draw.caption(g, boxes, fused=True)
    assert "forward (blue)" in text and "backward" not in text
    g, forward = fused("lenet5.snet", "train")
    boxes, _ = draw._boxes(g, forward)
    assert "backward (orange)" in draw.caption(g, boxes, fused=True)


@pytest.mark.slow
@pytest.mark.parametrize("example, which", [("graph_families.snet", "train"), ("lenet5.snet", "train"),
                                            ("lenet5.snet", "forward")])
def test_png_of_a_real_model_is_capped(example, which, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread
    out = tmp_path / "g.png"
    assert main(["graph", str(EXAMPLES / example), "-o", str(out), "--which", which]) == 0
    height, width = imread(out).shape[:2]
    assert max(height, width) <= draw.MAX_PIXELS and height * width <= 20e6, (width, height)
