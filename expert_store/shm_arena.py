"""The shared-memory arena: sealed expert blobs in one file that a co-located store writes and
decoder processes map and read, with no byte crossing a socket.

The file lives on a memory filesystem (/dev/shm, or a Kubernetes `emptyDir: {medium: Memory}`
both containers mount). Its layout::

    header (4 KiB) | index: `slots` records of 256 bytes | data: `slots` slots of `slot_bytes`

Header: magic b"ADAPARNA", version, state (LIVE / RETIRED), epoch (random, new whenever a store
takes the file), slots, slot_bytes, where index and data start, the next generation to hand out
and counters (publishes, evictions). Record i describes slot i (data at
`data_offset + i * slot_bytes`), all fields 8-byte aligned little-endian words::

    seq | generation | key | length | last_used_ns | pinned_until_ns | layer | expert |
    xxh3-128 of the blob (16 bytes) | precision (8 bytes) | model (128 bytes)

key is the xxh3-64 of the blob's store key (format.expert_key), 0 for an empty slot.

Why it cannot be read half-written (a seqlock per record, one writer process):
    writer: seq += 1 (odd) and key = 0 -> write the bytes -> fields, a new generation -> seq += 1
    reader: s1 = seq (odd: being written, a miss) -> check fields -> copy -> s2 = seq; s1 != s2
            means the slot was replaced or evicted while it copied: the copy is discarded.
Generations come from one header counter, so (slot, generation) never names two blobs. This
relies on stores becoming visible in program order (x86-64); a reader on a weakly ordered
machine should re-check the xxh3 of what it copied (`verify=True`).

Integrity: the publishing store checks every blob once as it enters (the xxh3-128 of the whole
blob against the manifest, and the header names the ref), then records the xxh3 in the index;
a reader trusts the seqlock, or re-hashes with `verify=True`.

Eviction: the writer evicts the least recently used slot whose pin has expired
(`pinned_until_ns`, CLOCK_MONOTONIC, the same clock in every process of a host); readers stamp
`last_used_ns` on every read, so the store's LRU sees decoder hits that never reached it. A blob
evicted under a reader is a failed seqlock check, never a torn copy.

A restarted store adopts the file when its layout (slots, slot_bytes) is unchanged: records that
are complete and whose bytes still match their xxh3 stay (a warm restart), the rest are cleared,
and the epoch changes. With another layout it writes a new file beside it, marks the old one
RETIRED and renames the new one over the path; a reader that sees RETIRED maps the path again.

Bytes only: no torch or numpy at import (the store's serving path stays light); `tensor()` and
`pin()` import torch when called.
"""

from __future__ import annotations

import mmap
import os
import secrets
import struct
import time
from dataclasses import dataclass
from typing import Any

import xxhash

from expert_store import format as blob_format, page_lock
from expert_store.errors import DataLoss, InvalidArgument, ResourceExhausted

MAGIC = b"ADAPARNA"
VERSION = 1
HEADER_BYTES = 4096
RECORD_BYTES = 256
RECORD_WORDS = RECORD_BYTES // 8
SLOT_ALIGN = 4096
LIVE, RETIRED = 1, 2

# header: magic, version, state, epoch, slots, record_bytes, slot_bytes, index_offset, data_offset
_HEADER = struct.Struct("<8sIIQIIQQQ")
# header words after it (u64, index into the header's word view)
H_NEXT_GENERATION, H_PUBLISHES, H_EVICTIONS = 8, 9, 10
_STATE_BYTE = 12  # state's offset in the header (u32)
# record words
SEQ, GENERATION, KEY, LENGTH, LAST_USED, PINNED_UNTIL, LAYER, EXPERT = range(8)
_DIGEST = slice(64, 80)
_PRECISION = slice(80, 88)
_MODEL = slice(88, 216)


def blob_key(model: str, layer: int, expert: int, precision: str) -> int:
    """The index key of a blob: xxh3-64 of its store key (never 0: 0 marks an empty slot)."""
    return xxhash.xxh3_64_intdigest(blob_format.expert_key(model, layer, expert, precision).encode()) or 1


def layout(budget_bytes: int, slot_bytes: int) -> tuple[int, int, int]:
    """(slots, index_offset, data_offset) of the largest arena within `budget_bytes`."""
    if slot_bytes <= 0 or slot_bytes % SLOT_ALIGN:
        raise InvalidArgument(f"slot_bytes must be a positive multiple of {SLOT_ALIGN}, got {slot_bytes}")
    # each slot costs its data and its record; the index is padded to SLOT_ALIGN
    slots = max(0, (int(budget_bytes) - HEADER_BYTES - SLOT_ALIGN) // (slot_bytes + RECORD_BYTES))
    if slots < 1:
        raise ResourceExhausted(f"an arena of {budget_bytes} bytes holds no slot of {slot_bytes} bytes "
                                f"(the largest blob)")
    index_offset = HEADER_BYTES
    data_offset = -(-(index_offset + slots * RECORD_BYTES) // SLOT_ALIGN) * SLOT_ALIGN
    return slots, index_offset, data_offset


@dataclass(frozen=True)
class Location:
    """Where a blob sits: arena bytes [offset, offset + size) of slot `slot`, valid while its
    record still carries `generation`."""

    slot: int
    offset: int
    size: int
    generation: int


@dataclass(frozen=True)
class Lease:
    """A blob's place at one moment (ArenaReader.lease): valid while its record's seq is `seq`.
    (epoch, slot, generation) names one published blob for as long as the file lives."""

    mapping: Any
    slot: int
    size: int
    generation: int
    seq: int
    epoch: int = 0
    pinned_until: int = 0   # the record's pinned_until_ns when leased: the writer keeps the slot till then


class _Mapping:
    """One mmap of an arena file and word views of its header and index."""

    def __init__(self, path: str, writable_data: bool) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR)
        try:
            st = os.fstat(fd)
            if st.st_size < HEADER_BYTES:
                raise InvalidArgument(f"{path} is not an arena (only {st.st_size} bytes)")
            # MAP_POPULATE: page tables are filled once here, not by faults on the per-token path
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            self.mm = mmap.mmap(fd, st.st_size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
            self.inode = (st.st_dev, st.st_ino)
        finally:
            os.close(fd)
        self.buf = memoryview(self.mm)
        magic, version, state, epoch, slots, record_bytes, slot_bytes, index_offset, data_offset = \
            _HEADER.unpack_from(self.buf, 0)
        if magic != MAGIC or version != VERSION or record_bytes != RECORD_BYTES:
            self.close()
            raise InvalidArgument(f"{path} is not a version-{VERSION} adapmoe arena")
        self.slots, self.slot_bytes = int(slots), int(slot_bytes)
        self.index_offset, self.data_offset = int(index_offset), int(data_offset)
        if self.data_offset + self.slots * self.slot_bytes > len(self.buf):
            self.close()
            raise InvalidArgument(f"{path} is shorter than its header says (truncated arena)")
        self.header_words = self.buf[:HEADER_BYTES].cast("Q")
        self.words = self.buf[self.index_offset:self.index_offset + self.slots * RECORD_BYTES].cast("Q")
        self.data = self.buf[self.data_offset:self.data_offset + self.slots * self.slot_bytes]
        if not writable_data:
            self.data = self.data.toreadonly()

    @property
    def epoch(self) -> int:
        return _HEADER.unpack_from(self.buf, 0)[3]

    @property
    def state(self) -> int:
        return struct.unpack_from("<I", self.buf, _STATE_BYTE)[0]

    def record(self, slot: int) -> memoryview:
        return self.buf[self.index_offset + slot * RECORD_BYTES:self.index_offset + (slot + 1) * RECORD_BYTES]

    def word(self, slot: int, field: int) -> int:
        return self.words[slot * RECORD_WORDS + field]

    def set_word(self, slot: int, field: int, value: int) -> None:
        self.words[slot * RECORD_WORDS + field] = value

    def slot_view(self, slot: int) -> memoryview:
        return self.data[slot * self.slot_bytes:(slot + 1) * self.slot_bytes]

    def keys(self) -> list[int]:
        return self.words[KEY::RECORD_WORDS].tolist()

    def names(self, slot: int) -> tuple[str, int, int, str]:
        rec = self.record(slot)
        return (bytes(rec[_MODEL]).rstrip(b"\0").decode(), self.word(slot, LAYER), self.word(slot, EXPERT),
                bytes(rec[_PRECISION]).rstrip(b"\0").decode())

    def digest(self, slot: int) -> bytes:
        return bytes(self.record(slot)[_DIGEST])

    def close(self) -> None:
        for name in ("data", "words", "header_words", "buf"):
            v = getattr(self, name, None)
            if isinstance(v, memoryview):
                v.release()
        try:
            self.mm.close()
        except BufferError:  # a caller still holds a view: the mapping goes with it
            pass


# --------------------------------------------------------------------------------------------
# the writer (the co-located store; one process)


class ArenaWriter:
    """The one process that writes an arena: picks slots, publishes blobs with the seqlock,
    evicts by LRU among unpinned slots. Not thread-safe: ArenaPublisher serialises calls."""

    def __init__(self, mapping: _Mapping) -> None:
        self.m = mapping
        self.path = mapping.path
        self.slots, self.slot_bytes = mapping.slots, mapping.slot_bytes
        self._by_key: dict[int, int] = {}
        for slot, key in enumerate(mapping.keys()):
            if key:
                self._by_key[key] = slot
        self._filling: set[int] = set()

    @classmethod
    def open(cls, path: str | os.PathLike, budget_bytes: int, slot_bytes: int) -> "ArenaWriter":
        """Adopt the arena at `path` when its layout matches (keeping blobs that still verify),
        else create one: fallocate'd up front, so a memory filesystem that cannot hold the
        budget fails here (ENOSPC) rather than with SIGBUS on a later write."""
        path = os.fspath(path)
        slots, index_offset, data_offset = layout(budget_bytes, slot_bytes)
        old = None
        if os.path.exists(path):
            try:
                old = _Mapping(path, writable_data=True)
            except (InvalidArgument, ValueError):
                if os.path.getsize(path):   # never overwrite a file that is not an arena
                    raise InvalidArgument(f"{path} exists and is not an adapmoe arena: give another path") from None
            if old is not None and (old.slots, old.slot_bytes) == (slots, slot_bytes):
                writer = cls(old)
                writer._adopt()
                return writer
        tmp = f"{path}.new-{os.getpid()}"
        size = data_offset + slots * slot_bytes
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o660)   # the store's user and group
        try:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                raise ResourceExhausted(f"cannot reserve {size} bytes for the arena at {path}: {e.strerror} "
                                        f"(a memory volume's sizeLimit or /dev/shm is smaller than the budget)") \
                    from None
            header = bytearray(HEADER_BYTES)
            _HEADER.pack_into(header, 0, MAGIC, VERSION, LIVE, _new_epoch(), slots, RECORD_BYTES, slot_bytes,
                              index_offset, data_offset)
            struct.pack_into("<Q", header, H_NEXT_GENERATION * 8, 1)
            os.pwrite(fd, bytes(header), 0)
            os.pwrite(fd, bytes(data_offset - HEADER_BYTES), HEADER_BYTES)  # an empty index
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        if old is not None:
            struct.pack_into("<I", old.buf, _STATE_BYTE, RETIRED)   # its readers map the path again
            old.close()
        os.replace(tmp, path)
        return cls(_Mapping(path, writable_data=True))

    def _adopt(self) -> None:
        """A restarted store takes the file over: a new epoch; complete records whose bytes
        still match their xxh3 stay, anything else (a write cut off by the crash) is cleared."""
        m = self.m
        struct.pack_into("<Q", m.buf, 16, _new_epoch())  # epoch (header bytes 16..24)
        struct.pack_into("<I", m.buf, _STATE_BYTE, LIVE)
        self._by_key.clear()
        for slot in range(self.slots):
            seq, key, length = m.word(slot, SEQ), m.word(slot, KEY), m.word(slot, LENGTH)
            good = (key and not seq & 1 and 0 < length <= self.slot_bytes
                    and xxhash.xxh3_128_digest(m.slot_view(slot)[:length]) == m.digest(slot))
            if good:
                self._by_key[key] = slot
                m.set_word(slot, PINNED_UNTIL, 0)
            else:
                m.set_word(slot, KEY, 0)
                m.set_word(slot, LENGTH, 0)
                m.set_word(slot, SEQ, seq + (seq & 1))   # even: no write in progress

    @property
    def epoch(self) -> int:
        return self.m.epoch

    def lookup(self, key: int) -> int | None:
        return self._by_key.get(key)

    def location(self, slot: int) -> Location:
        return Location(slot, slot * self.slot_bytes, self.m.word(slot, LENGTH), self.m.word(slot, GENERATION))

    def touch(self, slot: int, now_ns: int, pin_until_ns: int = 0) -> None:
        self.m.set_word(slot, LAST_USED, now_ns)
        if pin_until_ns > self.m.word(slot, PINNED_UNTIL):
            self.m.set_word(slot, PINNED_UNTIL, pin_until_ns)

    def victim(self, now_ns: int, protect: set[int]) -> int | None:
        """A slot to fill: an empty one, else the least recently used unpinned one that no
        publish in flight and no ref of the current request holds; None when all are held."""
        best, best_used = None, None
        for slot in range(self.slots):
            if slot in protect or slot in self._filling:
                continue
            if not self.m.word(slot, KEY):
                return slot
            if self.m.word(slot, PINNED_UNTIL) > now_ns:
                continue
            used = self.m.word(slot, LAST_USED)
            if best_used is None or used < best_used:
                best, best_used = slot, used
        return best

    def pinned(self, now_ns: int) -> int:
        return sum(1 for s in range(self.slots) if self.m.word(s, KEY) and self.m.word(s, PINNED_UNTIL) > now_ns)

    def used(self) -> int:
        return len(self._by_key)

    def begin(self, slot: int) -> memoryview:
        """Start replacing `slot` (seq odd, key cleared: readers miss it); returns its bytes."""
        m = self.m
        old = m.word(slot, KEY)
        if old:
            self._by_key.pop(old, None)
            m.header_words[H_EVICTIONS] += 1
        m.set_word(slot, SEQ, m.word(slot, SEQ) | 1)   # odd first, then anything else
        m.set_word(slot, KEY, 0)
        m.set_word(slot, LENGTH, 0)
        self._filling.add(slot)
        return m.slot_view(slot)

    def commit(self, slot: int, model: str, layer: int, expert: int, precision: str, length: int,
               digest: bytes, now_ns: int, pin_until_ns: int = 0) -> Location:
        """Publish the bytes written since begin(slot): fields, a new generation, seq even."""
        m = self.m
        rec = m.record(slot)
        rec[_DIGEST] = digest
        rec[_PRECISION] = precision.encode().ljust(8, b"\0")
        rec[_MODEL] = model.encode().ljust(128, b"\0")
        m.set_word(slot, LAYER, layer)
        m.set_word(slot, EXPERT, expert)
        m.set_word(slot, LENGTH, length)
        m.set_word(slot, LAST_USED, now_ns)
        m.set_word(slot, PINNED_UNTIL, pin_until_ns)
        generation = m.header_words[H_NEXT_GENERATION]
        m.header_words[H_NEXT_GENERATION] = generation + 1
        m.set_word(slot, GENERATION, generation)
        key = blob_key(model, layer, expert, precision)
        m.set_word(slot, KEY, key)
        m.set_word(slot, SEQ, m.word(slot, SEQ) + 1)   # even: published
        m.header_words[H_PUBLISHES] += 1
        self._filling.discard(slot)
        self._by_key[key] = slot
        return self.location(slot)

    def abort(self, slot: int) -> None:
        """A publish that failed: the slot stays empty."""
        self.m.set_word(slot, SEQ, self.m.word(slot, SEQ) + 1)
        self._filling.discard(slot)

    def counters(self) -> dict[str, int]:
        h = self.m.header_words
        return {"publishes": int(h[H_PUBLISHES]), "evictions": int(h[H_EVICTIONS])}

    def close(self) -> None:
        self.m.close()


def _new_epoch() -> int:
    return secrets.randbits(63) or 1


# --------------------------------------------------------------------------------------------
# the reader (the decoder; any number of processes)


class ArenaReader:
    """Maps an arena once and copies blobs out of it with the seqlock check (see the module
    docstring). `read` answers None for a blob that is not there (or was replaced while it
    copied): the caller asks the store to publish it and reads again."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.m = _Mapping(self.path, writable_data=False)
        self._hint: dict[int, int] = {}
        self.counts = {"reads": 0, "misses": 0, "torn": 0, "remaps": 0, "bytes": 0}
        self._tensor: Any = None
        self._pinned_ptr: int | None = None

    @property
    def epoch(self) -> int:
        return self.m.epoch

    @property
    def retired(self) -> bool:
        return self.m.state != LIVE

    @property
    def slots(self) -> int:
        return self.m.slots

    @property
    def slot_bytes(self) -> int:
        return self.m.slot_bytes

    def remap(self) -> None:
        """Map the path again (the store replaced the file). Views of the old mapping stay
        valid until dropped; a CUDA registration moves to the new mapping."""
        pinned = self._pinned_ptr is not None
        self.unpin()
        old = self.m
        self.m = _Mapping(self.path, writable_data=False)
        self._hint.clear()
        self._tensor = None
        self.counts["remaps"] += 1
        old.close()
        if pinned:
            self.pin()

    def find(self, model: str, layer: int, expert: int, precision: str) -> int | None:
        """The slot whose record names this blob now (a hint: read() re-checks it)."""
        key = blob_key(model, layer, expert, precision)
        slot = self._hint.get(key)
        if slot is not None and self.m.word(slot, KEY) == key:
            return slot
        try:
            slot = self.m.keys().index(key)
        except ValueError:
            self._hint.pop(key, None)
            return None
        self._hint[key] = slot
        return slot

    def read(self, model: str, layer: int, expert: int, precision: str, out: Any = None,
             verify: bool = False, generation: int | None = None) -> memoryview | bytes | None:
        """The blob's bytes copied out of the arena (into `out` when given, returning the
        filled view), or None when it is not published (or was replaced while copying, or is
        not `generation` when one is given). verify=True re-hashes the copy against the index
        (DataLoss on a mismatch)."""
        m = self.m
        self.counts["reads"] += 1
        slot = self.find(model, layer, expert, precision)
        if slot is None:
            self.counts["misses"] += 1
            return None
        key = blob_key(model, layer, expert, precision)
        s1 = m.word(slot, SEQ)
        length = m.word(slot, LENGTH)
        if (s1 & 1 or m.word(slot, KEY) != key or not 0 < length <= m.slot_bytes
                or (generation is not None and m.word(slot, GENERATION) != generation)
                or m.names(slot) != (model, layer, expert, precision)):
            self.counts["misses"] += 1
            return None
        digest = m.digest(slot)
        src = m.slot_view(slot)[:length]
        if out is None:
            got: Any = bytes(src)
        else:
            view = memoryview(out).cast("B")
            if len(view) < length:
                raise InvalidArgument(f"out holds {len(view)} bytes; the blob has {length}")
            view[:length] = src
            got = view[:length]
        src.release()
        if m.word(slot, SEQ) != s1:           # replaced or evicted while it was copied
            self.counts["torn"] += 1
            return None
        m.words[slot * RECORD_WORDS + LAST_USED] = time.monotonic_ns()   # the store's LRU sees this hit
        if verify and xxhash.xxh3_128_digest(got) != digest:
            raise DataLoss(f"{blob_format.expert_key(model, layer, expert, precision)} in the arena {self.path} "
                           f"(slot {slot}) does not match its xxh3")
        self.counts["bytes"] += length
        return got

    # ---- zero-copy consumers ----------------------------------------------------------------
    def lease(self, model: str, layer: int, expert: int, precision: str) -> "Lease | None":
        """Where the blob sits now, for a consumer that copies it itself (a DMA from tensor()
        straight into a GPU slot): copy tensor()[slot, :size], wait for the copy to finish, then
        `valid(lease)`; False means the slot was replaced meanwhile and the copy must be
        discarded (the seqlock, checked after the copy instead of around a memcpy). None: not
        published."""
        slot = self.find(model, layer, expert, precision)
        if slot is None:
            return None
        m = self.m
        seq, size = m.word(slot, SEQ), m.word(slot, LENGTH)
        if seq & 1 or m.word(slot, KEY) != blob_key(model, layer, expert, precision) or not 0 < size <= m.slot_bytes \
                or m.names(slot) != (model, layer, expert, precision):
            return None
        return Lease(m, slot, size, m.word(slot, GENERATION), seq, m.epoch, m.word(slot, PINNED_UNTIL))

    def pinned_past(self, lease: "Lease", now_ns: int, margin_ns: int) -> bool:
        """True when the leased blob is still in place (seq and epoch unchanged) and was pinned
        until at least `margin_ns` after `now_ns`: the writer evicts or replaces no pinned slot,
        so a copy out of it that ends within the margin needs no check afterwards. A store that
        restarts clears pins when it adopts the file, but changes the epoch first. Stamps its
        use as valid() does."""
        if lease.pinned_until <= now_ns + margin_ns or lease.epoch != self.m.epoch:
            return False
        return self.valid(lease)

    def valid(self, lease: "Lease") -> bool:
        """True when nothing replaced the leased slot since lease() (and stamps its use)."""
        if lease.mapping is not self.m or self.m.word(lease.slot, SEQ) != lease.seq:
            self.counts["torn"] += 1
            return False
        self.m.words[lease.slot * RECORD_WORDS + LAST_USED] = time.monotonic_ns()
        return True

    # ---- DMA ------------------------------------------------------------------------------
    def view(self, lease: "Lease") -> memoryview:
        """The leased blob's bytes in place (read-only; check valid(lease) after using them)."""
        return lease.mapping.slot_view(lease.slot)[:lease.size]

    def tensor(self) -> Any:
        """The data region as a torch uint8 tensor [slots, slot_bytes] (no copy, read-only use)."""
        if self._tensor is None:
            import torch

            import warnings
            with warnings.catch_warnings():   # the mapping is writable; the view is read-only by contract
                warnings.simplefilter("ignore")
                self._tensor = torch.frombuffer(self.m.buf[self.m.data_offset:], dtype=torch.uint8,
                                                count=self.m.slots * self.m.slot_bytes).view(self.m.slots,
                                                                                             self.m.slot_bytes)
        return self._tensor

    def pin(self) -> bool:
        """Page-lock the mapping for DMA (cudaHostRegister, once): copies from tensor() slices
        to the GPU then run at the pinned rate. False without CUDA."""
        if self._pinned_ptr is None:
            self._pinned_ptr = page_lock.register(self.tensor())
        return self._pinned_ptr is not None

    def unpin(self) -> None:
        if self._pinned_ptr is not None:
            page_lock.unregister(self._pinned_ptr)
            self._pinned_ptr = None

    def close(self) -> None:
        self.unpin()
        self._tensor = None
        self.m.close()


__all__ = ["ArenaReader", "ArenaWriter", "Lease", "Location", "blob_key", "layout", "MAGIC", "LIVE", "RETIRED"]
