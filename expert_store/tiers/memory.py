"""MemoryTier: a byte-budgeted LRU of blobs in the store process (thread-safe).

An entry can carry a *verified* token: what TieredStore checked the bytes against when they
entered the tier (e.g. the manifest's size and xxh3). The bytes are immutable, so a later
read checked against the same token need not hash them again; any put() of the key (a
new copy, from anywhere) starts unverified."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Hashable

from expert_store.tiers.base import TierStats, check_key


class MemoryTier:
    name = "memory"

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._verified: dict[str, Hashable] = {}
        self._used = 0
        self._evictions = 0
        self._lock = threading.Lock()
        self._stats = TierStats()

    def get(self, key: str) -> bytes | None:
        return self.get_entry(key)[0]

    def get_entry(self, key: str) -> tuple[bytes | None, Hashable | None]:
        """(bytes, verified token) of ``key``; (None, None) on a miss."""
        t0 = time.perf_counter()
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            verified = self._verified.get(key)
        if data is None:
            self._stats.miss(time.perf_counter() - t0)
        else:
            self._stats.hit(len(data), time.perf_counter() - t0)
        return data, verified

    def put(self, key: str, data, verified: Hashable | None = None) -> None:
        """Keep ``data`` under ``key``, evicting least recently used entries to stay within
        the budget. A value larger than the whole budget is not kept (and drops any older
        value of that key). ``verified``: the token the caller checked ``data`` against
        (None: unchecked)."""
        check_key(key)
        data = bytes(data)
        size = len(data)
        with self._lock:
            old = self._items.pop(key, None)
            self._verified.pop(key, None)
            if old is not None:
                self._used -= len(old)
            if size > self.budget_bytes:
                return
            while self._used + size > self.budget_bytes:
                evicted_key, evicted = self._items.popitem(last=False)
                self._verified.pop(evicted_key, None)
                self._used -= len(evicted)
                self._evictions += 1
            self._items[key] = data
            if verified is not None:
                self._verified[key] = verified
            self._used += size
        self._stats.wrote(size)

    def mark_verified(self, key: str, data: bytes, verified: Hashable) -> None:
        """Record that ``data`` (the very object get_entry returned) passed the check
        ``verified``; a no-op when the key has been replaced or dropped meanwhile."""
        with self._lock:
            if self._items.get(key) is data:
                self._verified[key] = verified

    def delete(self, key: str) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            self._verified.pop(key, None)
            if old is not None:
                self._used -= len(old)

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._verified.clear()
            self._used = 0

    @property
    def used_bytes(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._items)

    def stats(self) -> dict:
        s = self._stats.snapshot()
        with self._lock:
            s.update(used_bytes=self._used, budget_bytes=self.budget_bytes, entries=len(self._items), evictions=self._evictions)
        return s

    def close(self) -> None:
        self.clear()

    def __repr__(self) -> str:
        return f"MemoryTier(budget_bytes={self.budget_bytes}, used={self._used})"
