"""The README, checked: every code block builds, runs or parses, and every
number it claims is reproduced.

Blocks are found generically, by their fence's language:

* a block holding `model Name {` (plain or ```snet) is compiled, every model in it;
* a plain block that starts `file.snet:L:C: error:` is a diagnostic: the comment
  before it names the source that produces it (`error-of=PATH`, the path's
  `# error:` comments are dropped), and `structc check` must print the block;
* ```python blocks are executed in a scratch folder that holds `examples/`,
  after the setup the comment before them names (`setup=NAME`, see SETUPS);
* ```sh lines: each `structc ...` command (also in backticks in the prose) must
  parse with the command line's own parser, name stages and data sets that
  exist, and the flags its comment lists must exist; `pip`/`pytest` lines are
  the quick start, which tests/test_cli.py runs.

An HTML comment on the line before a block, `<!-- readme-test: KEY=VALUE -->`,
gives what a block needs; `<!-- readme-test: skip=REASON -->` skips it.

Every percentage in the README must be a claim this file knows (CLAIMS); a
training result is checked by running the command the README gives next to it.
"""
from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import structc
from structc.cli import main, parser
from structc.compiler import STAGES
from structc.datasets import DATASETS
from structc.syntax import parse

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DIRECTIVE = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->")
DIAGNOSTIC = re.compile(r"^(\S+\.snet):\d+:\d+: error: ")
MODEL = re.compile(r"^\s*model\s+\w+\s*\{", re.M)


@dataclass
class Block:
    lang: str
    text: str
    line: int                                   # of the opening fence, 1-based
    directives: dict = field(default_factory=dict)

    def __str__(self):
        return f"README.md:{self.line} ({self.lang or 'plain'})"


def read_blocks(text: str) -> tuple[list[Block], str]:
    """The fenced blocks, and the prose with blocks blanked out."""
    blocks, prose, lines, k = [], [], text.splitlines(), 0
    while k < len(lines):
        fence = lines[k].strip()
        if not fence.startswith("```"):
            prose.append(lines[k])
            k += 1
            continue
        start, body = k, []
        k += 1
        while k < len(lines) and lines[k].strip() != "```":
            body.append(lines[k])
            k += 1
        k += 1
        above = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
        found = DIRECTIVE.search(above)
        directives = dict(part.split("=", 1) for part in found.group(1).split(";")) if found else {}
        blocks.append(Block(fence[3:].strip(), "\n".join(body), start + 1,
                            {k.strip(): v.strip() for k, v in directives.items()}))
        prose.append("")
    return blocks, "\n".join(prose)


BLOCKS, PROSE = read_blocks(README.read_text())


def kind(block: Block) -> str:
    if "skip" in block.directives:
        return "skip"
    if block.lang == "python":
        return "python"
    if block.lang in ("sh", "bash", "console"):
        return "sh"
    if block.lang == "json":
        return "json"
    if block.lang in ("", "snet", "text"):
        if DIAGNOSTIC.match(block.text.lstrip()):
            return "diagnostic"
        if MODEL.search(block.text):
            return "model"
    return "unknown"


def blocks_of(k: str) -> list:
    return [pytest.param(b, id=f"line{b.line}") for b in BLOCKS if kind(b) == k]


def test_every_block_is_of_a_kind_this_file_checks():
    unknown = [str(b) for b in BLOCKS if kind(b) == "unknown"]
    assert not unknown, f"blocks this test does not know how to check: {unknown} (see the module docstring)"
    assert {kind(b) for b in BLOCKS} >= {"model", "python", "sh", "diagnostic", "json"}


# -- models ---------------------------------------------------------------------

def readme_models() -> dict[str, str]:
    """Each model the README defines, by name, with its block's source."""
    return {name: b.text for b in BLOCKS if kind(b) == "model"
            for name in parse(b.text, "README.md").model_names}


@pytest.mark.slow
@pytest.mark.parametrize("block", blocks_of("model"))
def test_model_block_compiles(block):
    for name in parse(block.text, str(block)).model_names:
        net = structc.compile(block.text, name)
        assert net.params, f"{block}: model {name} has no parameters"


# -- metrics records -----------------------------------------------------------------

@pytest.mark.parametrize("block", blocks_of("json"))
def test_json_block_has_the_fields_a_training_run_writes(block, tmp_path, capsys):
    import json
    shown = json.loads(block.text)
    assert main(["train", str(ROOT / "examples/digits_mlp.snet"), "--data", "digits", "--epochs", "1",
                 "--no-progress", "--out", str(tmp_path / "run.npz")]) == 0
    written = json.loads((tmp_path / "run.metrics.jsonl").read_text().splitlines()[0])
    assert sorted(shown) == sorted(written), f"{block}: a record has the fields {sorted(written)}"


# -- diagnostics ------------------------------------------------------------------

@pytest.mark.parametrize("block", blocks_of("diagnostic"))
def test_diagnostic_block_is_what_structc_check_prints(block, tmp_path, monkeypatch, capsys):
    assert "error-of" in block.directives, f"{block}: say which source gives this error (error-of=PATH)"
    source = (ROOT / block.directives["error-of"]).read_text()
    name = DIAGNOSTIC.match(block.text.lstrip()).group(1)
    (tmp_path / name).write_text(re.sub(r"\s*# error:.*", "", source))
    monkeypatch.chdir(tmp_path)
    assert main(["check", name]) == 1
    printed = [ln.rstrip() for ln in capsys.readouterr().err.strip("\n").splitlines()]
    assert printed == [ln.rstrip() for ln in block.text.strip("\n").splitlines()]


# -- python ---------------------------------------------------------------------

def setup_digits(ns: dict) -> None:
    from structc.datasets import load_digits
    d = load_digits()
    w = structc.compile(ROOT / "examples" / "digits_mlp.snet").params["dense1.w"] * 0.5   # weights to set
    ns.update(images=d.x_test[:32], labels=d.y_test[:32].astype(np.int32), w=w)


def setup_trees(ns: dict) -> None:
    ns["net"] = structc.compile(readme_models()["TreeNet"], "TreeNet")


def setup_graphs(ns: dict) -> None:
    import networkx as nx
    rng = np.random.default_rng(0)
    source = readme_models()["GNN"]
    net = structc.compile(source, "GNN")
    features = int(re.search(r"features=(\d+)", source).group(1))
    edge_index = rng.integers(0, 6, (2, 12))
    G = nx.cycle_graph(5)
    nx.set_node_attributes(G, {v: rng.normal(size=features).astype(np.float32) for v in G}, "x")
    parts = [structc.Graph(rng.integers(0, n, (2, 2 * n)), x=rng.normal(size=(n, features)).astype(np.float32))
             for n in (4, 5, 6)]
    ns.update(structc=structc,                  # the README imported it in an earlier block
              net=net, edge_index=edge_index, features=rng.normal(size=(6, features)).astype(np.float32), G=G,
              g1=parts[0], g2=parts[1], g3=parts[2], labels=rng.integers(0, 4, 15).astype(np.int32))


SETUPS = {"digits": setup_digits, "trees": setup_trees, "graphs": setup_graphs}


@pytest.fixture
def threads_restored():
    before = structc.get_num_threads()
    yield
    structc.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.parametrize("block", blocks_of("python"))
def test_python_block_runs(block, tmp_path, monkeypatch, threads_restored):
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    ns = {"__name__": "readme"}
    setup = block.directives.get("setup")
    if setup:
        assert setup in SETUPS, f"{block}: no setup named {setup!r} (known: {', '.join(SETUPS)})"
        SETUPS[setup](ns)
    exec(compile(block.text, str(block), "exec"), ns)


# -- commands ---------------------------------------------------------------------

def structc_commands(prose: bool) -> list[tuple[str, str, str]]:
    """(where, command, its comment) for every command line in sh blocks, or
    every `structc ...` in backticks in the prose."""
    found = []
    if prose:
        for m in re.finditer(r"`(structc [^`]+)`", PROSE):
            found.append((f"README.md:{PROSE.count(chr(10), 0, m.start()) + 1}", m.group(1), ""))
        return found
    for b in BLOCKS:
        if kind(b) != "sh":
            continue
        for k, line in enumerate(b.text.splitlines()):
            command, _, comment = line.partition("#")
            for part in command.split("&&"):
                part = part.strip()
                if part and not re.match(r"(pip|pytest)\b", part):     # the quick start: tests/test_cli.py
                    found.append((f"README.md:{b.line + 1 + k}", part, comment))
    return found


def subcommands() -> dict:
    return parser()._subparsers._group_actions[0].choices


def options_of(sub: str) -> set[str]:
    return {o for action in subcommands()[sub]._actions for o in action.option_strings}


def check_flags(where: str, sub: str, words: list[str]) -> None:
    for flag in words:
        flag = flag.split("=")[0]
        assert flag in options_of(sub), f"{where}: `structc {sub}` has no option {flag} (see --help)"


@pytest.mark.parametrize("where, command, comment", structc_commands(prose=False), ids=lambda v: v[:60])
def test_command_line_parses_with_the_real_options(where, command, comment):
    words = shlex.split(command)
    assert words[0] == "structc", f"{where}: only structc, pip and pytest commands are checked: {command}"
    try:
        args = parser().parse_args(words[1:])
    except SystemExit:
        pytest.fail(f"{where}: `{command}` does not parse (see `structc {words[1]} --help`)")
    for stage in getattr(args, "dump", None) or []:
        assert stage in STAGES or stage == "all", f"{where}: no stage {stage!r}"
    if getattr(args, "data", None) and not Path(args.data).suffix and "/" not in args.data:   # not a path
        assert args.data in DATASETS, f"{where}: no data set {args.data!r}"
    if getattr(args, "file", "").startswith("examples/"):
        assert (ROOT / args.file).exists(), f"{where}: no file {args.file}"
    check_flags(where, words[1], re.findall(r"(?<![\w-])--[a-z][\w-]*", comment))


@pytest.mark.parametrize("where, command, comment", structc_commands(prose=True), ids=lambda v: v[:60])
def test_command_named_in_the_prose_exists(where, command, comment):
    """The prose may name a command or an option alone (`structc compile -o`)."""
    words = shlex.split(command)
    if len(words) < 2 or words[1].startswith("<"):           # `structc <command> --help`
        assert set(words[2:]) <= {"--help", "-h"}, f"{where}: {command}"
        return
    assert words[1] in subcommands(), f"{where}: there is no `structc {words[1]}`"
    check_flags(where, words[1], [w for w in words[2:] if w.startswith("-")])
    if len(words) > 3 and all(not w.startswith("<") for w in words):    # a whole command: it must parse
        test_command_line_parses_with_the_real_options(where, command, comment)


# -- numbers ------------------------------------------------------------------------

@dataclass
class Claim:
    """A number the README states and how it is checked."""
    pattern: str                   # matches the README's text around the number
    command: str | None = None     # a training run whose final held-out accuracy must reach the number
    check: object = None           # or a function that checks it


def logic_is_balanced():
    from structc.treedata import load_logic
    roots = np.array([int(f.root_labels[0]) for f in load_logic().test])
    assert abs(roots.mean() - 0.5) < 0.03


def sentiment_is_balanced():
    """Chance is 20%: each of the five labels is a fifth of the held-out sentences."""
    from structc.treedata import load_sentiment
    roots = np.array([int(f.root_labels[0]) for f in load_sentiment().test])
    assert np.all(np.abs(np.bincount(roots, minlength=5) / len(roots) - 0.2) < 0.02)


def atlas_majority_is_79_6():
    from structc.graph_datasets import load_atlas
    d = load_atlas()
    held_out = d.labels[d.test]
    assert round(100 * np.bincount(held_out).max() / len(held_out), 1) == 79.6


def digits_has_1797_images():
    from structc.datasets import load_digits
    d = load_digits()
    assert len(d.x_train) + len(d.x_test) == 1797


def node_sets_reorder_from_1024():
    from structc.graph_datasets import REORDER_AT, NodeDataset
    assert REORDER_AT == 1024
    for n, reordered in ((1023, False), (1024, True)):
        ring = np.stack([np.arange(n), (np.arange(n) + 1) % n])
        d = NodeDataset("ring", structc.Graph(ring, x=np.ones((n, 1))), np.zeros(n), [0], [1])
        assert (d.graph.node_order is not None) == reordered


def gate_math_joins_its_product_from_32_units():
    from structc.autodiff import differentiate
    from structc.build import build_model
    from structc.passes import run_pipeline
    from structc.syntax import parse
    src = ("model M {{\n  input s: sequence of f32[5]\n  target y: class[s.sequences] of 3\n"
           "  rec (h, c)(t) = init: (zeros({n}), zeros({n}))\n"
           "                  next: lstm_cell(t.x, h(t.prev), c(t.prev), {n})\n"
           "  loss cross_entropy(dense(h(s.last), 3), y)\n}}\n")
    for n, joined in ((32, True), (64, True), (48, False), (24, False)):
        g = run_pipeline(differentiate(build_model(parse(src.format(n=n))).graph))
        body = next(nd for nd in g.nodes.values() if nd.op.name == "tree_map").attrs["fwd"].graph
        assert any(gr.gate is not None for gr in body.groups) == joined, n


def finetuned_head_reaches_92():
    import tempfile
    sys.path.insert(0, str(ROOT / "examples"))
    from finetune_digits import run
    with tempfile.TemporaryDirectory() as d:
        assert abs(100 * run(Path(d))["head_only"] - 92) <= 1.5


CLAIMS = [
    Claim(r"reaches about (96)% held-out accuracy", "structc train examples/digits_mlp.snet --data digits"),
    Claim(r"about (97\.5)% held-out\s+accuracy on the digits",
          "structc train examples/digits_cnn.snet --data digits"),
    Claim(r"reaches about (97)%\s+held out with `structc train examples/lenet5_bn.snet",
          "structc train examples/lenet5_bn.snet --data digits"),
    Claim(r"perceptron.snet --data digits` reaches about (93)% held out",
          "structc train examples/perceptron.snet --data digits"),
    Claim(r"digits_dropout.snet --data digits --epochs 40` reaches about (97)%",
          "structc train examples/digits_dropout.snet --data digits --epochs 40"),
    Claim(r"\((100)% held out; chance 50%\)",
          "structc train examples/logic_tree.snet --data logic --optimizer adam --lr 0.003"),
    Claim(r"chance (50)%", check=logic_is_balanced),
    Claim(r"Tree-LSTM[^%]*?to\s+(100)% held out in two epochs",
          "structc train examples/logic_treelstm.snet --data logic --optimizer adam --lr 0.003 --epochs 2"),
    Claim(r"binary Tree-LSTM to about (96)% held out",
          "structc train examples/sentiment_treelstm.snet --data sentiment --optimizer adam --lr 0.003 --epochs 10 "
          "--schedule cosine --decay-steps 1880"),
    Claim(r"\(chance (20)%\)", check=sentiment_is_balanced),
    Claim(r"sentiment_bow\.snet[^)]*\)\s+reach about (58)%",
          "structc train examples/sentiment_bow.snet --data sentiment --optimizer adam --lr 0.003 --epochs 10 "
          "--schedule cosine --decay-steps 1880"),
    Claim(r"--data karate .*# (93\.75)% held out",
          "structc train examples/karate_gcn.snet --data karate --epochs 100 --optimizer adam --lr 0.01"),
    Claim(r"karate_gat\.snet --data karate .*# (93\.75)% held out",
          "structc train examples/karate_gat.snet --data karate --epochs 100 --optimizer adam --lr 0.01"),
    Claim(r"--data graph_families .*# (98\.7)% held out",
          "structc train examples/graph_families.snet --data graph_families --epochs 40 --optimizer adam "
          "--lr 0.003 --schedule cosine --decay-steps 600"),
    Claim(r"--data atlas .*# (98\.0)% held out",
          "structc train examples/atlas_gnn.snet --data atlas --epochs 40 --optimizer adam --lr 0.003"),
    Claim(r"\"connected\" scores (79\.6)%", check=atlas_majority_is_79_6),
    Claim(r"\((1,797) images", check=digits_has_1797_images),
    Claim(r"8 rows of 8 pixels \(about (98)% held out\)",
          "structc train examples/digits_lstm.snet --data digits_rows --epochs 15 --optimizer adam --lr 0.01"),
    Claim(r"convolutions frozen it\s+reaches about (92)% held out", check=finetuned_head_reaches_92),
    Claim(r"data set of (1,024) nodes\s+or more is kept so by itself", check=node_sets_reorder_from_1024),
    Claim(r"units are a\s+multiple of (32) \(an `lstm_cell`", check=gate_math_joins_its_product_from_32_units),
]


def test_every_percentage_is_a_known_claim():
    text = README.read_text()
    spans = [(m.start(1), m.end(1)) for c in CLAIMS for m in re.finditer(c.pattern, text)]
    for c in CLAIMS:
        assert re.search(c.pattern, text), f"the README no longer says {c.pattern!r}: update CLAIMS"
        if c.command:
            assert c.command in text, f"the README no longer gives `{c.command}`: update CLAIMS"
    for m in re.finditer(r"\d+(?:\.\d+)?(?=\s?%)", text):
        if not any(a <= m.start() < b for a, b in spans):
            line = text.count("\n", 0, m.start()) + 1
            pytest.fail(f"README.md:{line} claims {m.group()}%, which no test checks: add it to CLAIMS")


def final_accuracy(command: str, tmp_path, capsys) -> float:
    words = shlex.split(command)[1:] + ["--no-progress", "--out", str(tmp_path / "p.npz")]
    words[1] = str(ROOT / words[1])
    assert main(words) == 0
    text = capsys.readouterr().out
    return float(text.strip().splitlines()[-1].rsplit(" ", 1)[-1].rstrip("%"))


@pytest.mark.slow
@pytest.mark.parametrize("claim", [c for c in CLAIMS if c.command], ids=lambda c: c.command.split()[2])
def test_claimed_accuracy_is_reached(claim, tmp_path, capsys):
    """`about X%`: within 1.5 points; an exact X%: within one held-out example
    of the smallest held-out set (150 graphs: 0.7 point), or above."""
    m = re.search(claim.pattern, README.read_text())
    claimed = float(m.group(1))
    slack = 1.5 if "about" in m.group(0) else 0.7
    assert final_accuracy(claim.command, tmp_path, capsys) >= claimed - slack


@pytest.mark.slow
@pytest.mark.parametrize("claim", [c for c in CLAIMS if c.check], ids=lambda c: c.check.__name__)
def test_claimed_fact_holds(claim):
    claim.check()
