"""Files structc writes and reads back whole: parameters, training states,
libraries, plots. One way to write them (a temporary file renamed into place)
and one way to read an `.npz` archive, so every caller fails the same way."""
from __future__ import annotations

import os
import tempfile
import zipfile
import zlib

import numpy as np


def write_atomically(path: str, write, *, by_name: bool = False, prefix: str = ".structc-",
                     suffix: str = ".npz.tmp", mode: int | None = None) -> None:
    """`write(file)` (or, `by_name`, `write(its name)`: for writers that open the file
    themselves) into a fresh temporary file beside `path`, then rename it over
    `path`: a crash leaves the old file whole, and a link planted at a
    predictable temporary name is never followed. `mode`: the file's permissions
    (default: a plain file's under the process's umask)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    try:
        if by_name:
            os.close(fd)
            write(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                write(f)
        os.chmod(tmp, 0o666 & ~umask() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def umask() -> int:
    """The process's umask, read without changing it (os.umask would, for
    an instant, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def read_archive(path) -> dict[str, np.ndarray]:
    """Every array of the `.npz` archive at `path`. FileNotFoundError when there is
    none; otherwise one ValueError saying what the file is instead: not an archive,
    one bare array (`.npy`), or an archive cut short or corrupt."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        raise ValueError("holds one bare array (.npy), not an .npz archive of named arrays")
    # a member's header, or the end record alone: the archive of no arrays (a model without parameters)
    if magic[:4] not in (b"PK\x03\x04", b"PK\x05\x06"):       # else numpy's error speaks of pickles
        raise ValueError("not an .npz archive")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(f"damaged (truncated or corrupt): {e}") from None
