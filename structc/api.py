"""`structc.compile`: source or path in, callable `Net` out, via the disk cache."""
from __future__ import annotations

import os
from pathlib import Path

from . import cache
from .compiler import Artifact, cache_key, compile_program
from .lower.module import Target
from .model import Net
from .native import JitModule, host_target
from .syntax import parse

#: how many models this process has compiled with LLVM (cache hits do not count)
COMPILE_COUNT = 0


def read_source(path_or_source) -> tuple[str, str]:
    """(source text, file name) from a path or from source text itself."""
    if isinstance(path_or_source, Path) or (isinstance(path_or_source, str) and "{" not in path_or_source):
        path = Path(path_or_source)
        try:
            return path.read_text(), str(path)
        except OSError as e:
            raise FileNotFoundError(f"cannot read {path}: {e.strerror}") from None
    if not isinstance(path_or_source, str):
        raise TypeError(f"expected a path or .snet source text, got {type(path_or_source).__name__}")
    return path_or_source, "<source>"


def compile(path_or_source, model: str | None = None, *, cache: bool = True, seed: int = 0,  # noqa: A001
            vocab=None, freeze=()) -> Net:
    """Compile a `.snet` model (a path or the source itself) to native code.
    `vocab` (word -> id) lets forests be passed as bracketed strings of words.
    `freeze` (parameter names or layer prefixes, e.g. `["conv1", "dense1.w"]`)
    leaves those parameters out of training: no gradient is computed for them
    and the update never changes them.

    Compiled code is cached on disk, keyed by the parsed program (comments and
    layout do not count), the model name, the compiler, LLVM and the target
    CPU: compiling it again loads it instead."""
    source, file = read_source(path_or_source)
    target = host_target()
    art = compile_artifact(source, file, model, target=target, cache=cache, freeze=freeze)
    net = Net(art.meta, JitModule(art.object, target), seed=seed)
    net._compiled_from = (source, file, model)     # what `net.profile` and the exporters rebuild it from
    if vocab is not None:
        net.vocab = vocab
    return net


def compile_artifact(source: str, file: str = "<source>", model: str | None = None, *,
                     target: Target | None = None, jit: bool = True, cache: bool = True,
                     freeze=()) -> Artifact:
    """The `Artifact` (metadata and object code) of `model` in `source`, for
    `target` (default: this machine), through the disk cache unless `cache`
    is False or `$STRUCTC_NO_CACHE` is set. `jit=False` gives position-
    independent code for a shared library. A cache hit carries no LLVM IR
    and no timings. `structc.compile` uses it; so can the CLI's `structc
    compile` (without `--dump`, which needs every stage), to share the cache."""
    global COMPILE_COUNT
    target = target or host_target()
    program = parse(source, file)
    use_cache = cache and os.environ.get("STRUCTC_NO_CACHE") is None
    if isinstance(freeze, str):
        raise TypeError(f"freeze must be a list of names, got the string {freeze!r} (write [{freeze!r}])")
    options = {"jit": jit, "freeze": sorted(set(freeze))} if freeze else {"jit": jit}
    key = cache_key(program, model, target, options) if use_cache else None
    hit = _cache_load(key, model) if use_cache else None
    if hit is not None:
        meta, obj = hit
        from .autodiff import warn_gradient_flow
        warn_gradient_flow(meta.get("gradient_warnings", []))   # as a fresh compile does
        # The key ignores the file name: report this file, not the one first compiled.
        return Artifact(dict(meta, file=file), obj, jit=jit)
    art = compile_program(program, model, target, jit=jit, freeze=freeze)
    COMPILE_COUNT += 1
    if use_cache:
        _cache_store(key, art.meta, art.object)
    return art


def _cache_load(key, model):
    return cache.load(key, model)


def _cache_store(key, meta, obj):
    cache.store(key, meta, obj)
