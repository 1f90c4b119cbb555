"""Source spans and the one error hierarchy every user-facing failure uses.

Library code raises `SnetError` subclasses carrying a `Span`; only the CLI
prints them (with `render`) and exits.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """A region of a source file; lines and columns are 1-based."""
    file: str
    line: int
    col: int
    end_line: int
    end_col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


class SnetError(Exception):
    """Base of every error structc reports about a user's model or input."""

    def __init__(self, message: str, span: Span | None = None, notes: tuple[str, ...] = (),
                 related: tuple[tuple[str, Span], ...] = ()):
        super().__init__(message)
        self.message = message
        self.span = span
        self.notes = notes
        self.related = related      # (message, span): other places the reader needs, shown with a caret

    def __str__(self) -> str:
        where = f"{self.span}: " if self.span else ""
        return f"{where}{self.message}"


class SnetSyntaxError(SnetError):
    """The source does not follow the grammar."""


class SnetNameError(SnetError):
    """A name is unknown, defined twice, or used before it is defined."""


class SnetShapeError(SnetError):
    """Shapes or types of operands do not fit an operation."""


class SnetTypeError(SnetError):
    """An argument has the wrong kind (tensor vs. number vs. option)."""


class ShapeMismatch(Exception):
    """Raised by op shape rules, which know no spans; the graph builder
    re-raises it as `SnetShapeError` at the offending node's span."""


def render(err: SnetError, source: str | None) -> str:
    """`file:line:col: error: message`, the source line and a caret under the span;
    then each related place the same way (`file:line:col: note: ...`), then plain notes."""
    if err.span is None:
        lines = [f"error: {err.message}"]
    else:
        lines = [f"{err.span}: error: {err.message}", *_excerpt(err.span, source)]
    for message, span in getattr(err, "related", ()):
        lines += [f"{span}: note: {message}", *_excerpt(span, source)]
    lines.extend(f"note: {n}" for n in err.notes)
    return "\n".join(lines)


# Characters the parser counts as one column that a terminal would not show as one.
_ONE_COLUMN = {ord(c): " " for c in "\t\r\f\v"}


def _excerpt(span: Span, source: str | None) -> list[str]:
    """The span's source line and a caret (with tildes) under it."""
    if source is None:
        return []
    src_lines = source.split("\n")     # as the parser counts lines: not at '\f', U+2028, ...
    if not 1 <= span.line <= len(src_lines):
        return []
    text = src_lines[span.line - 1].translate(_ONE_COLUMN)
    width = 1
    if span.end_line == span.line and span.end_col > span.col:
        width = span.end_col - span.col
    return [f"    {text}", "    " + " " * (span.col - 1) + "^" + "~" * (width - 1)]


class GradientWarning(UserWarning):
    """A parameter can never be trained: no gradient reaches it from the loss
    (it is not used, or every path passes an op with no derivative, like threshold)."""


class HeldOutLossWarning(UserWarning):
    """The held-out loss is each batch's loss weighed by its examples, so it depends on
    the batch size: the loss is not a sum of means whose denominators the compiler
    knows (`structc.heldout`)."""
