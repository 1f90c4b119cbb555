"""A function's LLVM IR text, exactly as llvmlite prints it (`str(fn)`), in
about half the time.

Printing the lowered functions was half of lowering's Python time: llvmlite
formats each instruction through several layers (`__str__`, `_to_string`,
`descr` into a list, metadata, `rstrip`). `function_text` writes the
instructions kernels are made of directly, with the same formats (including
llvmlite's stray spaces); any other instruction, one with metadata, or one
llvmlite has printed already (its cached text is what `str(fn)` would
use) is printed by llvmlite itself. `tests/test_irtext.py` compares it with
`str(fn)` over every function of several models.
"""
from __future__ import annotations

from llvmlite.ir import instructions as ins
from llvmlite.ir import types
from llvmlite.ir.types import IntType, VectorType
from llvmlite.ir.values import Constant

_CACHED = "_StrCaching__cached_str"
_REF = "_StringReferenceCaching__cached_refstr"


def _ref(v) -> str:
    """`v.get_reference()`: llvmlite keeps it in the value once made."""
    ref = v.__dict__.get(_REF)
    if ref is None:
        if type(v) is Constant and isinstance(v.type, VectorType) and isinstance(v.constant, (list, tuple)):
            ref = v.__dict__[_REF] = _vector_constant(v.constant)
        else:
            ref = v.get_reference()
    return ref


def _vector_constant(lanes) -> str:
    """llvmlite's `VectorType.format_constant`; a shuffle's or a mask's lanes
    are new integer constants each time, formatted here without a call each."""
    return "<" + ", ".join([f"{lane.type} {lane.constant}" if type(lane) is Constant and type(lane.constant) is int
                            and isinstance(lane.type, IntType) else f"{lane.type} {lane.get_reference()}"
                            for lane in lanes]) + ">"


def _operands(ops) -> str:
    return ", ".join([f"{op.type} {_ref(op)}" for op in ops])


def _plain(i) -> str:       # binary operators, fneg, freeze, ...: llvmlite's Instruction.descr
    opname = i.opname
    if i.flags:
        opname = " ".join([opname] + i.flags)
    return f"{opname} {i.type} {', '.join([_ref(op) for op in i.operands])}"


def _cast(i) -> str:
    (op,) = i.operands
    return f"{i.opname} {op.type} {_ref(op)} to {i.type}"


def _load(i) -> str:
    (ptr,) = i.operands
    align = "" if i.align is None else f", align {i.align}"
    return f"load {i.type}, {ptr.type} {_ref(ptr)}{align}"


def _store(i) -> str:
    val, ptr = i.operands
    align = "" if i.align is None else f", align {i.align}"
    return f"store {val.type} {_ref(val)}, {ptr.type} {_ref(ptr)}{align}"


def _alloca(i) -> str:
    text = f"alloca {i.allocated_type}"
    if i.operands:
        (op,) = i.operands
        text += f", {op.type} {_ref(op)}"
    if i.align is not None:
        text += f", align {i.align}"
    return text


def _gep(i) -> str:
    op = "getelementptr inbounds" if i.inbounds else "getelementptr"
    ptr = i.pointer
    return f"{op} {i.source_etype}, {ptr.type} {_ref(ptr)}, {_operands(i.indices)}"


def _phi(i) -> str:
    incoming = ", ".join([f"[{_ref(v)}, {_ref(b)}]" for v, b in i.incomings])
    return f"phi {' '.join(i.flags)} {i.type} {incoming}"


def _select(i) -> str:
    c, a, b = i.operands
    return (f"select {' '.join(i.flags)} {c.type} {_ref(c)}, {a.type} {_ref(a)}, "
            f"{b.type} {_ref(b)}")


def _compare(i) -> str:
    a, b = i.operands
    flags = "".join([" " + f for f in i.flags])
    return f"{i.opname}{flags} {i.op} {a.type} {_ref(a)}, {_ref(b)}"


def _call(i) -> str | None:
    fnty = i.callee.function_type
    if i.arg_attributes or i.attributes or i.cconv or i.tail or fnty.var_arg:
        return None     # llvmlite prints those
    fastmath = " " + " ".join(i.fastmath._to_list(fnty.return_type)) if i.fastmath else ""
    return f"{i.opname}{fastmath} {fnty.return_type} {i.callee.get_reference()}({_operands(i.operands[1:])})"


def _terminator(i) -> str:      # br: labels and the condition
    return f"{i.opname} {_operands(i.operands)}"


def _ret(i) -> str:
    value = i.return_value
    return i.opname if value is None else f"{i.opname} {value.type} {_ref(value)}"


def _vector(i) -> str:          # insertelement, extractelement, shufflevector
    return f"{i.opname} {_operands(i.operands)}"


def _extract_value(i) -> str:
    agg = i.aggregate
    return f"extractvalue {agg.type} {_ref(agg)}, {', '.join([str(k) for k in i.indices])}"


_FORMATS = {
    ins.Instruction: _plain, ins.CastInstr: _cast, ins.LoadInstr: _load, ins.StoreInstr: _store,
    ins.AllocaInstr: _alloca, ins.GEPInstr: _gep, ins.PhiInstr: _phi, ins.SelectInstr: _select,
    ins.ICMPInstr: _compare, ins.FCMPInstr: _compare, ins.CallInstr: _call, ins.Branch: _terminator,
    ins.ConditionalBranch: _terminator, ins.Ret: _ret, ins.InsertElement: _vector,
    ins.ExtractElement: _vector, ins.ShuffleVector: _vector, ins.ExtractValue: _extract_value,
}
_VOID = types.VoidType


def instruction_text(i) -> str:
    """`str(i)`."""
    cached = i.__dict__.get(_CACHED)
    if cached is not None:
        return cached
    form = _FORMATS.get(type(i))
    text = form(i) if form is not None and not i.metadata else None
    if text is None:
        return str(i)
    # llvmlite strips what its formats leave at the end (a space before absent metadata)
    return text.rstrip() if isinstance(i.type, _VOID) else f"{_reference(i)} = {text}".rstrip()


def _reference(i) -> str:
    """`i.get_reference()`, made as llvmlite's `NamedValue._get_reference` makes
    it and kept where it keeps it, for its uses to find, in one call not four."""
    ref = i.__dict__.get(_REF)
    if ref is None:
        name = i._name
        if "\\" in name or '"' in name:
            return i.get_reference()
        ref = i.__dict__[_REF] = f'%"{name}"'
    return ref


def function_text(fn) -> str:
    """`str(fn)` for an `ir.Function`."""
    buf: list[str] = []
    fn.descr_prototype(buf)
    if fn.blocks:
        buf.append("{\n")
        for block in fn.blocks:
            buf.append(f"{block._format_name()}:\n")
            buf += [f"  {instruction_text(i)}\n" for i in block.instructions]
        buf.append("}\n")
    return "".join(buf)
