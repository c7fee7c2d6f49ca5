"""What every tier shares: the Tier protocol (and SourceTier, the source of truth), key checks,
thread-safe counters, and the readers a stream is served from (BlobReader)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, BinaryIO, Callable, Hashable, Iterator, Protocol, runtime_checkable

from expert_store.errors import InvalidArgument

MAX_KEY_LEN = 1024


def check_key(key: str) -> str:
    """A store key is a relative, "/"-separated path with no empty, "." or ".." parts, no
    part starting with "." (reserved for temp files), and no braces (Redis hash tags)."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LEN:
        raise InvalidArgument(f"invalid store key {key!r}")
    if key.startswith("/") or "\\" in key or "\x00" in key or "{" in key or "}" in key:
        raise InvalidArgument(f"invalid store key {key!r}")
    for part in key.split("/"):
        if not part or part.startswith("."):
            raise InvalidArgument(f"invalid store key {key!r}: bad path component {part!r}")
    return key


class TierStats:
    """Counters of one tier, safe to bump from several threads."""

    FIELDS = ("hits", "misses", "bytes_read", "bytes_written", "errors")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.errors = 0
        self._read_seconds = 0.0
        self._reads = 0

    def hit(self, nbytes: int, seconds: float) -> None:
        with self._lock:
            self.hits += 1
            self.bytes_read += nbytes
            self._read_seconds += seconds
            self._reads += 1

    def miss(self, seconds: float) -> None:
        with self._lock:
            self.misses += 1
            self._read_seconds += seconds
            self._reads += 1

    def wrote(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_written += nbytes

    def error(self) -> None:
        with self._lock:
            self.errors += 1

    def snapshot(self) -> dict:
        with self._lock:
            mean_ms = 1000.0 * self._read_seconds / self._reads if self._reads else 0.0
            return {
                "hits": self.hits,
                "misses": self.misses,
                "bytes_read": self.bytes_read,
                "bytes_written": self.bytes_written,
                "errors": self.errors,
                "mean_read_latency_ms": mean_ms,
            }


@runtime_checkable
class Tier(Protocol):
    """A byte store keyed by store keys. ``get`` returns None on a miss; ``put`` is atomic
    (a reader sees the old bytes, the new bytes, or a miss, never a mix)."""

    name: str

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, data: bytes) -> None: ...

    def delete(self, key: str) -> None: ...

    def contains(self, key: str) -> bool: ...

    def stats(self) -> dict: ...


class BlobReader:
    """The chunks ``(offset, data, last)`` of one stored file from a resume offset: what the
    server streams. ``total`` is the file's size, ``source`` where the bytes come from
    ("whole": read whole and checked, "cached": a checked copy from RAM/Redis, "nvme":
    streamed from the file). Iterate (or call ``next``); always ``close()`` (or use ``with``). At least one
    chunk comes out, even at offset == total (so the reader learns total and last=True).
    ``data`` is a read-only memoryview (no copy here). The server copies each piece twice:
    into bytes (protobuf's bytes fields take bytes only; server.chunk_message), then into the
    pb.BlobChunk message, and grpc serializes that."""

    total: int
    source: str
    reads_disk: bool = False  # True: next() may block on I/O (the server calls it in a thread)

    def __iter__(self) -> "BlobReader":
        return self

    def __next__(self) -> tuple[int, memoryview, bool]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "BlobReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_offset(offset: Any, total: int) -> int:
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= total:
        raise InvalidArgument(f"offset {offset} is past the end of a {total}-byte blob")
    return offset


class BufferReader(BlobReader):
    """Chunks of bytes already in memory (and already checked by the caller): memoryviews
    of them, no copies (the bytes are immutable)."""

    def __init__(self, data: bytes | memoryview, offset: int, chunk_bytes: int, source: str) -> None:
        self._view = memoryview(data)
        self.total = len(self._view)
        self.source = source
        self._pos = check_offset(offset, self.total)
        self._chunk = chunk_bytes
        self._done = False

    def __next__(self) -> tuple[int, memoryview, bool]:
        if self._done:
            raise StopIteration
        start = self._pos
        end = min(self.total, start + self._chunk)
        self._pos = end
        self._done = end == self.total
        return start, self._view[start:end], self._done

    def close(self) -> None:
        self._done = True
        self._view = memoryview(b"")


@runtime_checkable
class SourceTier(Tier, Protocol):
    """The tier that is the source of truth (NVMe: every file of every model). Besides the Tier
    calls, ModelStore lists it, reads parts of files, streams a file in chunks while checking it,
    and re-checks a file in full; a file that passed a check is remembered against its stat
    signature until it changes ("checked once")."""

    root: Path

    def keys(self, prefix: str = "") -> Iterator[str]: ...

    def children(self, prefix: str = "") -> list[str]: ...

    def size(self, key: str) -> int | None: ...

    def read_range(self, key: str, offset: int = 0, length: int | None = None) -> bytes | None: ...

    def signature(self, key: str) -> tuple | None:
        """What changes when the file of ``key`` changes; None if absent."""

    def open_range(self, key: str, size: int, digest: str, offset: int, chunk_bytes: int,
                   on_corrupt: Callable[[], None] | None = None) -> BlobReader | None:
        """The file streamed in chunks from ``offset``, checked against (size, xxh3) before its
        last chunk (``on_corrupt`` is called when it fails); None if absent."""

    def recheck(self, key: str, check: Callable[[BinaryIO], None], token: Hashable | None) \
            -> tuple[str | None, bool] | None:
        """Check the file again in full; a bad one is removed. None if absent, else (why bad, removed)."""

    def checked(self, key: str, signature: tuple, token: Hashable) -> bool: ...

    def mark_checked(self, key: str, signature: tuple, token: Hashable) -> None: ...

    def forget_checked(self, key: str) -> None: ...
