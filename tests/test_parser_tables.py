"""The parser's LALR tables ship with the package (grammar/snet.tables), so a
cold compile with an empty cache builds no tables; tables made from another
grammar (or by another lark) are never used: the parser is built instead."""
from pathlib import Path

import lark
import pytest

import structc
from structc import syntax

ROOT = Path(__file__).resolve().parent.parent
REGENERATE = 'python -c "from structc.syntax import write_shipped_tables; write_shipped_tables()"'


@pytest.fixture
def fresh(monkeypatch):
    """`syntax.parser()` as a new process makes it, with no structc cache;
    `fresh(build_allowed=False)` fails the test if lark builds tables."""
    monkeypatch.setenv("STRUCTC_NO_CACHE", "1")

    def make(build_allowed=True):
        syntax.parser.cache_clear()
        if not build_allowed:
            monkeypatch.setattr(syntax, "Lark", type("NoBuild", (), {
                "__init__": lambda *a, **k: pytest.fail("built the parser's tables"), "load": lark.Lark.load}))
        try:
            return syntax.parser()
        finally:
            syntax.parser.cache_clear()
            monkeypatch.setattr(syntax, "Lark", lark.Lark)
    return make


def _header() -> dict:
    return syntax.shipped_tables_header((ROOT / "grammar" / syntax.SHIPPED_TABLES).read_bytes())


def test_the_shipped_tables_are_made_from_this_grammar():
    assert _header()["grammar"] == syntax.grammar_key(syntax.grammar_text()), \
        f"grammar/snet.lark changed since its tables were made: run {REGENERATE}"


def test_the_shipped_tables_are_made_by_the_lark_installed():
    """Tables of another lark version are not used (parsing builds them once
    and caches them); the shipped ones should be the ones in use."""
    assert _header()["lark"] == lark.__version__, \
        f"lark {lark.__version__} is installed, the tables are lark {_header()['lark']}'s: run {REGENERATE}"


def _parse_with(parser, monkeypatch, source, file="<source>"):
    monkeypatch.setattr(syntax, "parser", lambda: parser)
    try:
        return syntax.parse(source, file)
    except structc.SnetError as e:
        return str(e)


BAD = ["model M { input x: f32[N, 3]\n output y = tanh(x +) }",
       "model M { input x f32[N] }", "model M { output y = f(x, }", "model { }"]


def test_a_cold_parser_loads_the_shipped_tables_and_parses_as_built_ones(fresh, monkeypatch):
    loaded = fresh(build_allowed=False)
    built = lark.Lark(syntax.grammar_text(), **syntax.PARSER_OPTIONS)
    sources = [(p.read_text(), p.name) for p in sorted((ROOT / "examples").glob("*.snet"))]
    assert len(sources) > 5
    for source, name in sources + [(b, "bad.snet") for b in BAD]:
        assert _parse_with(loaded, monkeypatch, source, name) == _parse_with(built, monkeypatch, source, name)


def test_tables_of_another_grammar_are_never_used(fresh, monkeypatch):
    """A grammar edited without remaking the tables parses its own language."""
    edited = syntax.grammar_text().replace('model: "model" NAME', 'model: "network" NAME')
    assert edited != syntax.grammar_text()
    monkeypatch.setattr(syntax, "grammar_text", lambda: edited)
    with pytest.raises(pytest.fail.Exception, match="built the parser"):
        fresh(build_allowed=False)
    parser = fresh()
    assert parser.parse("network M { input x: f32[3] }") is not None
    with pytest.raises(lark.exceptions.UnexpectedToken):
        parser.parse("model M { input x: f32[3] }")


def test_tables_of_another_lark_or_damaged_are_rebuilt(fresh, monkeypatch, tmp_path):
    monkeypatch.setattr(syntax.lark, "__version__", "0.0.1")
    with pytest.raises(pytest.fail.Exception, match="built the parser"):
        fresh(build_allowed=False)
    monkeypatch.undo()
    monkeypatch.setenv("STRUCTC_NO_CACHE", "1")
    shipped = (ROOT / "grammar" / syntax.SHIPPED_TABLES).read_bytes()
    damaged = tmp_path / syntax.SHIPPED_TABLES
    damaged.write_bytes(shipped[:-100])
    real = syntax._grammar_file
    monkeypatch.setattr(syntax, "_grammar_file", lambda name: damaged if name == syntax.SHIPPED_TABLES else real(name))
    with pytest.raises(pytest.fail.Exception, match="built the parser"):
        fresh(build_allowed=False)
    assert fresh().parse("model M { input x: f32[3] }") is not None
