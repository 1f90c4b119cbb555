"""`structc.compile`: source or path in, callable `Net` out, via the disk cache."""
from __future__ import annotations

import os
import threading
from pathlib import Path

from . import cache
from .compiler import (EAGER_PARTS, PARTS, Artifact, Timings, canonical_key, canonical_program, collector_paused,
                       compile_program, source_key)
from .lower.module import Target
from .model import Net
from .native import JitModule, compiling, host_target
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


@compiling()            # a fork waits for it: the Net made too (its first use imports numpy.random)
def compile(path_or_source, model: str | None = None, *, cache: bool = True, seed: int = 0,  # noqa: A001
            vocab=None, freeze=(), training: bool | str = False) -> Net:
    """Compile a `.snet` model (a path or the source itself) to native code.
    `vocab` (word -> id) lets forests be passed as bracketed strings of words.
    `freeze` (parameter names or layer prefixes, e.g. `["conv1", "dense1.w"]`)
    leaves those parameters out of training: no gradient is computed for them
    and the update never changes them.

    Only the forward entry is compiled at first; the training entries (of a
    model with a loss) are compiled on the first call that needs them
    (`train_step`, `grad`, ...), unless `training` is True: then both are
    compiled now, in parallel, as `structc train` does; `"background"`:
    the training entries are compiled in a thread started once the forward
    one is ready (a training call waits for it).

    Compiled code is cached on disk, keyed by the parsed program (comments and
    layout do not count), the model name, the compiler, LLVM and the target
    CPU: compiling it again loads it instead."""
    if training not in (True, False, "background"):
        raise ValueError(f"training must be True, False or 'background', got {training!r}")
    source, file = read_source(path_or_source)
    target = host_target()
    art = compile_artifact(source, file, model, target=target, cache=cache, freeze=freeze,
                           parts=None if training is True else ["forward"])

    def compile_deferred(part: str):
        """The metadata and object files of a part left for later."""
        more = compile_artifact(source, file, model, target=target, cache=cache, freeze=freeze, parts=[part])
        return more.meta, more.objects
    net = Net(art.meta, JitModule(art.object, target), seed=seed, deferred=compile_deferred)
    net._compiled_from = (source, file, model, tuple(freeze or ()))   # what `net.profile` and the exporters rebuild it from
    if vocab is not None:
        net.vocab = vocab
    if training == "background" and net.meta["deferred"]:
        threading.Thread(target=_compile_quietly, args=(net,), name="structc-compile-training", daemon=True).start()
    return net


def _compile_quietly(net: Net) -> None:
    """The deferred parts of `net`, compiled now; a failure is left for the
    training call that needs them to meet (it compiles again and raises)."""
    try:
        net._entries.get("train")
    except Exception:       # noqa: BLE001 - reported by the call that needs the entry
        pass


@collector_paused()     # also a `compiling()` region: a fork waits for the whole compile
def compile_artifact(source: str, file: str = "<source>", model: str | None = None, *,
                     target: Target | None = None, jit: bool = True, cache: bool = True,
                     freeze=(), parts=None) -> Artifact:
    """The `Artifact` (metadata and object code) of `model` in `source`, for
    `target` (default: this machine), through the disk cache unless `cache`
    is False or `$STRUCTC_NO_CACHE` is set. `jit=False` gives position-
    independent code for a shared library. `parts`: which of
    `compiler.PARTS` (default: the `EAGER_PARTS` the model has); the others are listed in
    `meta["deferred"]`. The cache holds each part under its own key, so a
    forward-only entry is never taken for a whole model, and a part compiled
    later is cached too. A cache hit carries no LLVM IR; its timings are the
    parse and the cache's. `structc.compile` uses it; so can the CLI's
    `structc compile` (without `--dump`, which needs every stage), to share
    the cache."""
    global COMPILE_COUNT
    target = target or host_target()
    times = Timings()
    use_cache = cache and os.environ.get("STRUCTC_NO_CACHE") is None
    if isinstance(freeze, str):
        raise TypeError(f"freeze must be a list of names, got the string {freeze!r} (write [{freeze!r}])")
    options = {"jit": jit, "freeze": sorted(set(freeze))} if freeze else {"jit": jit}
    # The canonical program from the cache's alias of this very text, or by parsing it.
    program = None
    alias = _cache_load(source_key(source, model, target, options), model, "alias") if use_cache else None
    canonical = alias[0].get("canonical") if alias is not None else None
    if not isinstance(canonical, str):
        with times.stage("parse"):
            program = parse(source, file)
        canonical = canonical_program(program)

    def key(part):      # the forward part keeps the options alone; any other part adds its name
        return canonical_key(canonical, model, target, options if part == "forward" else dict(options, part=part))
    found = {}
    if use_cache:
        with times.stage("cache.load"):
            found = _cached_parts(key, model, parts)
    wanted = _wanted_parts(found, parts)
    if "forward" in found and (wanted is None or "forward" in wanted):
        from .autodiff import refiled, warn_gradient_flow
        warn_gradient_flow(refiled(found["forward"][0].get("gradient_warnings", []), file))   # as a fresh compile does
    missing = None if wanted is None else [p for p in wanted if p not in found]
    llvm_ir, part_ir = "", ()
    if missing != []:
        if program is None:
            with times.stage("parse"):
                program = parse(source, file)
        art = compile_program(program, model, target, jit=jit, freeze=freeze, parts=missing, timings=times,
                              module_cache=use_cache)
        COMPILE_COUNT += 1
        absent = [p for p in missing or () if p not in art.meta["parts"]]
        if absent:
            raise ValueError(f"model {art.meta['model']} has no {absent[0]} part (it declares no loss)")
        objects = iter(art.objects)
        for part in art.meta["parts"]:
            found[part] = (_part_meta(art.meta, part),
                           tuple(next(objects) for _ in art.meta["objects"][part]))
            if use_cache:
                with times.stage("cache.store"):
                    _cache_store(key(part), found[part][0], b"".join(found[part][1]))
        wanted = wanted or art.meta["parts"]
        if art.meta["parts"] == wanted:
            llvm_ir, part_ir = art.llvm_ir, art.part_ir
    meta = _joined_meta([found[p][0] for p in wanted])
    if use_cache and alias is None:
        _cache_store(source_key(source, model, target, options), {"model": meta["model"], "canonical": canonical}, b"",
                     "alias")
    # The key ignores the file name: report this file, not the one first compiled.
    meta["file"] = file
    times.finish()
    return Artifact(meta, tuple(obj for p in wanted for obj in found[p][1]), llvm_ir, times, jit, part_ir)


def _cached_parts(key, model, parts) -> dict:
    """part -> (meta, object files) of the parts the cache holds: `parts`, or when
    None every part the forward part's entry says the model has."""
    found = {}
    for part in parts or ["forward"]:
        hit = _cached_part(key(part), model, part)
        if hit is not None:
            found[part] = hit
    if parts is None and "forward" in found:
        for part in (p for p in found["forward"][0]["deferred"] if p in EAGER_PARTS):
            hit = _cached_part(key(part), model, part)
            if hit is not None:
                found[part] = hit
    return found


def _cached_part(key: str, model, part: str):
    """(meta, object files) of a cached part; None if absent or not what this compiler writes."""
    hit = _cache_load(key, model)
    if hit is None:
        return None
    meta, blob = hit
    sizes = meta.get("objects", {}).get(part) if meta.get("parts") == [part] else None
    if not sizes or sum(sizes) != len(blob):
        return None
    objects, at = [], 0
    for size in sizes:
        objects.append(blob[at:at + size])
        at += size
    return meta, tuple(objects)


def _wanted_parts(found: dict, parts) -> list[str] | None:
    """The parts to return, in `PARTS` order; None when not known before compiling
    (every part the model has, and the cache has not said which those are)."""
    if parts is not None:
        return [p for p in PARTS if p in parts]
    if "forward" in found:
        return ["forward"] + [p for p in found["forward"][0]["deferred"] if p in EAGER_PARTS]
    return None


def _part_meta(meta: dict, part: str) -> dict:
    """The metadata of one part alone, as cached: its entries; the model's other parts deferred."""
    entries = {k: v for k, v in meta["entries"].items() if k in PARTS[part]}
    others = [p for p in PARTS if p != part and (p in meta["parts"] or p in meta["deferred"])]
    return dict(meta, entries=entries, parts=[part], deferred=others, objects={part: meta["objects"][part]})


def _joined_meta(metas: list[dict]) -> dict:
    """One metadata from the parts': every entry, the parts listed, the rest deferred."""
    meta = dict(metas[0], entries={}, objects={})
    parts = []
    for m in metas:
        meta["entries"].update(m["entries"])
        meta["objects"].update(m["objects"])
        parts += m["parts"]
    meta["parts"] = parts
    meta["deferred"] = [p for p in PARTS if p not in parts and (p in metas[0]["deferred"] or p in metas[0]["parts"])]
    return meta


def _cache_load(key, model, kind="entry"):
    return cache.load(key, model, kind)


def _cache_store(key, meta, obj, kind="entry"):
    cache.store(key, meta, obj, kind)
