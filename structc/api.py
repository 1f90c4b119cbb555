"""`structc.compile`: source or path in, callable `Net` out, via the disk cache."""
from __future__ import annotations

import os
from pathlib import Path

from . import cache
from .compiler import cache_key, compile_source
from .model import Net
from .native import JitModule, host_target

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


def compile(path_or_source, model: str | None = None, *, cache: bool = True, seed: int = 0) -> Net:  # noqa: A001
    """Compile a `.snet` model (a path or the source itself) to native code.

    Compiled code is cached on disk by a hash of the source, the model name,
    the compiler and the target CPU: compiling it again loads it instead."""
    global COMPILE_COUNT
    source, file = read_source(path_or_source)
    target = host_target()
    key = cache_key(source, model, target)
    hit = _cache_load(key) if cache and os.environ.get("STRUCTC_NO_CACHE") is None else None
    if hit is not None:
        meta, obj = hit
        from .autodiff import warn_gradient_flow
        warn_gradient_flow(meta.get("gradient_warnings", []))   # as a fresh compile does
    else:
        art = compile_source(source, file, model, target)
        COMPILE_COUNT += 1
        meta, obj = art.meta, art.object
        if cache:
            _cache_store(key, meta, obj)
    return Net(meta, JitModule(obj, target), seed=seed)


def _cache_load(key):
    return cache.load(key)


def _cache_store(key, meta, obj):
    cache.store(key, meta, obj)
