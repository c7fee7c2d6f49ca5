"""What every tier shares: the Tier protocol, key checks and thread-safe counters."""

from __future__ import annotations

import threading
from typing import Protocol, runtime_checkable

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
