"""Parse `.snet` source into AST dataclasses, each with a source span.

Input: source text and a file name. Output: a `Program` (list of `Model`).
Syntax errors become `SnetSyntaxError` in the language's own terms
("expected ')' or ','"), never lark's token names.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import lark
from lark import Lark, Token, Transformer_NonRecursive, v_args

from .errors import SnetSyntaxError, Span

# -- AST ----------------------------------------------------------------


@dataclass
class Number:
    value: Union[int, float]
    span: Span


@dataclass
class String:
    value: str
    span: Span


@dataclass
class Name:
    id: str
    span: Span


@dataclass
class Keyword:
    name: str
    value: "Expr"
    span: Span


@dataclass
class Call:
    func: str
    args: list["Expr"]
    kwargs: list[Keyword]
    span: Span
    func_span: Span


@dataclass
class BinOp:
    op: str          # add sub mul div matmul
    left: "Expr"
    right: "Expr"
    span: Span


@dataclass
class Neg:
    operand: "Expr"
    span: Span


@dataclass
class Index:
    base: "Expr"
    index: "Expr"
    span: Span


@dataclass
class Attr:
    base: "Expr"
    name: str
    span: Span


@dataclass
class Over:
    """`value over domain` as a call's argument: `sum(dense(h, 64) over g.edges)`."""
    value: "Expr"
    domain: "Expr"
    span: Span


@dataclass
class CaseBlock:
    """`{ a = expr; ...; value }`: a recursion case's local names, then its value."""
    bindings: list
    value: "Expr"
    span: Span


@dataclass
class PerChild:
    """`value for k in domain` as a call's argument: `sum(f(h(k)) for k in n.children)`."""
    value: "Expr"
    var: str
    domain: "Expr"
    span: Span
    var_span: Span


@dataclass
class Tuple:
    """`(0,)`, `(3, 3)`: a list of numbers written in place (axes, kernel, stride, padding)."""
    items: list["Expr"]
    span: Span


Expr = Union[Number, String, Name, Call, BinOp, Neg, Index, Attr, Tuple]


@dataclass
class Dim:
    value: Union[int, str]
    span: Span


@dataclass
class TensorTypeExpr:
    dtype: str
    dims: list[Dim]
    span: Span


@dataclass
class ClassTypeExpr:
    dims: list[Dim]
    classes: int
    span: Span


@dataclass
class GraphTypeExpr:
    """`graph(features=32, edge_features=4, edge_types=3)`."""
    options: list[Keyword]
    span: Span
    dims: list[Dim] = field(default_factory=list)


@dataclass
class ForestTypeExpr:
    """`forest(arity=3) of word(vocab=1000)` or `forest of f32[16]`."""
    options: list[Keyword]
    leaf: Union["Call", TensorTypeExpr]
    span: Span


@dataclass
class SequenceTypeExpr:
    """`sequence of word(vocab=1000)` or `sequence of f32[16]`."""
    item: Union["Call", TensorTypeExpr]
    span: Span


TypeExpr = Union[TensorTypeExpr, ClassTypeExpr, GraphTypeExpr, ForestTypeExpr, SequenceTypeExpr]


@dataclass
class InputDecl:
    name: str
    type: TypeExpr
    kind: str        # "input" or "target"
    span: Span
    name_span: Span


@dataclass
class ParamDecl:
    name: str
    type: TypeExpr
    init: Expr | None
    span: Span
    name_span: Span
    frozen: bool = False       # `param w: ... frozen`: no gradient, never updated


@dataclass
class Assign:
    name: str
    value: Expr
    span: Span
    name_span: Span


@dataclass
class Unpack:
    """`(h, c) = lstm_cell(...)`: each name bound to one value of a tuple, in order
    (a statement, or a binding of a case block)."""
    names: list[str]
    value: Expr
    span: Span
    name_spans: list[Span]


@dataclass
class LossStmt:
    value: Expr
    span: Span


@dataclass
class OutputStmt:
    name: str
    value: Expr | None
    span: Span
    name_span: Span


@dataclass
class Repeat:
    """`repeat k { ... }`: the body k times, each time with layers of its own."""
    count: int
    body: list["Stmt"]
    span: Span
    count_span: Span


@dataclass
class RecDecl:
    """`rec h(n) = leaf: expr node: expr`, a function over the nodes of a forest;
    `rec (h, c)(n) = ...` gives each node several states (`names`), each case a
    tuple of as many values."""
    name: str
    param: str
    leaf: Expr
    node: Expr
    span: Span
    name_span: Span
    param_span: Span
    names: tuple = ()           # every state's name (one: (name,))
    name_spans: tuple = ()


@dataclass
class SeqRecDecl:
    """`rec h(t) = first: expr next: expr` (forward, reads h(t.prev)) or
    `rec b(t) = last: expr prev: expr` (backward, reads b(t.next)), or with
    `init: expr` (the state before the first step) in place of `first:` /
    `last:`: a function over the positions of a sequence input."""
    name: str
    param: str
    start: str         # "first", "last" or "init"
    then: str          # "next" (forward) or "prev" (backward)
    init: Expr
    step: Expr
    span: Span
    name_span: Span
    param_span: Span
    names: tuple = ()           # every state's name (one: (name,)), as RecDecl
    name_spans: tuple = ()


Stmt = Union[InputDecl, ParamDecl, Assign, Unpack, LossStmt, OutputStmt, Repeat, RecDecl, SeqRecDecl]


@dataclass
class Model:
    name: str
    body: list[Stmt]
    span: Span
    name_span: Span


@dataclass
class Program:
    models: list[Model]
    source: str
    file: str
    model_names: list[str] = field(default_factory=list)


# -- the parser ---------------------------------------------------------

# Numbers stop where float64 does (about 1.8e308): every real size, count or
# constant is far below, any such integer still converts to a float, and
# Python still prints it (it refuses past 4,300 digits).
MAX_INT = 2 ** 1024
# How deeply expressions and blocks may nest. The checker walks the AST
# recursively, so this bounds its stack; real models nest ten levels or so.
# The left operand of a binary operator does not count: `x + x + ... + x` of any
# length is a chain, walked in a loop.
MAX_NESTING = 150


def grammar_text() -> str:
    return _grammar_file("snet.lark").read_text()


def _grammar_file(name: str):
    """A file of the grammar package (`grammar/` in a checkout, `structc/grammar` installed)."""
    try:
        from importlib.resources import files
        found = files("structc.grammar") / name
        if found.is_file():
            return found
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent.parent / "grammar" / name


PARSER_OPTIONS = {"parser": "lalr", "propagate_positions": True, "maybe_placeholders": True}
#: lark's serialised tables for grammar/snet.lark, shipped next to it
#: (`write_shipped_tables` makes them; tests/test_parser_tables.py fails when they are stale)
SHIPPED_TABLES = "snet.tables"
_TABLES_MAGIC = b"structc parser tables\n"


@functools.lru_cache(maxsize=1)
def parser() -> Lark:
    """The LALR parser, once per process. Building its tables is most of a
    cold parse (90 ms), so they ship with the package (`SHIPPED_TABLES`,
    loaded in 10 ms when made from this grammar by this lark version), and
    are otherwise kept in the structc cache (`parser_key`: the grammar,
    lark's version and the options). Lark's own `cache=True` would keep them
    in the shared temporary folder, unchecked; the structc cache checks an
    entry's MAC before lark unpickles it (the threat model of the compiled
    code kept there, which is run), and `$STRUCTC_NO_CACHE` or a refused
    folder just builds them."""
    text = grammar_text()
    shipped = _shipped_parser(text)
    if shipped is not None:
        return shipped
    key = parser_key(text)
    loaded = _load_parser(key)
    if loaded is not None:
        return loaded
    built = Lark(text, **PARSER_OPTIONS)
    _store_parser(key, built)
    return built


def grammar_key(grammar: str) -> str:
    """What the tables depend on besides lark's version: the grammar and the options."""
    import hashlib
    import json
    h = hashlib.sha256(f"snet grammar\0{json.dumps(PARSER_OPTIONS, sort_keys=True)}\0".encode())
    h.update(grammar.encode())
    return h.hexdigest()[:32]


def parser_key(grammar: str) -> str:
    import hashlib
    import json
    h = hashlib.sha256(f"snet parser\0lark {lark.__version__}\0{json.dumps(PARSER_OPTIONS, sort_keys=True)}\0".encode())
    h.update(grammar.encode())
    return h.hexdigest()[:32]


def shipped_tables_header(data: bytes) -> dict | None:
    """The shipped file's header (`grammar`: its `grammar_key`, `lark`: the
    version that made it), or None if it is not such a file."""
    import json
    if not data.startswith(_TABLES_MAGIC):
        return None
    line, _, _ = data[len(_TABLES_MAGIC):].partition(b"\n")
    try:
        header = json.loads(line)
    except ValueError:
        return None
    return header if isinstance(header, dict) else None


def _shipped_parser(grammar: str) -> Lark | None:
    """The shipped tables, if made from `grammar` by the lark installed: any
    other tables would parse a different language, so they are never used."""
    import io
    try:
        data = _grammar_file(SHIPPED_TABLES).read_bytes()
    except OSError:
        return None
    header = shipped_tables_header(data)
    if header != {"grammar": grammar_key(grammar), "lark": lark.__version__}:
        return None
    body = data[len(_TABLES_MAGIC):].partition(b"\n")[2]
    try:
        return Lark.load(io.BytesIO(body))
    except Exception:  # noqa: BLE001 - tables lark cannot read are rebuilt, as stale ones are
        return None


def write_shipped_tables() -> Path:
    """Build the tables from the grammar and write them where `parser()` looks
    (run after editing grammar/snet.lark or upgrading lark):
    `python -c "from structc.syntax import write_shipped_tables; write_shipped_tables()"`."""
    import io
    import json
    text = grammar_text()
    body = io.BytesIO()
    Lark(text, **PARSER_OPTIONS).save(body)
    header = json.dumps({"grammar": grammar_key(text), "lark": lark.__version__}, sort_keys=True)
    path = Path(str(_grammar_file(SHIPPED_TABLES)))
    path.write_bytes(_TABLES_MAGIC + header.encode() + b"\n" + body.getvalue())
    return path


def _load_parser(key: str) -> Lark | None:
    import io
    import os

    from . import cache
    if os.environ.get("STRUCTC_NO_CACHE") is not None:
        return None
    entry = cache.load(key, None, "parser")
    if entry is None:
        return None
    try:
        return Lark.load(io.BytesIO(entry[1]))
    except Exception:  # noqa: BLE001 - an entry lark cannot read is rebuilt, as a damaged one is
        return None


def _store_parser(key: str, built: Lark) -> None:
    import io
    import os

    from . import cache
    if os.environ.get("STRUCTC_NO_CACHE") is not None:
        return
    data = io.BytesIO()
    built.save(data)
    cache.store(key, {"lark": lark.__version__}, data.getvalue(), "parser")


class _ToAst(Transformer_NonRecursive):
    # Non-recursive: `x + x + ... + x` with 10,000 terms is a tree 10,000 deep.

    def __init__(self, file: str):
        super().__init__()
        self.file = file

    def _span(self, meta) -> Span:
        return Span(self.file, meta.line, meta.column, meta.end_line, meta.end_column)

    def _tok(self, tok: Token) -> Span:
        return Span(self.file, tok.line, tok.column, tok.end_line, tok.end_column)

    @v_args(meta=True)
    def start(self, meta, models):
        return list(models)

    @v_args(meta=True)
    def model(self, meta, children):
        name, *body = children
        return Model(str(name), [s for s in body if s is not None], self._span(meta), self._tok(name))

    def empty(self, _):
        return None

    @v_args(meta=True)
    def input_decl(self, meta, c):
        return InputDecl(str(c[0]), c[1], "input", self._span(meta), self._tok(c[0]))

    @v_args(meta=True)
    def target_decl(self, meta, c):
        return InputDecl(str(c[0]), c[1], "target", self._span(meta), self._tok(c[0]))

    @v_args(meta=True)
    def param_decl(self, meta, c):
        return ParamDecl(str(c[0]), c[1], c[2], self._span(meta), self._tok(c[0]), frozen=c[3] is not None)

    @v_args(meta=True)
    def assign(self, meta, c):
        return Assign(str(c[0]), c[1], self._span(meta), self._tok(c[0]))

    @v_args(meta=True)
    def unpack(self, meta, c):
        _, *targets, value = [x for x in c if x is not None]
        for t in targets:
            if not isinstance(t, Name):
                raise SnetSyntaxError(f"an unpacking binds names, as in (h, c) = lstm_cell(...); "
                                      f"got {unparse(t)}", t.span)
        if len(targets) == 1:
            raise SnetSyntaxError(f"an unpacking binds two names or more; bind one value with "
                                  f"{targets[0].id} = ...", targets[0].span)
        return Unpack([t.id for t in targets], value, self._span(meta), [t.span for t in targets])

    @v_args(meta=True)
    def loss_stmt(self, meta, c):
        return LossStmt(c[0], self._span(meta))

    @v_args(meta=True)
    def output_stmt(self, meta, c):
        return OutputStmt(str(c[0]), c[1], self._span(meta), self._tok(c[0]))

    @v_args(meta=True)
    def tensor_type(self, meta, c):
        dtype, *dims = c
        return TensorTypeExpr(str(dtype), [d for d in dims if d is not None], self._span(meta))

    def _int(self, tok: Token) -> int:
        digits = len(tok.lstrip("0"))
        if digits > 400 or int(tok) >= MAX_INT:
            raise SnetSyntaxError(f"number too large ({digits} digits; numbers stop at about 1.8e308)", self._tok(tok))
        return int(tok)

    @v_args(meta=True)
    def class_type(self, meta, c):
        *dims, classes = c
        return ClassTypeExpr([d for d in dims if d is not None], self._int(classes), self._span(meta))

    @v_args(meta=True)
    def repeat_stmt(self, meta, c):
        count, *body = c
        return Repeat(self._int(count), [s for s in body if s is not None], self._span(meta), self._tok(count))

    @v_args(meta=True)
    def graph_type(self, meta, c):
        options = [a for a in c if a is not None]
        for a in options:
            if not isinstance(a, Keyword):
                raise SnetSyntaxError("graph(...) takes options such as features=32", a.span)
        return GraphTypeExpr(options, self._span(meta))

    def dotted_dim(self, c):
        base, attr = c
        return Dim(f"{base}.{attr}", Span(self.file, base.line, base.column, attr.end_line, attr.end_column))

    @v_args(meta=True)
    def over(self, meta, c):
        return Over(c[0], c[1], self._span(meta))

    def dim(self, c):
        tok = c[0]
        value = self._int(tok) if tok.type == "INT" else str(tok)
        return Dim(value, self._tok(tok))

    @v_args(meta=True)
    def forest_type(self, meta, c):
        *opts, leaf = c
        opts = [o for o in opts if o is not None]
        bad = next((o for o in opts if not isinstance(o, Keyword)), None)
        if bad is not None:
            raise SnetSyntaxError("forest options are written name=value, e.g. forest(arity=3)", bad.span)
        return ForestTypeExpr(opts, leaf, self._span(meta))

    def rec_names(self, c):
        return list(c)

    @v_args(meta=True)
    def sequence_type(self, meta, c):
        return SequenceTypeExpr(c[0], self._span(meta))

    @v_args(meta=True)
    def seq_rec_decl(self, meta, c):
        names, param, w1, init, w2, step = c
        then = {"first": ("next",), "last": ("prev",), "init": ("next", "prev")}
        if str(w1) not in then:
            raise SnetSyntaxError(f"a recursion over a sequence starts with 'first:' (forward), 'last:' "
                                  f"(backward) or 'init:' (the state before the first step), got '{w1}:'",
                                  self._tok(w1))
        if str(w2) not in then[str(w1)]:
            raise SnetSyntaxError(f"expected {' or '.join(repr(w + ':') for w in then[str(w1)])} after "
                                  f"'{w1}:', got '{w2}:'", self._tok(w2))
        spans = tuple(self._tok(n) for n in names)
        return SeqRecDecl(str(names[0]), str(param), str(w1), str(w2), init, step, self._span(meta), spans[0],
                          self._tok(param), tuple(map(str, names)), spans)

    @v_args(meta=True)
    def rec_decl(self, meta, c):
        names, param, w1, leaf, w2, node = c
        for word, want in ((w1, "leaf"), (w2, "node")):
            if str(word) != want:
                raise SnetSyntaxError(f"expected '{want}:' here, got '{word}'", self._tok(word))
        spans = tuple(self._tok(n) for n in names)
        return RecDecl(str(names[0]), str(param), leaf, node, self._span(meta), spans[0], self._tok(param),
                       tuple(map(str, names)), spans)

    @v_args(meta=True)
    def case_block(self, meta, c):
        items = [x for x in c if x is not None]
        return CaseBlock(items[:-1], items[-1], self._span(meta))

    @v_args(meta=True)
    def per_child(self, meta, c):
        value, var, domain = c
        return PerChild(value, str(var), domain, self._span(meta), self._tok(var))

    def number(self, c):
        tok = c[0]
        if not any(ch in tok for ch in ".eE"):
            return Number(self._int(tok), self._tok(tok))
        value = float(tok)
        if not math.isfinite(value):        # 1e999 would silently be inf
            raise SnetSyntaxError(f"number too large ({tok}; numbers stop at about 1.8e308)", self._tok(tok))
        return Number(value, self._tok(tok))

    @v_args(meta=True)
    def tuple(self, meta, c):
        return Tuple([x for x in c if x is not None], self._span(meta))

    def string(self, c):
        return String(str(c[0])[1:-1], self._tok(c[0]))

    def name(self, c):
        return Name(str(c[0]), self._tok(c[0]))

    @v_args(meta=True)
    def call(self, meta, c):
        func, *args = c
        args = [a for a in args if a is not None]
        pos = [a for a in args if not isinstance(a, Keyword)]
        kws = [a for a in args if isinstance(a, Keyword)]
        if any(isinstance(a, Keyword) for a in args[:len(args) - len(kws)]):
            bad = next(a for a in args[len(pos):] if not isinstance(a, Keyword))
            raise SnetSyntaxError("a positional argument cannot follow keyword arguments", bad.span)
        return Call(str(func), pos, kws, self._span(meta), self._tok(func))

    @v_args(meta=True)
    def kwarg(self, meta, c):
        return Keyword(str(c[0]), c[1], self._span(meta))

    @v_args(meta=True)
    def pipe(self, meta, c):
        value, target = c
        if isinstance(target, Name):
            return Call(target.id, [value], [], target.span, target.span)
        return Call(target.func, [value, *target.args], target.kwargs, target.span, target.func_span)

    @v_args(meta=True)
    def add(self, meta, c):
        return BinOp("add", c[0], c[1], self._span(meta))

    @v_args(meta=True)
    def sub(self, meta, c):
        return BinOp("sub", c[0], c[1], self._span(meta))

    @v_args(meta=True)
    def mul(self, meta, c):
        return BinOp("mul", c[0], c[1], self._span(meta))

    @v_args(meta=True)
    def div(self, meta, c):
        return BinOp("div", c[0], c[1], self._span(meta))

    @v_args(meta=True)
    def matmul(self, meta, c):
        return BinOp("matmul", c[0], c[1], self._span(meta))

    @v_args(meta=True)
    def neg(self, meta, c):
        return Neg(c[0], self._span(meta))

    @v_args(meta=True)
    def index(self, meta, c):
        return Index(c[0], c[1], self._span(meta))

    @v_args(meta=True)
    def attr(self, meta, c):
        return Attr(c[0], str(c[1]), self._span(meta))


# How terminals read in messages.
_TERMINAL_WORDS = {
    "NAME": "a name", "NUMBER": "a number", "INT": "an integer", "STRING": "a string",
    "DTYPE": "a tensor type such as f32", "$END": "end of file", "CASE": "'leaf:' or 'node:'",
    "UNPACK": "'('",
}


def _describe_terminal(name: str) -> str:
    if name in _TERMINAL_WORDS:
        return _TERMINAL_WORDS[name]
    for t in parser().terminals:
        if t.name == name:
            if t.pattern.type == "str":
                return f"'{t.pattern.value}'"
            return name.lower()
    return name.lower()


def _describe_token(tok: Token) -> str:
    if tok.type == "$END":
        return "end of file"
    kind = {"NAME": "name", "NUMBER": "number", "INT": "integer", "STRING": "string"}.get(tok.type)
    return f"{kind} '{tok}'" if kind else f"'{tok}'"


_STATEMENT_STARTS = {"'input'", "'target'", "'param'", "'loss'", "'output'", "'rec'", "'repeat'"}
# Tokens that could continue an expression; listing them rarely helps.
_CONTINUATIONS = {"'+'", "'-'", "'*'", "'/'", "'@'", "'|>'", "'.'", "'['", "'over'", "'for'"}


def _expected_list(expected) -> str:
    words = {_describe_terminal(e) for e in expected}
    if _STATEMENT_STARTS <= words:
        words = (words - _STATEMENT_STARTS - {"a name", "';'", "'('"}) | {"a statement"}   # '(': (h, c) = ...
    if words - _CONTINUATIONS:
        words -= _CONTINUATIONS
    if "')'" in words:   # inside an argument list: a call or `name=` is not the likely fix
        words -= {"'('", "'='"}
    words = sorted(words)
    if len(words) > 6:
        return ", ".join(words[:6]) + ", ..."
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " or " + words[-1]


# -- explaining a syntax error ----------------------------------------------
# Lark knows the token it could not take; the likely mistake is often earlier
# (a misspelt keyword, a block or parenthesis left open), so look back at the
# tokens before it.

_KEYWORDS = ("input", "target", "param", "loss", "output", "repeat", "rec", "model")
_SCAN = re.compile(r'(#[^\n]*|\s+)|"[^"\n]*"|[A-Za-z_][A-Za-z0-9_]*|[0-9.]+(?:[eE][+-]?[0-9]+)?|\|>|.', re.S)
_CLOSER = {"(": ")", "[": "]", "{": "}"}


@dataclass
class _Lexeme:
    text: str
    span: Span


def _lexemes_before(source: str, end: int, file: str) -> list[_Lexeme]:
    """The code tokens of source[:end] (no comments, no space), with spans."""
    out, line, line_start = [], 1, 0
    for m in _SCAN.finditer(source, 0, end):
        start = m.start()
        if not m.group(1):
            col = start - line_start + 1
            out.append(_Lexeme(m.group(), Span(file, line, col, line, col + len(m.group()))))
        newlines = m.group().count("\n")
        if newlines:
            line += newlines
            line_start = start + m.group().rindex("\n") + 1
    return out


def _open_brackets(lexemes: list[_Lexeme]) -> list[tuple[_Lexeme, str]]:
    """The brackets still open at the end of `lexemes`, innermost last, each with
    what it opens: "model 'A'", "the repeat block", or "'('"."""
    stack = []
    for k, lx in enumerate(lexemes):
        if lx.text in _CLOSER:
            what = f"'{lx.text}'"
            if lx.text == "{" and k >= 2 and lexemes[k - 2].text == "model":
                what = f"model '{lexemes[k - 1].text}'"
            elif lx.text == "{" and k >= 2 and lexemes[k - 2].text == "repeat":
                what = "the repeat block"
            stack.append((lx, what))
        elif stack and lx.text == _CLOSER[stack[-1][0].text]:
            stack.pop()
    return stack


def _unexpected_token(source: str, file: str, tok: Token, expected, span: Span) -> SnetSyntaxError:
    words = {_describe_terminal(e) for e in expected}
    message = f"unexpected {_describe_token(tok)}; expected {_expected_list(expected)}"
    at_end = tok.type == "$END" or tok.start_pos is None
    before = _lexemes_before(source, len(source) if at_end else tok.start_pos, file)
    prev = before[-1] if before else None
    still_open = _open_brackets(before)
    innermost, what = still_open[-1] if still_open else (None, "")
    if innermost is not None and innermost.text == "{" and (at_end or (prev is not None and prev.text == "model")):
        where = "end of file" if at_end else "the next model"
        return SnetSyntaxError(f"{what} (opened at line {innermost.span.line}) is not closed: "
                               f"'}}' is missing before {where}",
                               span if at_end else prev.span, related=((f"{what} opens here", innermost.span),))
    if prev is not None and tok.type == "NAME" and "'='" in words and prev.text not in _KEYWORDS:
        close = difflib.get_close_matches(prev.text, _KEYWORDS, n=1, cutoff=0.6)
        if close:       # `imput x: f32[N, 4]`: a statement keyword misspelt
            return SnetSyntaxError(f"unknown statement '{prev.text}'; did you mean '{close[0]}'?", prev.span)
    # a '(' or '[' still open, and the statement clearly went on without closing it
    left_open = innermost is not None and (at_end or (innermost.text in "([" and f"'{_CLOSER[innermost.text]}'" in words
                                                      and (tok.type == "RBRACE" or tok.line > innermost.span.line)))
    if left_open:
        return SnetSyntaxError(message, span, related=((f"this '{innermost.text}' is not closed", innermost.span),))
    return SnetSyntaxError(message, span)


def parse(source: str, file: str = "<source>") -> Program:
    """Parse a whole `.snet` file."""
    try:
        tree = parser().parse(source)
    except lark.exceptions.UnexpectedToken as e:
        tok = e.token
        if tok.type == "$END" or tok.line is None:
            line, col = _end(source)
            end_col = col + 1
        else:
            line, col = tok.line, tok.column
            end_col = col + max(1, len(str(tok)))
        try:    # the tokens really acceptable here, after any pending reductions
            expected = e.interactive_parser.accepts() - {"$END"} or e.expected
        except Exception:  # noqa: BLE001 - fall back to the state's raw expectation
            expected = e.expected
        raise _unexpected_token(source, file, tok, expected, Span(file, line, col, line, end_col)) from None
    except lark.exceptions.UnexpectedCharacters as e:
        raise SnetSyntaxError(f"unexpected character {source[e.pos_in_stream]!r}",
                              Span(file, e.line, e.column, e.line, e.column + 1)) from None
    except lark.exceptions.UnexpectedEOF as e:
        line, col = _end(source)
        raise SnetSyntaxError(f"unexpected end of file; expected {_expected_list(e.expected)}",
                              Span(file, line, col, line, col + 1)) from None
    try:
        models = _ToAst(file).transform(tree)
    except lark.exceptions.VisitError as e:
        if isinstance(e.orig_exc, SnetSyntaxError):
            raise e.orig_exc from None
        raise
    check_nesting(models)
    seen: dict[str, Model] = {}
    for m in models:
        if m.name in seen:
            raise SnetSyntaxError(f"model '{m.name}' is defined twice (first at line {seen[m.name].span.line})",
                                  m.name_span)
        seen[m.name] = m
    return Program(models, source, file, [m.name for m in models])


@functools.lru_cache(maxsize=None)
def _field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if "span" not in f.name)


def _children(node):
    """The AST nodes directly inside `node` (spans are not nodes)."""
    for name in _field_names(type(node)):
        value = getattr(node, name)
        for item in value if isinstance(value, list) else (value,):
            if dataclasses.is_dataclass(item) and not isinstance(item, Span):
                yield item


def check_nesting(models: list[Model]) -> None:
    """Refuse nesting deeper than MAX_NESTING, so that checking cannot overflow the stack."""
    stack = [(m, 1) for m in models]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_NESTING:
            raise SnetSyntaxError(f"nested too deeply (more than {MAX_NESTING} levels of calls, operators or "
                                  "blocks); split the expression into named steps", node.span)
        for child in _children(node):
            chained = isinstance(node, BinOp) and child is node.left
            stack.append((child, depth if chained else depth + 1))


def _end(source: str) -> tuple[int, int]:
    """The position just after the last code (not comment, not space) in the source."""
    lines = source.split("\n")
    for k in range(len(lines) - 1, -1, -1):
        code = lines[k].split("#", 1)[0].rstrip()
        if code:
            return k + 1, len(code) + 1
    return 1, 1


# -- printing (for `--dump=ast`) -------------------------------------------


_SYMBOLS = {"add": "+", "sub": "-", "mul": "*", "div": "/", "matmul": "@"}


def unparse(e) -> str:
    """An expression (or a case block's binding) back as source text, fully
    parenthesised, pipes desugared."""
    if isinstance(e, Number):
        return repr(e.value)
    if isinstance(e, String):
        return f'"{e.value}"'
    if isinstance(e, Name):
        return e.id
    if isinstance(e, Call):
        args = [unparse(a) for a in e.args] + [f"{k.name}={unparse(k.value)}" for k in e.kwargs]
        return f"{e.func}({', '.join(args)})"
    if isinstance(e, BinOp):     # walk the left spine in a loop: `x + x + ... + x` may be very long
        rights = []
        while isinstance(e, BinOp):
            rights.append(e)
            e = e.left
        text = unparse(e)
        for op in reversed(rights):
            text = f"({text} {_SYMBOLS[op.op]} {unparse(op.right)})"
        return text
    if isinstance(e, Tuple):
        items = [unparse(x) for x in e.items]
        return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
    if isinstance(e, Neg):
        return f"-{unparse(e.operand)}"
    if isinstance(e, Index):
        return f"{unparse(e.base)}[{unparse(e.index)}]"
    if isinstance(e, Attr):
        return f"{unparse(e.base)}.{e.name}"
    if isinstance(e, Over):
        return f"{unparse(e.value)} over {unparse(e.domain)}"
    if isinstance(e, CaseBlock):
        return "{ " + "; ".join([unparse(a) for a in e.bindings] + [unparse(e.value)]) + " }"
    if isinstance(e, Assign):       # a case block's binding
        return f"{e.name} = {unparse(e.value)}"
    if isinstance(e, Unpack):
        return f"({', '.join(e.names)}) = {unparse(e.value)}"
    if isinstance(e, PerChild):
        return f"{unparse(e.value)} for {e.var} in {unparse(e.domain)}"
    return f"<{type(e).__name__}>"


def _type_text(t) -> str:
    if isinstance(t, GraphTypeExpr):
        return f"graph({', '.join(f'{k.name}={unparse(k.value)}' for k in t.options)})"
    dims = ", ".join(str(d.value) for d in getattr(t, "dims", ()))
    if isinstance(t, Call):
        return unparse(t)
    if isinstance(t, ForestTypeExpr):
        opts = ", ".join(f"{k.name}={unparse(k.value)}" for k in t.options)
        leaf = unparse(t.leaf) if isinstance(t.leaf, Call) else _type_text(t.leaf)
        return f"forest{f'({opts})' if opts else ''} of {leaf}"
    if isinstance(t, SequenceTypeExpr):
        return f"sequence of {unparse(t.item) if isinstance(t.item, Call) else _type_text(t.item)}"
    if isinstance(t, ClassTypeExpr):
        return f"class[{dims}] of {t.classes}"
    return f"{t.dtype}[{dims}]"


def format_program(program: Program) -> str:
    lines = []

    def statements(body, indent):
        for s in body:
            at = f"@{s.span.line}:{s.span.col}"
            if isinstance(s, Repeat):
                lines.append(f"{indent}Repeat {s.count}  {at}")
                statements(s.body, indent + "  ")
                continue
            if isinstance(s, InputDecl):
                text = f"InputDecl {s.kind} {s.name}: {_type_text(s.type)}"
            elif isinstance(s, ParamDecl):
                init = f" = {unparse(s.init)}" if s.init is not None else ""
                text = f"ParamDecl {s.name}: {_type_text(s.type)}{init}{' frozen' if s.frozen else ''}"
            elif isinstance(s, Assign):
                text = f"Assign {s.name} = {unparse(s.value)}"
            elif isinstance(s, Unpack):
                text = f"Unpack {unparse(s)}"
            elif isinstance(s, LossStmt):
                text = f"Loss {unparse(s.value)}"
            elif isinstance(s, OutputStmt):
                text = f"Output {s.name}" + (f" = {unparse(s.value)}" if s.value is not None else "")
            elif isinstance(s, RecDecl):
                names = s.name if len(s.names) < 2 else f"({', '.join(s.names)})"
                text = f"Rec {names}({s.param}) leaf: {unparse(s.leaf)} node: {unparse(s.node)}"
            elif isinstance(s, SeqRecDecl):
                names = s.name if len(s.names) < 2 else f"({', '.join(s.names)})"
                text = f"Rec {names}({s.param}) {s.start}: {unparse(s.init)} {s.then}: {unparse(s.step)}"
            else:
                text = type(s).__name__
            lines.append(f"{indent}{text}  {at}")

    for m in program.models:
        lines.append(f"Model {m.name}  @{m.span.line}:{m.span.col}")
        statements(m.body, "  ")
    return "\n".join(lines)
