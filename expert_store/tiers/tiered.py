"""TieredStore: RAM -> Redis -> NVMe reads with promotion, write-through puts.

Checked once, not per read: a caller that names its check with a ``token`` gets a copy
checked only when it is new to that check. A RAM copy is checked when it enters the tier
(or on its first read) and is immutable after; an NVMe file is checked again whenever its
stat signature (inode, size, mtime, ctime) changes, and on every read while it changed less
than NvmeTier's SETTLE_NS ago (coarse file timestamps); Redis copies, shared and remote, are
checked on every read. What stat cannot see (bit rot under an unchanged inode) is caught by
the client, which checks the blob's seal on every fetch and then sends the replica Verify
(ModelStore.verify_expert re-checks every copy and removes a bad one), and by
`expert-store verify`."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Hashable

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

    def get(self, key: str, validate: Validator | None = None, token: Hashable | None = None) -> bytes | None:
        """The bytes of ``key`` from the fastest tier that has a good copy, or None.

        A copy that ``validate`` rejects is dropped from RAM/Redis and the next tier is
        tried; copies found below are promoted into the faster tiers. When a tier held a
        copy but none was good, raises DataLoss (the NVMe file is never deleted here:
        it is the source of truth, `expert-store verify` reports it).

        ``token`` (hashable) names what ``validate`` checks, e.g. the manifest's (size,
        xxh3): a copy that already passed the same check is not checked again (a RAM copy
        since it entered the tier, an NVMe file while its stat is unchanged; see
        _first_good). None: every copy is validated on every read."""
        t0 = time.perf_counter()
        data, found_in, bad = self._first_good(self.tiers, key, validate, token)
        with self._lock:
            self._gets += 1
            self._get_seconds += time.perf_counter() - t0
            self._corrupt += len(bad)
            if data is None:
                self._misses += 1
        if data is None:
            if bad:
                raise DataLoss(f"no good copy of {key}: " + "; ".join(bad))
            return None
        self._promote(key, data, found_in, token if validate is not None else None)
        return data

    def get_cached(self, key: str, validate: Validator | None = None, token: Hashable | None = None) -> bytes | None:
        """The bytes of ``key`` from RAM or Redis only (NVMe is not read), or None.

        A cached copy that ``validate`` rejects is dropped and counted as corrupt; a Redis
        hit is promoted into RAM. For the ranged path (ModelStore.open_expert): a miss here
        means the caller streams the key from NVMe in chunks instead of reading it whole.
        ``token`` as in get."""
        t0 = time.perf_counter()
        data, found_in, bad = self._first_good([t for t in (self.memory, self.redis) if t is not None], key,
                                               validate, token)
        if data is not None:
            self._promote(key, data, found_in, token if validate is not None else None)
        with self._lock:
            self._corrupt += len(bad)
            if data is not None:
                self._gets += 1
                self._get_seconds += time.perf_counter() - t0
        return data

    def _first_good(self, tiers: list, key: str, validate: Validator | None,
                    token: Hashable | None) -> tuple[bytes | None, object, list[str]]:
        """(bytes, tier) of the first copy in ``tiers`` that passes ``validate`` (or passed
        it before under ``token``), and "tier: reason" of each copy rejected on the way (each
        dropped from its tier, except NVMe). (None, None, bad) when no copy is good."""
        bad: list[str] = []
        for tier in tiers:
            data, checked, signature = self._read(tier, key, token)
            if data is None:
                continue
            if validate is not None and not checked:
                try:
                    validate(data)
                except Exception as exc:  # noqa: BLE001 - any rejection means a bad copy
                    bad.append(f"{tier.name}: {exc}")
                    log.warning("bad copy of %s in the %s tier: %s", key, tier.name, exc)
                    if tier is not self.nvme:
                        tier.delete(key)
                    continue
                if token is not None:
                    self._remember(tier, key, data, token, signature)
            return data, tier, bad
        return None, None, bad

    def _read(self, tier, key: str, token: Hashable | None) -> tuple[bytes | None, bool, tuple | None]:
        """(bytes or None, already checked against ``token``, NVMe file signature)."""
        if token is None:
            return tier.get(key), False, None
        if tier is self.memory:
            data, verified = tier.get_entry(key)
            return data, data is not None and verified == token, None
        if tier is self.nvme:
            got = tier.get_signed(key)
            if got is None:
                return None, False, None
            data, signature = got
            return data, signature is not None and tier.checked(key, signature, token), signature
        return tier.get(key), False, None  # Redis: shared and remote, checked on every read

    def _remember(self, tier, key: str, data: bytes, token: Hashable, signature: tuple | None) -> None:
        if tier is self.memory:
            tier.mark_verified(key, data, token)
        elif tier is self.nvme and signature is not None:
            tier.mark_checked(key, signature, token)

    def _promote(self, key: str, data: bytes, found_in, verified: Hashable | None) -> None:
        """Copies found below go up: NVMe -> Redis and RAM, Redis -> RAM."""
        if found_in is self.nvme and self.redis is not None:
            self.redis.put(key, data)
        if (found_in is self.nvme or found_in is self.redis) and self.memory is not None:
            self.memory.put(key, data, verified=verified)

    def note_corrupt(self) -> None:
        """Count a copy found corrupt outside get() (a ranged NVMe stream whose xxh3 failed)."""
        with self._lock:
            self._corrupt += 1

    def put(self, key: str, data, *, cache: bool = True) -> None:
        """Write-through: NVMe first (raises on failure, e.g. ResourceExhausted on a full
        disk), then Redis and RAM (best effort). ``cache=False`` writes NVMe only and drops
        stale cached copies (bulk packing)."""
        self.nvme.put(key, data)
        self.nvme.forget_checked(key)
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
        self.nvme.forget_checked(key)

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
