"""Data shipped with structc (README.md beside this file), and how a generator
beside it writes its file."""
from __future__ import annotations

import gzip
from pathlib import Path


def gz_lines(lines: list[str]) -> bytes:
    """A shipped `.txt.gz` of these lines, one per line, with no timestamp: the
    same lines give the same bytes, so a seeded generator rewrites its file
    byte for byte (its SHA-256 is what the loader checks)."""
    return gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0)


def write_lines(name: str, lines: list[str]) -> Path:
    """structc/data/<name>.txt.gz of these lines; returns its path."""
    path = Path(__file__).with_name(f"{name}.txt.gz")
    path.write_bytes(gz_lines(lines))
    return path
