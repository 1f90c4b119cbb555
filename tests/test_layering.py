"""The import direction of structc's modules (docs/ARCHITECTURE.md, "Import direction"):

    front end (syntax, build, gnn, recursion, ...) -> layers -> ops -> graph / types / errors

with `lower`, `passes`, `autodiff` and `interp` beside the ops (the compiler's core: they
find ops by name through the registry). Every import counts, including those inside
functions: an import moved into a function still ties the modules together.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "structc"

FRONT_END = {"structc.syntax", "structc.build", "structc.gnn", "structc.recursion", "structc.graphs",
             "structc.forest"}
#: the compiler's core: primitive ops and what lowers, rewrites, differentiates and runs graphs
CORE_PREFIXES = ("structc.ops", "structc.lower", "structc.passes")
CORE_MODULES = {"structc.errors", "structc.types", "structc.graph", "structc.autodiff", "structc.interp"}
#: tree_map is a higher-order op: its attribute is a graph (the node case), which its VJP
#: differentiates and compiles and its reference interprets. These imports run at compile
#: time only, reach the core and nothing above it.
TREE_MAP_NEEDS = {"structc.passes", "structc.passes.plan", "structc.passes.dce", "structc.autodiff",
                  "structc.interp"}


def _module_name(path: Path) -> tuple[str, str]:
    """(module, package its relative imports start from)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        name = ".".join(parts[:-1])
        return name, name
    name = ".".join(parts)
    return name, name.rsplit(".", 1)[0]


def imports_of(source: str, package: str, known: set[str]) -> list[tuple[str, bool]]:
    """(structc module imported, at module level?) for every import in `source`,
    inside functions too; `from .x import y` counts as `x.y` when that is a module."""
    tree = ast.parse(source)
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                target = sub if sub in known else module
                if target.startswith("structc"):
                    found.append((target, id(node) in top))
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in top) for a in node.names if a.name.startswith("structc")]
    return found


def _modules() -> dict[str, tuple[str, str]]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name, package = _module_name(path)
        out[name] = (path.read_text(), package)
    return out


MODULES = _modules()
IMPORTS = {name: imports_of(src, pkg, set(MODULES)) for name, (src, pkg) in MODULES.items()}


def _is_core(module: str) -> bool:
    return module in CORE_MODULES or module.startswith(CORE_PREFIXES)


def _is_layers(module: str) -> bool:
    return module == "structc.layers" or module.startswith("structc.layers.")


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_the_layout_is_what_these_rules_name():
    assert "structc.layers.context" in MODULES and "structc.ops.matmul" in MODULES
    assert FRONT_END <= set(MODULES)


def test_ops_import_only_the_core():
    """No front end, no layer: an op is its shape rule, VJP, reference and lowering."""
    below = ("structc.errors", "structc.types", "structc.graph")
    wrong = []
    for name, found in IMPORTS.items():
        if not _within(name, "structc.ops"):
            continue
        for target, _ in found:
            ok = target in below or _within(target, "structc.ops") or _within(target, "structc.lower")
            ok = ok or (name == "structc.ops.tree" and target in TREE_MAP_NEEDS)
            if not ok:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_layers_import_ops_and_below_only():
    allowed = ("structc.errors", "structc.types", "structc.graph")
    wrong = [f"{name} imports {target}" for name, found in IMPORTS.items() if _is_layers(name)
             for target, _ in found
             if not (_is_layers(target) or _within(target, "structc.ops") or target in allowed)]
    assert not wrong, "\n".join(wrong)


def test_the_core_imports_neither_layers_nor_front_end():
    wrong = [f"{name} imports {target}" for name, found in IMPORTS.items() if _is_core(name)
             for target, _ in found if not _is_core(target)]
    assert not wrong, "\n".join(wrong)


def test_no_cycle_through_ops_layers_or_front_end_at_module_level():
    g = nx.DiGraph()
    for name, found in IMPORTS.items():
        for target, top in found:
            if top and target != "structc":      # the package's own __init__ re-exports the API
                g.add_edge(name, target)
    mine = FRONT_END | {m for m in MODULES if _is_layers(m) or _is_core(m)}
    cycles = [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1 and c & mine]
    assert not cycles, cycles


def test_the_checker_sees_imports_inside_functions():
    """The rules above would pass vacuously if imports in functions were missed."""
    source = "def f():\n    from ..build import Word\n    import structc.gnn\n"
    found = imports_of(source, "structc.ops", set(MODULES))
    assert found == [("structc.build", False), ("structc.gnn", False)]
    assert imports_of("from .context import surface\n", "structc.layers", set(MODULES)) == [
        ("structc.layers.context", True)]


@pytest.mark.parametrize("module", ["structc.ops", "structc.layers", "structc.build"])
def test_each_part_imports_on_its_own(module):
    out = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_the_language_functions_are_the_layers():
    from structc.layers import SURFACE
    from structc.ops import REGISTRY
    assert {"dense", "conv2d", "conv", "conv1d", "maxpool2d", "avgpool2d", "global_avg_pool", "mean", "mse",
            "binary_cross_entropy", "masked_cross_entropy", "onehot", "flatten", "reshape",
            "greater", "greater_equal", "log_softmax", "clip", "layer_norm", "batch_norm",
            "lstm_cell", "gru_cell", "zeros", "chunk", "gat", "dropout"} == set(SURFACE)
    for name, fn in SURFACE.items():
        assert fn.__module__.startswith("structc.layers."), name
        assert name not in REGISTRY or not REGISTRY[name].surface, name   # one meaning per name


def test_every_package_is_installed():
    """A wheel lists its packages by hand: a new one (such as structc.layers) missing
    there would import here, from the checkout, and fail after `pip install`."""
    import tomllib
    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    on_disk = {name for name in MODULES if (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()}
    assert on_disk <= listed, sorted(on_disk - listed)
