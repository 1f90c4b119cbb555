"""The on-disk cache of compiled models: object code plus metadata, by key.

An entry is one file, `<key>.entry`: a header, an HMAC-SHA256, then the
metadata (JSON) and the object code. The MAC covers the key, the metadata
and the object together, under a secret made on first use and kept in the
cache folder (`key`, mode 0600): an entry this user did not write, a
damaged one, or one renamed from another key fails the check, and is
rebuilt, never run.

Threat model. Protected: other local users and files planted or edited in
the cache folder. The folder must belong to this user and not be writable
by group or others (as ssh and pip require); it is created 0700, entries
and the secret 0600. A folder, entry or secret that fails these checks is
refused with a `CacheWarning` naming it and why, and the model is compiled
without the cache. Not protected: someone who can already write files as
this user (they could change the compiler itself).

Entries are written to a fresh file (exclusive creation) and renamed into
place, so two processes compiling the same model both succeed and a
reader never sees a half-written entry. Every file is opened relative to
the checked folder, never through a symbolic link.

The folder is bounded (`STRUCTC_CACHE_MAX_MB`, default 1024): a store that
takes it past the bound removes the files used longest ago (a load marks
its entry used) until three quarters of it are left, so a user who edits
models all day (every edit adds kernels) does not fill the disk.
"""
from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import struct
import sys
import warnings
from pathlib import Path

MAGIC = b"structc cache entry 2\n"
_MAC_SIZE = hashlib.sha256().digest_size
_SECRET_NAME = "key"
_SECRET_SIZE = 32
_KEY_PATTERN = re.compile(r"[0-9a-f]{16,64}")
_NO_FOLLOW = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
DEFAULT_MAX_MB = 1024


class CacheWarning(UserWarning):
    """The cache was not used for a model (a folder, entry or secret was refused)."""


class _Refused(Exception):
    pass


def cache_dir() -> Path:
    env = os.environ.get("STRUCTC_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "structc"


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, CacheWarning, stacklevel=_user_level())


def _user_level() -> int:
    """The stack level of the first caller outside structc, so that a
    warning names the user's line, whichever entry point they used."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(2), 2     # level 1 is _warn_once, 2 its caller
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _check(st: os.stat_result, path, what: str, forbidden: int) -> None:
    """Refuse `path` unless this user owns it and no one else may write
    it (`forbidden`: the mode bits group and others must not have)."""
    uid = os.geteuid()
    if st.st_uid != uid:
        raise _Refused(f"{what} {path} belongs to uid {st.st_uid}, not to you (uid {uid})")
    if st.st_mode & forbidden:
        who = "read or written" if forbidden & 0o044 else "written"
        raise _Refused(f"{what} {path} can be {who} by group or others (mode {stat.S_IMODE(st.st_mode):04o})")


def _open_dir(create: bool) -> int | None:
    """A descriptor of the checked cache folder, or None when there is none yet."""
    d = cache_dir()
    if create:
        d.parent.mkdir(parents=True, exist_ok=True)
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            pass
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except PermissionError:
        _check(os.stat(d), d, "cache folder", 0o022)    # another user's, most likely: say so
        raise
    try:
        st = os.fstat(fd)
        _check(st, d, "cache folder", 0o022)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read(dir_fd: int, name: str, what: str, forbidden: int) -> bytes:
    """The contents of `name` in the folder, after the owner and mode checks."""
    path = cache_dir() / name
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | _NO_FOLLOW, dir_fd=dir_fd)   # a FIFO cannot block
    except OSError as e:
        if e.errno == errno.ELOOP:     # what O_NOFOLLOW says of a link
            raise _Refused(f"{what} {path} is a symbolic link") from None
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise _Refused(f"{what} {path} is not a regular file")
        _check(st, path, what, forbidden)
        return f.read()


def _write_new(dir_fd: int, name: str, data: bytes) -> str:
    """Write `data` to a new file (mode 0600, exclusive creation: never
    through an existing file or link) next to `name`; its name."""
    tmp = f".{name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NO_FOLLOW, 0o600, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        os.unlink(tmp, dir_fd=dir_fd)
        raise
    return tmp


def _secret(dir_fd: int, create: bool) -> bytes | None:
    """This user's MAC key, made on first use when `create`."""
    try:
        try:
            secret = _read(dir_fd, _SECRET_NAME, "cache key", 0o077)
        except FileNotFoundError:
            if not create:
                return None
            tmp = _write_new(dir_fd, _SECRET_NAME, secrets.token_bytes(_SECRET_SIZE))
            try:   # link, unlike rename, fails when another process made the key first
                os.link(tmp, _SECRET_NAME, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp, dir_fd=dir_fd)
            secret = _read(dir_fd, _SECRET_NAME, "cache key", 0o077)
        if len(secret) != _SECRET_SIZE:
            raise _Refused(f"cache key {cache_dir() / _SECRET_NAME} is not {_SECRET_SIZE} bytes long")
    except _Refused as e:
        raise _Refused(f"{e} (delete it: a new key is made on the next compile, and the entries are rebuilt)") from None
    return secret


def _mac(secret: bytes, key: str, payload: bytes) -> bytes:
    return hmac.new(secret, MAGIC + key.encode() + b"\0" + payload, hashlib.sha256).digest()


#: what a file holds, by its suffix: compiled code, a source text's canonical program (api's alias),
#: the object code of one LLVM module, keyed by its IR text (`compiler.module_key`), or a
#: kernel's text and what it calls, keyed by what determines them (`lower/lowered.py`)
KINDS = ("entry", "alias", "object", "parser", "lowered")


def _entry_name(key: str, kind: str = "entry") -> str:
    if not isinstance(key, str) or not _KEY_PATTERN.fullmatch(key):
        raise ValueError(f"not a cache key: {key!r}")
    if kind not in KINDS:
        raise ValueError(f"not a kind of cache file: {kind!r}")
    return f"{key}.{kind}"


def _unpack(data: bytes, key: str, secret: bytes) -> tuple[dict, bytes] | None:
    head = len(MAGIC) + _MAC_SIZE + 8
    if len(data) < head or not data.startswith(MAGIC):
        return None
    mac, payload = data[len(MAGIC):len(MAGIC) + _MAC_SIZE], data[len(MAGIC) + _MAC_SIZE:]
    if not hmac.compare_digest(mac, _mac(secret, key, payload)):
        return None
    (meta_size,) = struct.unpack("<Q", payload[:8])
    try:
        meta = json.loads(payload[8:8 + meta_size])
    except ValueError:
        return None
    if not isinstance(meta, dict) or meta.pop("cache_key", None) != key:
        return None
    return meta, payload[8 + meta_size:]


def load(key: str, model: str | None = None, kind: str = "entry") -> tuple[dict, bytes] | None:
    """(metadata, object code) of the entry `key`, or None when there is no
    entry, or it fails a check (a refused one also warns). `model`, when
    given, must be the model the entry holds."""
    name = _entry_name(key, kind)
    try:
        dir_fd = _open_dir(create=False)
    except _Refused as e:
        _warn_once(f"not using the structc cache: {e}; compiling without it "
                   f"(make the folder yours and private, or set STRUCTC_CACHE_DIR)")
        return None
    except OSError:
        return None
    if dir_fd is None:
        return None
    try:
        secret = _secret(dir_fd, create=False)
        if secret is None:
            return None
        entry = _unpack(_read(dir_fd, name, "cache entry", 0o022), key, secret)
        if entry is not None:
            _mark_used(dir_fd, name)
    except _Refused as e:
        _warn_once(f"not using a structc cache file: {e}; compiling without it")
        return None
    except OSError:
        return None
    finally:
        os.close(dir_fd)
    if entry is None:
        _warn_once(f"structc cache entry {cache_dir() / name} failed its integrity check "
                   "(damaged, or not written by structc as you); recompiling")
        return None
    if model is not None and entry[0].get("model") != model:
        return None
    return entry


def store(key: str, meta: dict, obj: bytes, kind: str = "entry") -> None:
    """Best effort: a read-only or full disk only costs a recompile next time."""
    store_many([(key, meta, obj)], kind)


def store_many(items: list[tuple[str, dict, bytes]], kind: str = "entry") -> None:
    """`store` of each (key, metadata, object), the folder and the secret opened
    once (a compile's kernel records: a hundred small files)."""
    files = []
    for key, meta, obj in items:
        meta_bytes = json.dumps(dict(meta, cache_key=key)).encode()
        files.append((key, _entry_name(key, kind), struct.pack("<Q", len(meta_bytes)) + meta_bytes + obj))
    if not files:
        return
    try:
        dir_fd = _open_dir(create=True)
    except _Refused as e:
        _warn_once(f"not using the structc cache: {e}; compiling without it "
                   f"(make the folder yours and private, or set STRUCTC_CACHE_DIR)")
        return
    except OSError:
        return
    try:
        secret = _secret(dir_fd, create=True)
        for key, name, payload in files:
            tmp = _write_new(dir_fd, name, MAGIC + _mac(secret, key, payload) + payload)
            try:
                os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                os.unlink(tmp, dir_fd=dir_fd)
                raise
            _prune(dir_fd, keep=name)
    except _Refused as e:
        _warn_once(f"not using the structc cache: {e}; compiling without it")
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def max_bytes() -> int:
    """The folder's bound: `STRUCTC_CACHE_MAX_MB` (a number of MiB) or the default."""
    env = os.environ.get("STRUCTC_CACHE_MAX_MB")
    try:
        mb = float(env) if env else DEFAULT_MAX_MB
    except ValueError:
        raise ValueError(f"STRUCTC_CACHE_MAX_MB must be a number of MiB, got {env!r}") from None
    if not mb > 0:
        raise ValueError(f"STRUCTC_CACHE_MAX_MB must be positive, got {env!r}")
    return int(mb * 2**20)


def _mark_used(dir_fd: int, name: str) -> None:
    """An entry's modification time is when it was last used: pruning keeps recent ones."""
    try:
        os.utime(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        pass


#: the folder's size as this process last counted it, plus what it has stored since
#: (a count per store would list the folder ~30 times per cold compile)
_counted: dict[str, int] = {}


def _prune(dir_fd: int, keep: str) -> None:
    """Past the bound, remove the files used longest ago (never `keep`, the one
    just written, nor the secret) down to three quarters of the bound. Best
    effort: another process may be pruning too."""
    limit, folder = max_bytes(), str(cache_dir())
    written = os.stat(keep, dir_fd=dir_fd, follow_symlinks=False).st_size
    if folder in _counted and _counted[folder] + written <= limit:
        _counted[folder] += written
        return
    files = []
    with os.scandir(dir_fd) as it:
        for e in it:
            if e.name in (keep, _SECRET_NAME) or e.name.startswith(".") or not e.is_file(follow_symlinks=False):
                continue
            st = e.stat(follow_symlinks=False)
            files.append((st.st_mtime, st.st_size, e.name))
    total = sum(size for _, size, _ in files) + written
    if total > limit:
        for _, size, name in sorted(files):
            if total <= limit * 3 // 4:
                break
            try:
                os.unlink(name, dir_fd=dir_fd)
                total -= size
            except OSError:
                pass
    _counted[folder] = total
