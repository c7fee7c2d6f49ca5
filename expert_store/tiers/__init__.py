"""Storage tiers of the expert store (bytes only, no torch): NVMe directory, Redis, RAM."""

from expert_store.tiers.base import BlobReader, BufferReader, SourceTier, Tier, TierStats, check_key
from expert_store.tiers.memory import MemoryTier
from expert_store.tiers.nvme import AtomicWriter, NvmeTier
from expert_store.tiers.redis import RedisTier, parse_redis_url
from expert_store.tiers.tiered import TieredStore

__all__ = [
    "Tier",
    "SourceTier",
    "BlobReader",
    "BufferReader",
    "TierStats",
    "check_key",
    "NvmeTier",
    "AtomicWriter",
    "RedisTier",
    "parse_redis_url",
    "MemoryTier",
    "TieredStore",
]
