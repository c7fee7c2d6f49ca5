"""NvmeTier: the store directory, one file per key under ``<root>/models/<key>``.

The source of truth. Writes are atomic and durable: the bytes go to a temp file in the
target's directory, are fsynced, renamed over the target with ``os.replace`` and then the
directory is fsynced, so a crash or a full disk never leaves a partial file under a key.
Temp files start with "." and never show up as keys.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import time
from pathlib import Path
from typing import Iterator

from expert_store.errors import ResourceExhausted
from expert_store.tiers.base import TierStats, check_key

_TMP_MARK = ".tmp-"
# A file whose mtime/ctime is this recent may still change without its stat changing (the
# kernel stamps files with a coarse clock): its content is checked on every read until then.
SETTLE_NS = 2_000_000_000


def file_signature(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What changes whenever a file's content can have changed: a rename over it (inode), a
    write or truncate (size, mtime, ctime; ctime cannot be set back, even by utime)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def settled_signature(before: os.stat_result, after: os.stat_result) -> tuple | None:
    """The file's signature when it did not change between ``before`` and ``after`` (an
    fstat around a read) and was last changed more than SETTLE_NS ago; else None (then
    nothing about its content may be remembered)."""
    sig = file_signature(before)
    if file_signature(after) != sig or time.time_ns() - max(before.st_mtime_ns, before.st_ctime_ns) <= SETTLE_NS:
        return None
    return sig
_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _space_error(exc: OSError, key: str) -> OSError | ResourceExhausted:
    if exc.errno in _SPACE_ERRNOS:
        err = ResourceExhausted(f"no space left to write {key!r}: {exc.strerror}")
        err.__cause__ = exc
        return err
    return exc


class AtomicWriter:
    """Streams bytes into a temp file next to the target; ``commit()`` makes them visible
    under the key in one rename, ``abort()`` (or any exception inside ``with``) removes the
    temp file. Disk-full errors are raised as ``ResourceExhausted``."""

    def __init__(self, tier: "NvmeTier", key: str) -> None:
        self._tier = tier
        self.key = check_key(key)
        self.path = tier.path(key)
        self.nbytes = 0
        self._done = False
        tier._makedirs(self.path.parent)
        self.tmp_path = self.path.parent / f".{self.path.name}{_TMP_MARK}{os.getpid()}-{secrets.token_hex(6)}"
        self._fd: int | None = None
        try:
            self._fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _space_error(exc, self.key) from exc

    def write(self, data) -> int:
        if self._fd is None:
            raise ValueError("write to a closed AtomicWriter")
        view = memoryview(data).cast("B")
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
                self.nbytes += n
        except OSError as exc:
            self.abort()
            raise _space_error(exc, self.key) from exc
        return len(data)

    def commit(self) -> None:
        if self._fd is None:
            raise ValueError("commit of a closed AtomicWriter")
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            os.replace(self.tmp_path, self.path)
            self._done = True
            _fsync_dir(self.path.parent)
        except OSError as exc:
            self.abort()
            raise _space_error(exc, self.key) from exc
        self._tier._stats.wrote(self.nbytes)

    def abort(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        if not self._done:
            try:
                os.unlink(self.tmp_path)
            except FileNotFoundError:
                pass
            self._done = True

    def __enter__(self) -> "AtomicWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._done:
            self.commit()
        else:
            self.abort()


class NvmeTier:
    name = "nvme"

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()
        self.models_dir = self.root / "models"
        self._makedirs(self.models_dir)
        self._stats = TierStats()

    # -- paths -------------------------------------------------------------------------
    def path(self, key: str) -> Path:
        """The file that holds ``key`` (it may not exist)."""
        return self.models_dir / check_key(key)

    def _makedirs(self, directory: Path) -> None:
        """mkdir -p, fsyncing the parent of every directory it creates (durable names)."""
        missing = []
        d = directory
        while not d.exists():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                continue
            except OSError as exc:
                raise _space_error(exc, str(d)) from exc
            _fsync_dir(d.parent)

    # -- Tier protocol -----------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        got = self.get_signed(key)
        return None if got is None else got[0]

    def get_signed(self, key: str) -> tuple[bytes, tuple | None] | None:
        """get(key) plus the file's settled_signature around the read (None when it changed
        meanwhile or changed recently); None when absent."""
        path = self.path(key)
        t0 = time.perf_counter()
        try:
            with open(path, "rb", buffering=0) as f:
                before = os.fstat(f.fileno())
                data = f.read()
                after = os.fstat(f.fileno())
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            self._stats.miss(time.perf_counter() - t0)
            return None
        except OSError:
            self._stats.error()
            raise
        self._stats.hit(len(data), time.perf_counter() - t0)
        return data, settled_signature(before, after)

    def read_range(self, key: str, offset: int = 0, length: int | None = None) -> bytes | None:
        """``length`` bytes of ``key`` from ``offset`` (to the end when None); None if absent."""
        try:
            with open(self.path(key), "rb", buffering=0) as f:
                f.seek(offset)
                return f.read() if length is None else f.read(length)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def open_read(self, key: str):
        """The file of ``key`` opened for reading (unbuffered binary), or None if absent.

        For ranged streaming: reading every chunk of one stream through this one open file
        means an atomic replacement of the key (rename over it) mid-stream cannot mix two
        versions; the stream keeps reading the inode it opened."""
        try:
            return open(self.path(key), "rb", buffering=0)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            self._stats.miss(0.0)
            return None

    def count_read(self, nbytes: int, seconds: float) -> None:
        """Count a ranged read of one key (a hit of ``nbytes``) in this tier's stats."""
        self._stats.hit(nbytes, seconds)

    def put(self, key: str, data) -> None:
        with self.writer(key) as w:
            w.write(data)

    def writer(self, key: str) -> AtomicWriter:
        """An AtomicWriter for streaming a large value in (``with tier.writer(k) as w: ...``)."""
        return AtomicWriter(self, key)

    def delete(self, key: str) -> None:
        path = self.path(key)
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError):
            return
        _fsync_dir(path.parent)

    def contains(self, key: str) -> bool:
        return self.path(key).is_file()

    def size(self, key: str) -> int | None:
        """Size in bytes of ``key``, or None when it is absent."""
        try:
            st = os.stat(self.path(key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def keys(self, prefix: str = "") -> Iterator[str]:
        """Every key starting with ``prefix``, in sorted order (temp files excluded)."""
        start = self.models_dir
        if "/" in prefix:
            head = prefix.rsplit("/", 1)[0]
            if head:
                check_key(head)
                start = self.models_dir / head
        if not start.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel_dir = Path(dirpath).relative_to(self.models_dir).as_posix()
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix):
                    yield key

    def children(self, prefix: str = "") -> list[str]:
        """Names directly under the directory ``prefix`` ("" = the top: model names)."""
        d = self.models_dir / check_key(prefix) if prefix else self.models_dir
        try:
            return sorted(n for n in os.listdir(d) if not n.startswith("."))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def remove_stale_temp_files(self, older_than_s: float = 3600.0) -> int:
        """Delete temp files a crashed writer left behind; returns how many."""
        removed = 0
        cutoff = time.time() - older_than_s
        for dirpath, _dirnames, filenames in os.walk(self.models_dir):
            for name in filenames:
                if name.startswith(".") and _TMP_MARK in name:
                    p = os.path.join(dirpath, name)
                    try:
                        if os.stat(p).st_mtime < cutoff:
                            os.unlink(p)
                            removed += 1
                    except FileNotFoundError:
                        pass
        return removed

    def stats(self) -> dict:
        return self._stats.snapshot()

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"NvmeTier({str(self.root)!r})"
