"""Golden diagnostics: each file in golden/ has a comment `# error: COL: message`
on the line the error must point at; `structc check` must print exactly
`file:LINE:COL: error: message`, then the line and a caret. A comment
`# note: COL: message` marks a related place the error must also show the same
way (`file:LINE:COL: note: message`, line, caret). `# command: compile` on the
first line runs that command instead of `check`."""
import re
from pathlib import Path

import pytest

from structc.cli import main

GOLDEN = sorted((Path(__file__).parent / "golden").glob("*.snet"))
EXPECT = re.compile(r"#\s*error:\s*(\d+):\s*(.*)$")
NOTE = re.compile(r"#\s*note:\s*(\d+):\s*(.*)$")
COMMAND = re.compile(r"^#\s*command:\s*(\w+)")


def expected(path: Path):
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        m = EXPECT.search(line)
        if m:
            return lineno, int(m.group(1)), m.group(2).strip()
    raise AssertionError(f"{path.name} has no `# error: COL: message` comment")


def expected_notes(path: Path):
    return [(lineno, int(m.group(1)), m.group(2).strip())
            for lineno, line in enumerate(path.read_text().splitlines(), 1) if (m := NOTE.search(line))]


def command(path: Path) -> str:
    m = COMMAND.match(path.read_text())
    return m.group(1) if m else "check"


def assert_shown(err: list[str], k: int, path: Path, line: int, col: int):
    """err[k + 1], err[k + 2]: the source line and a caret at `col`."""
    source_line = path.read_text().splitlines()[line - 1].expandtabs(1)
    assert err[k + 1] == f"    {source_line}"
    assert err[k + 2].index("^") == 4 + col - 1


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.stem)
def test_golden_diagnostic(path, capsys):
    line, col, message = expected(path)
    assert main([command(path), str(path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"{path}:{line}:{col}: error: {message}"
    assert_shown(err, 0, path, line, col)
    for note_line, note_col, note in expected_notes(path):
        head = f"{path}:{note_line}:{note_col}: note: {note}"
        assert head in err, f"missing {head!r} in {err}"
        assert_shown(err, err.index(head), path, note_line, note_col)


def test_check_accepts_a_good_model(capsys, tmp_path):
    f = tmp_path / "ok.snet"
    f.write_text("model Ok { input x: f32[N, 4]  target y: class[N] of 3\n"
                 "  loss cross_entropy(dense(x, 3), y) }")
    assert main(["check", str(f)]) == 0
    assert "model Ok" in capsys.readouterr().out


def test_missing_file_is_a_clean_error(capsys):
    assert main(["check", "/nonexistent/model.snet"]) == 1
    assert "cannot read /nonexistent/model.snet" in capsys.readouterr().err


@pytest.mark.parametrize("space", ["\f", "\v"], ids=["form-feed", "vertical-tab"])
@pytest.mark.parametrize("comment", ["", "# \u2028 \x85 \x1c"], ids=["plain", "odd-line-breaks-in-a-comment"])
def test_the_caret_is_under_the_span_whatever_the_whitespace(space, comment, tmp_path, capsys):
    # the parser counts lines by '\n' only; the excerpt split at '\f', U+2028 and
    # the like too, and showed another line (or an empty one) above the caret
    if space == "\v":       # not whitespace in the language: the error is at it
        source, line, col = f"model M {{ {comment}\n  input x: f32[N, 3]\n  y = x {space}\n}}\n", 3, 9
    else:
        source, line, col = f"model M {{ {comment}\n  input x: f32[N, 3]\n{space}  output o = x @ x\n}}\n", 3, 15
    f = tmp_path / "m.snet"
    f.write_bytes(source.encode())
    assert main(["check", str(f)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"{f}:{line}:{col}: error: ")
    shown = source.split("\n")[line - 1].translate({ord(c): " " for c in "\f\v"})
    assert err[1] == f"    {shown}"
    assert err[2] == " " * (4 + col - 1) + ("^~~~~" if space != "\v" else "^")
