"""Writes the small data files of tests/test_readers.py (run once; the files are committed).

    python tests/data/make_data.py
"""
from pathlib import Path

import networkx as nx
import numpy as np

HERE = Path(__file__).parent
GOOD, BAD, PLAIN = ["good", "great", "fun"], ["bad", "dull", "awful"], ["movie", "plot", "film", "the"]


def phrase(rng, words, label):
    """(label (label w1) (label w2)) over one sentiment word and one neutral word."""
    w, n = rng.choice(words), rng.choice(PLAIN)
    return f"({label} (2 {n}) ({label} {w}))" if rng.random() < 0.5 else f"({label} ({label} {w}) (2 {n}))"


def treebank(rng, count=48):
    lines = []
    for k in range(count):
        label = 3 if k % 2 else 1
        words = GOOD if label == 3 else BAD
        lines.append(f"({label} {phrase(rng, words, label)} (2 (2 the) (2 {rng.choice(PLAIN)})))")
    return lines


def tu_folder(folder: Path, rng, count=40):
    """Cycles (label 1) and paths (label -1) of 4-8 nodes, TU numbering from 1."""
    folder.mkdir(exist_ok=True)
    edges, indicator, labels, node_labels, first = [], [], [], [], 1
    for k in range(count):
        n = int(rng.integers(4, 9))
        G = nx.cycle_graph(n) if k % 2 else nx.path_graph(n)
        for u, v in G.edges:
            edges += [(u + first, v + first), (v + first, u + first)]
        indicator += [k + 1] * n
        node_labels += [int(G.degree[v]) for v in G]
        labels.append(1 if k % 2 else -1)
        first += n
    (folder / "TINY_A.txt").write_text("".join(f"{u}, {v}\n" for u, v in edges))
    (folder / "TINY_graph_indicator.txt").write_text("".join(f"{g}\n" for g in indicator))
    (folder / "TINY_graph_labels.txt").write_text("".join(f"{y}\n" for y in labels))
    (folder / "TINY_node_labels.txt").write_text("".join(f"{d}\n" for d in node_labels))


def node_folder(folder: Path, rng):
    """Two communities of 12 nodes joined by one edge; the label is the community."""
    folder.mkdir(exist_ok=True)
    G = nx.connected_caveman_graph(2, 12)
    comm = [0] * 12 + [1] * 12
    (folder / "edges.csv").write_text("source,target\n" + "".join(f"{u},{v}\n" for u, v in G.edges))
    (folder / "labels.txt").write_text("".join(f"{c}\n" for c in comm))
    x = rng.normal(size=(24, 3)).round(3)
    (folder / "features.csv").write_text("a,b,c\n" + "".join(",".join(map(str, row)) + "\n" for row in x))


def table(path: Path, rng, count=120):
    x = rng.normal(size=(count, 4)).round(3)
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    path.write_text("f1,f2,f3,f4,label\n" + "".join(",".join(map(str, r)) + f",{c}\n" for r, c in zip(x, y)))


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    (HERE / "treebank.txt").write_text("\n".join(treebank(rng)) + "\n")
    (HERE / "bad_bracket.txt").write_text("(1 (1 bad) (2 movie))\n(3 (3 good) (2 film)\n(3 (3 fun) (2 plot))\n")
    tu_folder(HERE / "tu_tiny", rng)
    node_folder(HERE / "nodes_tiny", rng)
    table(HERE / "table.csv", rng)
    (HERE / "ragged.csv").write_text("f1,f2,label\n0.5,1.0,1\n0.1,0.2\n0.3,0.4,0\n")
    bad = HERE / "tu_bad_indicator"
    bad.mkdir(exist_ok=True)
    (bad / "BAD_A.txt").write_text("1, 2\n2, 1\n3, 4\n4, 3\n")
    (bad / "BAD_graph_indicator.txt").write_text("1\n1\n2\n3\n")     # line 4: graph 3 of 2
    (bad / "BAD_graph_labels.txt").write_text("0\n1\n")
