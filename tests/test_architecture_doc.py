"""docs/ARCHITECTURE.md and docs/DISTRIBUTED.md, checked where it is mechanical.

Nothing else checks these docs (tests/test_readme.py checks the README), and
code moves under them. So every name in backticks outside code blocks that
points into the repository must still be there:

* a path (`structc/files.py`, `runtime/structc_rt.c`, `lower/gemm.py`,
  `structc/layers/*.py`) must exist; `ops/`, `lower/`, `passes/` and
  `layers/` are read as under `structc/`;
* a dotted name whose first part is a structc module (`compiler.PARTS`,
  `ops.norm.freeze_statistics`, `structc.heldout.Tally`, `_runtime.handoffs()`)
  or a class defined in structc (`Net.apply_update`, `Forest.index`) must
  resolve to an attribute of it. A short module name may name several
  modules (`conv` is in `ops/`, `lower/` and `layers/`): one of them must
  have it. An instance attribute counts when the class assigns
  `self.<name>` or annotates it.

What a name does is not checked here; that is for whoever edits the text.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "structc"
DOCS = [ROOT / "docs" / "ARCHITECTURE.md", ROOT / "docs" / "DISTRIBUTED.md"]

# Dotted names that look like structc's but are not module attributes. Each
# with its reason; keep this short.
ALLOWED = {
    "graph.inputs": "a Graph's attribute (`graph` is the instance, as in `graph.params`)",
    "graph.params": "a Graph's attribute",
    "graph.outputs": "a Graph's attribute",
    "graph.groups": "a Graph's attribute, set by fuse",
    "graph.users": "a Graph's method, read through a SpecGraph view",
    "plan.calls": "a `_runtime.CallPlan` instance's counter (`plan` is the instance)",
    "plan.train": "a `_runtime.CallPlan` instance's method",
    "plan.native_seconds": "a `_runtime.CallPlan` instance's counter",
    "pool.take": "a ForestPool's or GraphPool's method (`pool` is the instance)",
    "pool.take_many": "a ForestPool's or GraphPool's method",
}

# Short names the doc uses for a module or an instance of a structc class.
ALIASES = {"S": "structc.syntax"}                      # `from . import syntax as S`
INSTANCES = {"ctx": "structc.layers.context.Context", "kb": "structc.lower.module.KernelBuilder",
             "cg": "structc.lower.codegen.CG", "b": "structc.graph.Builder",
             "dp": "structc.distributed.DataParallel", "net": "structc.model.Net",
             "epilogue": "structc.lower.fused.FusedExpr"}

FILE_SUFFIXES = {"py", "c", "h", "md", "snet", "lark", "npz", "so", "object",
                 "lowered", "alias", "tables", "json", "csv", "gz", "txt", "onnx"}
REPO_DIRS = ("structc/", "runtime/", "grammar/", "tests/", "benchmarks/", "examples/", "docs/")
PACKAGE_DIRS = ("ops/", "lower/", "passes/", "layers/")
DOTTED = re.compile(r"(?<![\w./-])([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?![\w/-])")
PATH = re.compile(r"(?<![\w./-])((?:[\w.-]+/)+[\w.*-]*)")


def spans(doc: Path) -> list[tuple[int, str]]:
    """(line, text) of every backticked span outside fenced code blocks; a
    span may run on over a line break (`with kb.kernel(...)` at a line's end)."""
    lines, fenced = [], False
    for line in doc.read_text().splitlines():
        fence = line.lstrip().startswith("```")
        fenced ^= fence
        lines.append("" if fence or fenced else line)
    text = "\n".join(lines)
    return [(text.count("\n", 0, m.start()) + 1, m.group(1).replace("\n", " "))
            for m in re.finditer(r"`([^`]+)`", text)]


def modules() -> dict[str, list[str]]:
    """Each structc module's last name (and `structc`) -> its full names;
    from the files, as `lower/` is a namespace package that pkgutil skips."""
    names = {"structc": ["structc"], **{short: [full] for short, full in ALIASES.items()}}
    for path in sorted(PACKAGE.rglob("*.py")) + sorted(PACKAGE.glob("_runtime*.so")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if path.suffix == ".so":
            parts = parts[:-1] + (parts[-1].split(".")[0],)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if len(parts) == 1:                            # structc itself
            continue
        for short, full in ((parts[-1], parts), (parts[1], parts[:2])):   # module; lower
            full = ".".join(full)
            if full not in names.setdefault(short, []):
                names[short].append(full)
    return names


def classes() -> dict[str, list[str]]:
    """Each top-level class name in structc's sources -> the modules defining it."""
    found: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                found.setdefault(node.name, []).append(module)
    return found


def has(owner, attr: str) -> bool:
    if hasattr(owner, attr):
        return True
    if inspect.ismodule(owner):
        try:
            importlib.import_module(f"{owner.__name__}.{attr}")
            return True
        except ImportError:
            return False
    if inspect.isclass(owner):                         # instance attributes
        for cls in owner.__mro__:
            if attr in getattr(cls, "__annotations__", {}):
                return True
            try:
                if re.search(rf"\bself\.{attr}\s*[:=]", inspect.getsource(cls)):
                    return True
            except (OSError, TypeError):
                pass
    return False


def resolves(start, parts: list[str]) -> bool:
    owner = start
    for attr in parts:
        if not has(owner, attr):
            return False
        owner = getattr(owner, attr, None)
        if owner is None:                              # an instance attribute: stop
            return True
        if inspect.ismodule(owner) or inspect.isclass(owner):
            continue
        if not (inspect.isroutine(owner) or isinstance(owner, property)):
            return True                                # a value: its own attrs are data
    return True


def unresolved(name: str, mods, clss) -> str | None:
    """Why `name` names nothing in structc, or None when it resolves or is not structc's."""
    first, *rest = name.split(".")
    if rest[-1] in FILE_SUFFIXES or name in ALLOWED:
        return None
    if first in mods:
        for module in mods[first]:
            if resolves(importlib.import_module(module), rest):
                return None
        return f"no attribute {'.'.join(rest)} in {' or '.join(mods[first])}"
    if first in INSTANCES:
        module, class_name = INSTANCES[first].rsplit(".", 1)
        cls = getattr(importlib.import_module(module), class_name)
        if first == "b":                               # its op methods come from the registry
            from structc.graph import Graph
            cls = cls(Graph())
        return None if resolves(cls, rest) else f"{class_name} (`{first}`) has no {'.'.join(rest)}"
    if first in clss:
        for module in clss[first]:
            if resolves(getattr(importlib.import_module(module), first), rest):
                return None
        return f"class {first} ({', '.join(clss[first])}) has no {'.'.join(rest)}"
    return None                                        # g.x, t.children, np.from_dlpack: not ours


def dotted_names(doc: Path) -> list[tuple[int, str]]:
    return [(line, name) for line, text in spans(doc) for name in DOTTED.findall(text)]


def paths(doc: Path) -> list[tuple[int, str]]:
    found = []
    for line, text in spans(doc):
        for path in PATH.findall(text):
            path = path.rstrip(".")
            if path.startswith(PACKAGE_DIRS):
                path = "structc/" + path
            if path.startswith(REPO_DIRS):
                found.append((line, path))
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_named_paths_exist(doc):
    missing = [f"{doc.name}:{line}: {path}" for line, path in paths(doc)
               if not any(ROOT.glob(path.rstrip("/")))]
    assert not missing, "paths the doc names that do not exist:\n" + "\n".join(missing)


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_dotted_names_resolve(doc):
    mods, clss = modules(), classes()
    wrong = [f"{doc.name}:{line}: `{name}`: {why}" for line, name in dotted_names(doc)
             if (why := unresolved(name, mods, clss))]
    assert not wrong, "names the doc gives that structc does not have:\n" + "\n".join(wrong)


def test_a_wrong_name_or_path_is_caught(tmp_path):
    """The checks can fail: a renamed constant, a missing attribute of a class,
    a module path that is not there."""
    doc = tmp_path / "doc.md"
    doc.write_text("`compiler.PARTZ`, `Net.no_such_method(a,\n b)`, `ops.norm.freeze_statistic`,\n"
                   "`lower/no_such.py`, `structc/nowhere.py`; fine: `compiler.PARTS`, `g.x`\n"
                   "```\n`model.NOT_CHECKED_IN_A_BLOCK`\n```\n")
    mods, clss = modules(), classes()
    wrong = [name for _, name in dotted_names(doc) if unresolved(name, mods, clss)]
    assert wrong == ["compiler.PARTZ", "Net.no_such_method", "ops.norm.freeze_statistic"]
    assert [p for _, p in paths(doc) if not any(ROOT.glob(p))] == [
        "structc/lower/no_such.py", "structc/nowhere.py"]


def environment_variables() -> set[str]:
    """The STRUCTC_* variables structc and its runtime read (each as a quoted name)."""
    found = set()
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "runtime").glob("*.[ch]")]:
        found |= set(re.findall(r"""["'](STRUCTC_[A-Z0-9_]+)["']""", path.read_text(encoding="utf-8")))
    return found


def test_every_environment_variable_is_documented():
    """Every variable read is a row of the doc's table: five (STRUCTC_COMPILE_THREADS,
    _FOREST_SPLIT, _WORKER_SPIN, _NUM_THREADS, _NO_CACHE) were documented nowhere in it."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\|[^|]*\|", text, re.M))
    names = environment_variables()
    assert {"STRUCTC_NUM_THREADS", "STRUCTC_NO_CACHE", "STRUCTC_WORKER_SPIN"} <= names     # the scan finds them
    missing = sorted(n for n in names if not any(f"`{n}`" in row for row in listed))
    assert not missing, f"read by structc but not in docs/ARCHITECTURE.md's table of variables: {missing}"
