"""The on-disk cache of compiled models: object code plus metadata, by key.

Entries are written to a temporary file and renamed into place, so two
processes compiling the same model both succeed and a reader never sees a
half-written entry. Each entry records the SHA-256 of its object code; an
entry that fails the check (truncated, corrupted) is ignored and rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    env = os.environ.get("STRUCTC_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "structc"


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load(key: str) -> tuple[dict, bytes] | None:
    d = cache_dir()
    try:
        meta = json.loads((d / f"{key}.json").read_text())
        obj = (d / f"{key}.o").read_bytes()
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("object_sha256") != hashlib.sha256(obj).hexdigest():
        return None
    return meta, obj


def store(key: str, meta: dict, obj: bytes) -> None:
    """Best effort: a read-only or full disk only costs a recompile next time."""
    meta = dict(meta, object_sha256=hashlib.sha256(obj).hexdigest())
    d = cache_dir()
    try:
        _atomic_write(d / f"{key}.o", obj)
        _atomic_write(d / f"{key}.json", json.dumps(meta).encode())
    except OSError:
        pass
