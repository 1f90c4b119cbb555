"""Mutation fuzzer for the checker: every mutant of the examples and golden
files must give `SnetError` (or pass), never another exception, and never
take more than a couple of seconds.

Mutations, drawn from a fixed seed: byte flips, token deletion, duplication,
swap and replacement, splices between two sources, deep nesting (calls,
minus signs, parentheses, long sums, nested repeats) and huge numbers.

usage: python tests/fuzz/fuzz_sources.py [--count 100000] [--seed 0] [--slow 2.0] [--hang 10]
                                        [--save found.json]
prints a summary of escapes grouped by exception type and location, and the
slow inputs; exits 1 if there was any. tests/test_fuzz.py runs 5,000 of them.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import signal
import sys
import threading
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from structc.build import build_model
from structc.errors import SnetError
from structc.syntax import parse

ROOT = Path(__file__).resolve().parents[2]
TOKEN = re.compile(r'#[^\n]*|"[^"\n]*"|[A-Za-z_][A-Za-z0-9_]*|[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?'
                   r'|\|>|\s+|.', re.S)
HUGE = ["9" * 20, "9" * 308, "9" * 309, "9" * 400, "9" * 4301, "9" * 5000, str(2**1024), str(2**63),
        str(2**63 - 1), str(2**64), str(2**31), "3.4e38", "3.5e38", "1e308", "1e309", "1e-400", "0", "00", "0.0"]
# Pieces the examples do not have: tuples, and options that take them.
EXTRA_TOKENS = ["(0,)", "(2, 3)", "(1, 1, 0, 0)", "(3, 3)", "(N, 4)", "(1.5, 2)", "(x, 1)", "()", "(,)", "axes",
                "kernel", "stride", "padding", "axis", "keepdims", '"2,3"', '"3x3"', "same", "valid"]
EXTRA_SEEDS = [
    "model T { input x: f32[N, 3, 8, 8]  target y: class[N] of 4\n"
    "  h = conv(x, 4, kernel=(3, 3), stride=(1, 2), padding=(1, 1, 0, 0)) |> relu |> maxpool2d((2, 2))\n"
    "  s = sum(h, axes=(2, 3)) + mean(h, axes=(2, 3), keepdims=false)\n"
    "  loss cross_entropy(dense(reshape(s, (N, 4)), 4), y) }\n",
    "model M { input x: f32[N, 4]  target y: class[N] of 3\n"
    "  param W: f32[4, 3] = normal(0.1)\n"
    "  h = x @ W + 1.5 |> relu\n  output p = softmax(h)\n"
    "  loss cross_entropy(h, y) + 0.1 * mean(square(W)) }\n",
]
NESTS = [50, 149, 151, 332, 1000, 3000]
# An operand-shaped piece to nest: `relu(relu(... x ...))` needs something inside.
WRAPS = [("relu(", ")"), ("(", ")"), ("-", ""), ("x + ", ""), ("- (", ")"), ("sum(", ")"), ("repeat 1 { ", " }")]


def seed_sources() -> list[str]:
    files = sorted((ROOT / "examples").glob("*.snet")) + sorted((ROOT / "tests" / "golden").glob("*.snet"))
    return [f.read_text() for f in files] + EXTRA_SEEDS


def tokens(text: str) -> list[str]:
    return TOKEN.findall(text)


def _code_positions(toks: list[str]) -> list[int]:
    return [i for i, t in enumerate(toks) if not t.isspace()] or [0]


class Mutator:
    def __init__(self, sources: list[str], seed: int):
        self.rng = random.Random(seed)
        self.sources = sources
        self.vocab = sorted({t for s in sources for t in tokens(s) if not t.isspace()} | set(EXTRA_TOKENS))

    def mutant(self) -> str:
        self.seed_source = self.rng.choice(self.sources)
        toks = tokens(self.seed_source)
        for _ in range(self.rng.choice([1, 1, 1, 2, 2, 3, 4])):
            toks = self.rng.choice(self.MUTATIONS)(self, toks) or [" "]
        return "".join(toks)

    def _pick(self, toks: list[str]) -> int:
        return self.rng.choice(_code_positions(toks))

    def flip(self, toks):
        text = "".join(toks)
        if not text:
            return toks
        k = self.rng.randrange(len(text))
        ch = self.rng.choice(["\x00", "\t", "\n", "é", "{", "}", "(", ")", chr(self.rng.randrange(32, 127))])
        return tokens(text[:k] + ch + text[k + 1:])

    def delete(self, toks):
        i = self._pick(toks)
        return toks[:i] + toks[i + 1:]

    def duplicate(self, toks):
        i = self._pick(toks)
        j = min(len(toks), i + self.rng.choice([1, 1, 3, 10]))
        return toks[:j] + toks[i:j] + toks[j:]

    def swap(self, toks):
        i, j = self._pick(toks), self._pick(toks)
        toks = list(toks)
        toks[i], toks[j] = toks[j], toks[i]
        return toks

    def replace(self, toks):
        i = self._pick(toks)
        return toks[:i] + [self.rng.choice(self.vocab)] + toks[i + 1:]

    def splice(self, toks):
        other = tokens(self.rng.choice(self.sources))
        i, j = self.rng.randrange(len(toks) + 1), self.rng.randrange(len(other) + 1)
        return toks[:i] + other[j:] if self.rng.random() < 0.5 else toks[:i] + other[j:j + 30] + toks[i:]

    def nest(self, toks):
        i = self._pick(toks)
        opening, closing = self.rng.choice(WRAPS)
        n = self.rng.choice(NESTS)
        return toks[:i] + [opening * n, toks[i], closing * n] + toks[i + 1:]

    def huge(self, toks):
        numbers = [i for i, t in enumerate(toks) if t[:1].isdigit()] or [self._pick(toks)]
        i = self.rng.choice(numbers)
        return toks[:i] + [self.rng.choice(HUGE)] + toks[i + 1:]

    MUTATIONS = [flip, delete, delete, duplicate, swap, replace, replace, splice, nest, huge]


class Timeout(BaseException):
    """Raised by the alarm inside a run that takes far too long (a hang)."""


def _alarm(signum, frame):
    raise Timeout()


def check(source: str) -> None:
    """What the CLI's `check` does: parse, then build every model."""
    try:
        program = parse(source, "fuzz.snet")
        for name in program.model_names:
            build_model(program, name)
    except SnetError:
        pass


def where(exc: BaseException) -> str:
    """The innermost structc frame of a traceback: `module.py:line in function`."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "structc" in f.filename]
    f = (frames or traceback.extract_tb(exc.__traceback__))[-1]
    return f"{Path(f.filename).name}:{f.lineno} in {f.name}"


@dataclass
class Report:
    count: int = 0
    seconds: float = 0.0
    escapes: dict = field(default_factory=lambda: defaultdict(list))    # (type, where) -> [(source, seed)]
    slow: list = field(default_factory=list)                            # (seconds, source, seed)

    def ok(self) -> bool:
        return not self.escapes and not self.slow

    def summary(self, show: int = 2) -> str:
        lines = [f"{self.count} sources in {self.seconds:.1f} s: "
                 f"{sum(len(v) for v in self.escapes.values())} escapes, {len(self.slow)} slow"]
        for (kind, loc), sources in sorted(self.escapes.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"  {len(sources):6d}  {kind} at {loc}")
            examples = dict.fromkeys(_changes(s, seed) for s, seed in sorted(sources, key=lambda f: len(f[0])))
            lines.extend(f"          e.g. {text}" for text in list(examples)[:show])
        for secs, source, seed in sorted(self.slow, reverse=True)[:10]:
            lines.append(f"  slow {secs:.2f} s: {_changes(source, seed)}")
        return "\n".join(lines)


def _changes(source: str, seed: str, limit: int = 160) -> str:
    """The mutant's lines that are not in its seed, each shortened: what to look at."""
    old = set(seed.splitlines())
    new = [line.strip() for line in source.splitlines() if line not in old and line.strip()] or ["(lines removed)"]
    shown = [repr(line if len(line) <= limit else line[:limit] + f"...({len(line)} chars)") for line in new[:3]]
    return " | ".join(shown) + (f" | ... {len(new) - 3} more lines" if len(new) > 3 else "")


def run(count: int, seed: int = 0, slow: float = 2.0, hang: float = 10.0, progress: int = 0) -> Report:
    """Fuzz `count` mutants; an input is slow past `slow` seconds and stopped at `hang`.

    Both count CPU seconds of this process, not wall time, so that a machine
    busy with other work does not make inputs look slow."""
    mutator = Mutator(seed_sources(), seed)
    report = Report()
    use_alarm = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGPROF, _alarm) if use_alarm else None
    start = time.perf_counter()
    try:
        for k in range(count):
            source = mutator.mutant()
            t0 = time.process_time()
            try:
                if use_alarm:
                    signal.setitimer(signal.ITIMER_PROF, hang)
                check(source)
            except Timeout:
                report.escapes[("hang", f"stopped after {hang:g} CPU seconds")].append((source, mutator.seed_source))
                continue        # reported once, as a hang
            except Exception as e:  # noqa: BLE001 - every escape is what we are looking for
                report.escapes[(type(e).__name__, where(e))].append((source, mutator.seed_source))
            finally:
                if use_alarm:
                    signal.setitimer(signal.ITIMER_PROF, 0)
            secs = time.process_time() - t0
            if secs > slow:
                report.slow.append((secs, source, mutator.seed_source))
            if progress and (k + 1) % progress == 0:
                print(f"  {k + 1} sources, {sum(len(v) for v in report.escapes.values())} escapes, "
                      f"{len(report.slow)} slow, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    finally:
        if use_alarm:
            signal.signal(signal.SIGPROF, previous)
        report.count = k + 1 if count else 0
        report.seconds = time.perf_counter() - start
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slow", type=float, default=2.0, help="CPU seconds past which an input counts as slow")
    ap.add_argument("--hang", type=float, default=10.0, help="CPU seconds after which an input is stopped")
    ap.add_argument("--show", type=int, default=2, help="example sources shown per kind of escape")
    ap.add_argument("--save", metavar="FILE", help="write every escaping and slow source to FILE (JSON)")
    args = ap.parse_args(argv)
    sys.setrecursionlimit(1000)     # the interpreter's default: what a user's program has
    report = run(args.count, args.seed, args.slow, args.hang, progress=5000)
    print(report.summary(args.show))
    if args.save:
        found = {f"{kind} at {loc}": [s for s, _ in found] for (kind, loc), found in report.escapes.items()}
        found["slow"] = [source for _, source, _ in report.slow]
        Path(args.save).write_text(json.dumps(found, indent=1))
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
