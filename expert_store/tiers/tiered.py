"""TieredStore: RAM -> Redis -> NVMe reads with promotion, write-through puts."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from expert_store.errors import DataLoss
from expert_store.tiers.memory import MemoryTier
from expert_store.tiers.nvme import NvmeTier
from expert_store.tiers.redis import RedisTier

log = logging.getLogger(__name__)

Validator = Callable[[bytes], None]
"""Raises (any exception) when the bytes are not a good copy of the key."""


class TieredStore:
    def __init__(self, nvme: NvmeTier, redis: RedisTier | None = None, memory: MemoryTier | None = None) -> None:
        self.nvme = nvme
        self.redis = redis
        self.memory = memory
        self._lock = threading.Lock()
        self._gets = 0
        self._misses = 0
        self._corrupt = 0
        self._get_seconds = 0.0

    @property
    def tiers(self) -> list:
        """The tiers in read order (fastest first)."""
        return [t for t in (self.memory, self.redis, self.nvme) if t is not None]

    def get(self, key: str, validate: Validator | None = None) -> bytes | None:
        """The bytes of ``key`` from the fastest tier that has a good copy, or None.

        A copy that ``validate`` rejects is dropped from RAM/Redis and the next tier is
        tried; copies found below are promoted into the faster tiers. When a tier held a
        copy but none was good, raises DataLoss (the NVMe file is never deleted here:
        it is the source of truth, `expert-store verify` reports it)."""
        t0 = time.perf_counter()
        bad: list[str] = []
        data = None
        found_in = None
        for tier in self.tiers:
            candidate = tier.get(key)
            if candidate is None:
                continue
            if validate is not None:
                try:
                    validate(candidate)
                except Exception as exc:  # noqa: BLE001 - any rejection means a bad copy
                    bad.append(f"{tier.name}: {exc}")
                    log.warning("bad copy of %s in the %s tier: %s", key, tier.name, exc)
                    if tier is not self.nvme:
                        tier.delete(key)
                    continue
            data, found_in = candidate, tier
            break
        with self._lock:
            self._gets += 1
            self._get_seconds += time.perf_counter() - t0
            if bad:
                self._corrupt += len(bad)
            if data is None:
                self._misses += 1
        if data is None:
            if bad:
                raise DataLoss(f"no good copy of {key}: " + "; ".join(bad))
            return None
        if found_in is self.nvme or found_in is self.redis:
            if found_in is self.nvme and self.redis is not None:
                self.redis.put(key, data)
            if self.memory is not None:
                self.memory.put(key, data)
        return data

    def get_cached(self, key: str, validate: Validator | None = None) -> bytes | None:
        """The bytes of ``key`` from RAM or Redis only (NVMe is not read), or None.

        A cached copy that ``validate`` rejects is dropped and counted as corrupt; a Redis
        hit is promoted into RAM. For the ranged path (ModelStore.open_expert): a miss here
        means the caller streams the key from NVMe in chunks instead of reading it whole."""
        t0 = time.perf_counter()
        data = None
        corrupt = 0
        for tier in (self.memory, self.redis):
            if tier is None:
                continue
            candidate = tier.get(key)
            if candidate is None:
                continue
            if validate is not None:
                try:
                    validate(candidate)
                except Exception as exc:  # noqa: BLE001 - any rejection means a bad copy
                    corrupt += 1
                    log.warning("bad copy of %s in the %s tier: %s", key, tier.name, exc)
                    tier.delete(key)
                    continue
            data = candidate
            if tier is self.redis and self.memory is not None:
                self.memory.put(key, data)
            break
        with self._lock:
            self._corrupt += corrupt
            if data is not None:
                self._gets += 1
                self._get_seconds += time.perf_counter() - t0
        return data

    def note_corrupt(self) -> None:
        """Count a copy found corrupt outside get() (a ranged NVMe stream whose xxh3 failed)."""
        with self._lock:
            self._corrupt += 1

    def put(self, key: str, data, *, cache: bool = True) -> None:
        """Write-through: NVMe first (raises on failure, e.g. ResourceExhausted on a full
        disk), then Redis and RAM (best effort). ``cache=False`` writes NVMe only and drops
        stale cached copies (bulk packing)."""
        self.nvme.put(key, data)
        for tier in (self.redis, self.memory):
            if tier is None:
                continue
            if cache:
                tier.put(key, data)
            else:
                tier.delete(key)

    def invalidate(self, key: str) -> None:
        """Drop cached copies (RAM, Redis) of ``key``; NVMe untouched."""
        for tier in (self.memory, self.redis):
            if tier is not None:
                tier.delete(key)

    def delete(self, key: str) -> None:
        self.invalidate(key)
        self.nvme.delete(key)

    def contains(self, key: str) -> bool:
        """Whether the store holds ``key`` (NVMe is authoritative)."""
        return self.nvme.contains(key)

    def stats(self) -> dict[str, dict]:
        """Tier name ("memory", "redis", "nvme"; read order) -> that tier's counters
        (hits, misses, bytes_read, bytes_written, errors, mean_read_latency_ms, ...)."""
        return {tier.name: tier.stats() for tier in self.tiers}

    def totals(self) -> dict:
        """Counters of whole-store gets: gets, misses (no tier had it), corrupt_copies
        (copies a validator rejected), mean_get_latency_ms."""
        with self._lock:
            return {
                "gets": self._gets,
                "misses": self._misses,
                "corrupt_copies": self._corrupt,
                "mean_get_latency_ms": 1000.0 * self._get_seconds / self._gets if self._gets else 0.0,
            }

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()
