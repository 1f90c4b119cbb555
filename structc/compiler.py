"""The pipeline from source to machine code, top to bottom.

    .snet --parse--> AST --build--> forward graph --differentiate--> train graph
          --passes--> fused graphs --plan--> memory plans --lower--> LLVM IR
          --native--> object code + metadata

`compile_source` returns an `Artifact`: the object code and the metadata
(inputs, outputs, parameters, entry points) that `model.Net` needs to call
it. Any stage can be printed with `dump`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Callable

from llvmlite import ir

from . import __version__
from .autodiff import differentiate, gradient_warnings, warn_gradient_flow
from .build import ModelDef, build_model
from .denominator import loss_denominator
from .errors import Span
from .graph import Builder, Graph
from .lower.module import Target, lower_entry
from .native import compile_object, host_target
from .ops.norm import batch_counts
from .ops.optim import N_HYPER
from .passes import PIPELINE, run_pipeline
from .passes.message import PREPARE, prepare
from .passes.mode import inference
from .passes.plan import Plan, param_layout, plan_memory
from .syntax import Program, format_program, parse

#: bumped whenever the calling convention or the metadata of compiled code changes
ABI_VERSION = 2     # 2: 11 hyper-parameter slots (clipping, vectors' decay), the step writes slot 9

STAGES = ["ast", "graph"] + [f"graph.{n}" for n, _ in PREPARE] + ["train"] + [f"forward.{n}" for n, _ in PIPELINE] + \
         [f"train.{n}" for n, _ in PIPELINE] + ["plan", "llvm", "opt", "asm"]


@dataclass
class Artifact:
    meta: dict
    object: bytes
    llvm_ir: str = ""
    timings: dict = field(default_factory=dict)
    jit: bool = True     # False: position-independent, for a shared library


def compiler_fingerprint() -> str:
    """Version plus a hash of the compiler's own sources, so a changed
    compiler never reuses another's cached code."""
    return _fingerprint()


def _fingerprint_uncached() -> str:
    from pathlib import Path
    h = hashlib.sha256(__version__.encode())
    root = Path(__file__).resolve().parent
    files = sorted(root.rglob("*.py"))
    for extra in ("grammar", "runtime"):
        try:
            from importlib.resources import files as res
            d = Path(str(res(f"structc.{extra}")))
        except (ModuleNotFoundError, TypeError):
            d = root.parent / extra
        files += sorted(p for p in d.glob("*") if p.suffix in (".lark", ".c", ".h"))
    for p in files:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return f"{__version__}+{h.hexdigest()[:16]}"


_FP: list[str] = []


def _fingerprint() -> str:
    if not _FP:
        _FP.append(_fingerprint_uncached())
    return _FP[0]


def forward_graph(mdef: ModelDef) -> Graph:
    """The model as used: its named outputs (the loss if it has none), each
    op in its inference form (`passes.mode`: dropout off, running statistics)."""
    g = mdef.graph.copy()
    named = {k: v for k, v in g.outputs.items() if k != "loss"}
    g.outputs = named or {"loss": g.outputs["loss"]}
    return inference(g)


def train_graph(mdef: ModelDef, update_size: int, frozen: frozenset[str] = frozenset(),
                decay_end: int | None = None) -> Graph:
    """Forward, backward and update. `update_size`: the floats the update
    covers, the trainable parameters laid out first; `decay_end`: where the
    vectors (biases, norms) start among them (`arena_layout`)."""
    g = mdef.graph.copy()
    g.outputs = {"loss": g.outputs["loss"]}
    g = differentiate(g, frozen=frozen)
    grads = [g.outputs[f"grad:{p}"] for p in mdef.params if p not in frozen]
    b = Builder(g)
    g.outputs["update"] = b.update(*(b.value(i) for i in grads), size=update_size, decay_end=decay_end).id
    return g


def update_graph(mdef: ModelDef, update_size: int, decay_end: int | None = None) -> Graph:
    """The optimiser step alone, reading the gradient arena as it is: data-parallel
    training sums the ranks' gradients between `sc_train` (mode none) and this."""
    g = Graph(f"{mdef.name}.update")
    g.outputs["update"] = Builder(g).update(size=update_size, decay_end=decay_end).id
    return g


def resolve_frozen(params, freeze) -> frozenset[str]:
    """The parameter names `freeze` selects: each entry is a parameter's name
    (`conv2.w`) or a layer's prefix (`conv1` selects `conv1.w` and `conv1.b`).
    An entry that selects nothing is an error naming the parameters."""
    if isinstance(freeze, str):
        raise TypeError(f"freeze must be a list of names, got the string {freeze!r} (write [{freeze!r}])")
    names = list(params)
    chosen: set[str] = set()
    for entry in freeze or ():
        if not isinstance(entry, str):
            raise TypeError(f"freeze: expected parameter names, got {type(entry).__name__} {entry!r}")
        hits = [n for n in names if n == entry or n.startswith(entry + ".")]
        if not hits:
            raise ValueError(f"freeze: no parameter or layer {entry!r} (parameters: {', '.join(names) or 'none'})")
        chosen.update(hits)
    return frozenset(chosen)


def arena_layout(mdef: ModelDef, frozen: frozenset[str]) -> tuple[dict[str, int], int, int, int]:
    """Arena offsets in three groups: trainable matrices (rank >= 2), trainable
    vectors (biases, normalisations' scales and shifts), frozen parameters.
    The update is one pass over the first two, so it never touches a frozen
    one (not even by weight decay), and `decay_biases=False` is a second decay
    for a range. (offsets, arena size, update size, where the vectors start)."""
    shapes = {name: p.type.shape for name, p in mdef.params.items()}
    groups = ([n for n, s in shapes.items() if n not in frozen and len(s) >= 2],
              [n for n, s in shapes.items() if n not in frozen and len(s) < 2],
              [n for n in shapes if n in frozen])
    offsets, param_size = param_layout({n: shapes[n] for group in groups for n in group})
    update_size = offsets[groups[2][0]] if groups[2] else param_size
    decay_end = offsets[groups[1][0]] if groups[1] else update_size
    return offsets, param_size, update_size, decay_end


def _entry_meta(g: Graph, plan: Plan, symbol: str) -> dict:
    outputs = []
    for name in plan.output_names:
        t = g.nodes[g.outputs[name]].type
        outputs.append({"name": name, "shape": list(t.shape), "dtype": t.dtype})
    return {"symbol": symbol, "workspace": f"{symbol}_workspace",
            "inputs": plan.input_names, "outputs": outputs}


def compile_model(mdef: ModelDef, target: Target | None = None,
                  dump: Callable[[str, str], None] | None = None, jit: bool = True, freeze=()) -> Artifact:
    """`jit=False` makes position-independent code for a shared library;
    `freeze`: parameter names or layer prefixes that training leaves alone."""
    frozen = resolve_frozen(mdef.params, freeze) | {name for name, p in mdef.params.items() if p.frozen}
    target = target or host_target()
    times = {}
    t0 = time.perf_counter()
    # Rewrites that must precede differentiation (message passing: aggregate first).
    forward = prepare(mdef.graph.copy(), (lambda name, gr: dump(f"graph.{name}", str(gr))) if dump else None)
    mdef = dataclasses.replace(mdef, graph=forward)
    offsets, param_size, update_size, decay_end = arena_layout(mdef, frozen)

    def dumper(prefix):
        return (lambda name, graph: dump(f"{prefix}.{name}", str(graph))) if dump else None

    graphs = {"forward": forward_graph(mdef)}
    blocked = gradient_warnings(mdef.graph, frozen=frozen) if mdef.has_loss else []
    warn_gradient_flow(blocked)
    if mdef.has_loss:
        graphs["train"] = train_graph(mdef, update_size, frozen, decay_end)
        graphs["update"] = update_graph(mdef, update_size, decay_end)
        if dump:
            dump("train", str(graphs["train"]))
    module = ir.Module(name=mdef.name)
    module.triple = target.triple
    entries, plans, shared = {}, {}, {}
    for kind, g in graphs.items():
        g = run_pipeline(g, dumper(kind))
        plan = plan_memory(g, offsets)
        plans[kind] = (g, plan)
        symbol = f"sc_{kind}"
        lower_entry(module, g, plan, mdef.symbols, symbol, target, shared)
        entries[kind] = _entry_meta(g, plan, symbol)
    if dump:
        dump("plan", "\n".join(f"# {k}\n{p.describe(g)}" for k, (g, p) in plans.items()))
    times["lower"] = time.perf_counter() - t0
    llvm_ir = str(module)
    if dump:
        dump("llvm", llvm_ir)
    t1 = time.perf_counter()
    obj = compile_object(llvm_ir, target, jit)
    times["llvm"] = time.perf_counter() - t1
    if dump:
        from .native import assembly, optimized_ir
        dump("opt", optimized_ir(llvm_ir, target))
        dump("asm", assembly(llvm_ir, target))

    meta = {
        "structc": compiler_fingerprint(),
        "abi": ABI_VERSION,
        "model": mdef.name,
        "file": mdef.file,
        "target": {"triple": target.triple, "cpu": target.cpu, "features": target.features},
        "symbols": mdef.symbols,
        "inputs": [{"name": s.name, "kind": s.kind, "dtype": s.type.dtype, "shape": list(s.type.shape),
                    "classes": s.classes} for s in mdef.inputs.values()],
        "params": [{"name": p.name, "shape": list(p.type.shape), "offset": offsets[p.name],
                    "init": [p.init[0], list(p.init[1])]} for p in mdef.params.values()],
        "param_size": param_size,
        "frozen": sorted(n for n in frozen if not mdef.params[n].buffer),
        "buffers": sorted(n for n, p in mdef.params.items() if p.buffer),   # written by the training entry
        "batch_counts": batch_counts(forward),      # `Net` refuses to train with one value per channel
        "graphs": [spec.meta() for spec in mdef.graphs.values()],
        "n_hyper": N_HYPER,
        "entries": entries,
        "gradient_warnings": blocked,   # re-issued when the model is loaded from the cache
        "loss_denominator": loss_denominator(forward) if mdef.has_loss else None,
    }
    if mdef.forests:
        meta["forests"] = mdef.forests
    if mdef.sequences:
        meta["sequences"] = mdef.sequences
    return Artifact(meta, obj, llvm_ir, times, jit)


def compile_source(source: str, file: str = "<source>", model: str | None = None,
                   target: Target | None = None, dump=None, jit: bool = True, freeze=()) -> Artifact:
    return compile_program(parse(source, file), model, target, dump, jit, freeze)


def compile_program(program: Program, model: str | None = None, target: Target | None = None,
                    dump=None, jit: bool = True, freeze=()) -> Artifact:
    if dump:
        dump("ast", format_program(program))
    mdef = build_model(program, model)
    if dump:
        dump("graph", str(mdef.graph))
    return compile_model(mdef, target, dump, jit, freeze)


# Fields that hold the program's layout, not its meaning: the key ignores them.
_LAYOUT_FIELDS = {(Program, "source"), (Program, "file")}


class _Mark(str):
    """Structure text in the canonical form, as opposed to a value to quote."""


def canonical_program(program: Program) -> str:
    """The parsed program with every field but source positions, as text: a
    comment or a change of layout leaves it unchanged, any change of a name,
    number or option changes it. Walked with an explicit stack, so deep
    expressions cannot exhaust Python's recursion limit."""
    out: list[str] = []
    stack: list = [program]
    while stack:
        item = stack.pop()
        if isinstance(item, _Mark):
            out.append(item)
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            parts: list = [_Mark(f"({type(item).__name__}")]
            for f in dataclasses.fields(item):
                value = getattr(item, f.name)
                if isinstance(value, Span) or (type(item), f.name) in _LAYOUT_FIELDS:
                    continue
                parts += [_Mark(f" {f.name}="), value]
            stack.extend(reversed(parts + [_Mark(")")]))
        elif isinstance(item, (list, tuple)):
            parts = [_Mark("[")]
            for element in item:
                parts += [element, _Mark(",")]
            stack.extend(reversed(parts + [_Mark("]")]))
        elif item is None or isinstance(item, (str, int, float)):
            out.append(f"{type(item).__name__}:{item!r}")    # 1 and 1.0 differ; strings are quoted
        else:   # a new kind of AST value: extend this walk rather than key on its repr
            raise TypeError(f"canonical_program cannot key on a {type(item).__name__}")
    return "".join(out)


def _toolchain() -> str:
    """llvmlite and LLVM versions: another LLVM may generate other code."""
    import llvmlite
    from llvmlite import binding
    return f"llvmlite {llvmlite.__version__}, LLVM {'.'.join(map(str, binding.llvm_version_info))}"


def cache_key(program: Program, model: str | None, target: Target, options: dict | None = None) -> str:
    """The cache key of `model` of `program` compiled for `target`: the
    canonical program (not its bytes), the compiler (version and sources),
    llvmlite and LLVM, the target CPU and the options (such as `jit`)."""
    h = hashlib.sha256()
    from .ops.base import extension_fingerprint      # users' ops: their definitions, not just their names
    for part in (compiler_fingerprint(), extension_fingerprint(), _toolchain(), canonical_program(program), model or "",
                 target.triple, target.cpu, target.features, json.dumps(options or {}, sort_keys=True)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]
