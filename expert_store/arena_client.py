"""The decoder's side of a co-located store: `local-shm://PATH?control=HOST:PORT`.

    with StoreClient.open("local-shm:///dev/shm/adapmoe.arena?control=127.0.0.1:50061") as store:
        blob = store.fetch_expert("mixtral", 3, 5, "int4", out=host_slot)   # a copy out of the arena

`ArenaStoreClient` is a StoreClient (fetch_expert copies a blob out, with the seqlock check:
expert_store/shm_arena.py), and it hands out leases for readers that use the bytes in place:
`lease()` says where a blob sits, `view()`/`payload()` are its bytes in the mapping (a memoryview,
a torch tensor that `pin()` page-locks for DMA), `valid()` after the use says whether the store
replaced it meanwhile. The decoder's host tier reads this way (decoder/experts/host_tier.py):
arena -> GPU slot, no bytes object per expert. It maps the arena file once; only a blob the
arena does not hold costs a call to the co-located store (`ExpertArena.Ensure`, which publishes
it and answers where it sits). Manifests and the dense file come from the same port's
`ExpertStore` service.

Faults:
- a blob evicted or replaced while it is copied: the copy is discarded, Ensure, read again
  (`max_attempts` times; then Unavailable: the arena is too small for the working set);
- the store restarts: Ensure answers UNAVAILABLE until it is back (retried with backoff up to
  `deadline_s`); a store that adopted the file keeps the blobs it verified, one that made a new
  file marks the old RETIRED, and the reader maps the path again (also when Ensure reports an
  epoch other than the mapping's);
- the path is not the file the store writes (a volume mounted elsewhere): FAILED_PRECONDITION
  naming both;
- `verify=1` in the target re-hashes every copy against the index (DataLoss on a mismatch);
  by default a blob is trusted as checked when it entered the arena (the decoder's host tier
  checks the payload checksum again when it decodes).

Target: `local-shm://` + the arena's path (`local-shm:///dev/shm/x.arena`: absolute), then
`?control=HOST:PORT` (required) and optionally `&verify=1`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import parse_qs

import grpc

from expert_store._proto.adapmoe.v1 import expert_arena_pb2 as apb
from expert_store._proto.adapmoe.v1 import expert_arena_pb2_grpc as apb_grpc
from expert_store._proto.adapmoe.v1 import expert_store_pb2 as pb
from expert_store.client import PRIORITIES, GrpcStoreClient, StoreClient, _check_model, _check_ref, parse_replicas
from expert_store.errors import InvalidArgument, StoreError, Unavailable, error_for_code
from expert_store.manifest import Manifest
from expert_store.shm_arena import ArenaReader, Lease
from expert_store.wire import MAX_MESSAGE_BYTES, TOKEN_ENV

log = logging.getLogger("expert_store.arena_client")

SCHEME = "local-shm://"
MAX_REFS_PER_ENSURE = 64


def parse_target(target: str) -> tuple[str, str, bool]:
    """'local-shm://PATH?control=HOST:PORT[&verify=1]' -> (path, control address, verify)."""
    if not target.startswith(SCHEME):
        raise InvalidArgument(f"not a {SCHEME} target: {target!r}")
    path, _, query = target[len(SCHEME):].partition("?")
    params = parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(params) - {"control", "verify"})
    if not path or unknown or len(params.get("control", ())) != 1:
        raise InvalidArgument(f"{target!r}: expected {SCHEME}PATH?control=HOST:PORT[&verify=1]"
                              f"{f' (unknown: {unknown})' if unknown else ''}")
    try:
        (control,) = parse_replicas(params["control"][0])
    except ValueError as e:
        raise InvalidArgument(f"{target!r}: control: {e}") from None
    verify = params.get("verify", ["0"])[-1]
    if verify not in ("0", "1"):
        raise InvalidArgument(f"{target!r}: verify is 0 or 1")
    return path, control, verify == "1"


class ArenaStoreClient(StoreClient):
    """Reads experts from a co-located store's shared-memory arena (see the module docstring)."""

    def __init__(self, path: str, control: str, *, token: str | None = None, deadline_s: float = 30.0,
                 verify: bool = False, max_attempts: int = 4, target: str | None = None) -> None:
        if deadline_s <= 0 or max_attempts < 1:
            raise InvalidArgument("deadline_s and max_attempts must be positive")
        self.path, self.control_address = path, control
        self.target = target or f"{SCHEME}{path}?control={control}"
        self.deadline_s = float(deadline_s)
        self.verify = bool(verify)
        self.max_attempts = int(max_attempts)
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.control = GrpcStoreClient([control], token=token, deadline_s=deadline_s, max_streams=2)
        self._channel = grpc.insecure_channel(control, options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1_000),
        ])
        self._stub = apb_grpc.ExpertArenaStub(self._channel)
        self._lock = threading.Lock()   # one reader; its counters and remaps are not thread-safe
        self._reader: ArenaReader | None = None
        self._pin = False   # page-lock every mapping (pin())
        self.counts = {"arena_hits": 0, "ensures": 0, "retries": 0}

    @classmethod
    def open_target(cls, target: str, **kw: Any) -> "ArenaStoreClient":
        path, control, verify = parse_target(target)
        return cls(path, control, verify=verify, target=target, **kw)

    # ---- the arena -------------------------------------------------------------------------------
    def _mapped(self) -> ArenaReader:
        """The reader, mapped on first use and again when the store retired the file. Lock held."""
        if self._reader is None:
            try:
                self._reader = ArenaReader(self.path)
            except FileNotFoundError:
                raise Unavailable(f"no arena at {self.path} yet (is the co-located store at "
                                  f"{self.control_address} running with --arena {self.path}?)") from None
            if self._pin:
                self._reader.pin()
        elif self._reader.retired:
            log.info("the arena at %s was replaced: mapping it again", self.path)
            self._reader.remap()
        return self._reader

    def _ensure(self, model: str, refs: Sequence[tuple[int, int, str]], priority: str,
                pin_s: float = 0.0) -> apb.EnsureResponse:
        """ExpertArena.Ensure, UNAVAILABLE retried with backoff until deadline_s has passed
        (a restarting store); every other status raised as its StoreError."""
        request = apb.EnsureRequest(model=model, priority=PRIORITIES[priority], pin_s=pin_s,
                                    refs=[pb.ExpertRef(layer=l, expert=e, precision=p) for l, e, p in refs])
        end = time.monotonic() + self.deadline_s
        delay = 0.05
        self.counts["ensures"] += 1
        while True:
            left = end - time.monotonic()
            try:
                return self._stub.Ensure(request, timeout=max(0.01, left), metadata=self._metadata)
            except grpc.RpcError as e:
                code = e.code()
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) \
                        and time.monotonic() + delay < end:
                    self.counts["retries"] += 1
                    time.sleep(delay)
                    delay = min(1.0, delay * 2)
                    continue
                raise error_for_code(code.name, f"{self.control_address}: {e.details()}") from None

    def _through_arena(self, model: str, ref: tuple[int, int, str], priority: str,
                       take: Callable[[ArenaReader, int | None], Any]) -> tuple[Any, bool]:
        """take(reader, generation) on the mapped arena; when it answers None (not published,
        replaced meanwhile), Ensure and take again (see the module docstring). Returns (what
        take answered, whether an Ensure published it for this call)."""
        with self._lock:
            try:
                reader = self._mapped()
            except Unavailable:   # no arena yet: the store is starting, Ensure waits for it
                reader = None
            got = take(reader, None) if reader is not None else None
            if got is not None:
                self.counts["arena_hits"] += 1
                return got, False
        epochs = None
        for _ in range(self.max_attempts):
            reply = self._ensure(model, [ref], priority)
            with self._lock:
                reader = self._mapped()
                if reply.epoch != reader.epoch:
                    reader.remap()
                    if reply.epoch != reader.epoch:
                        epochs = (reply.epoch, reader.epoch)
                        continue
                got = take(reader, reply.blobs[0].generation)
            if got is not None:
                return got, True
        if epochs is not None:
            raise StoreError(f"{self.path} is not the arena the store at {self.control_address} publishes to "
                             f"(its epoch {epochs[1]}, the store's {epochs[0]}): mount the store's arena volume "
                             f"at this path", code="FAILED_PRECONDITION")
        raise Unavailable(f"{model} L{ref[0]} E{ref[1]} {ref[2]} was evicted {self.max_attempts} times before it "
                          f"could be read: the arena is too small for the working set")

    def _read(self, model: str, ref: tuple[int, int, str], out: Any, priority: str) -> Any:
        """One blob copied out of the arena, published first when missing."""
        return self._through_arena(model, ref, priority, lambda reader, generation: reader.read(
            model, *ref, out=out, verify=self.verify, generation=generation))[0]

    # ---- zero-copy: leases (the decoder's host tier copies from the mapping into GPU slots) ----
    def lease(self, model: str, layer: int, expert: int, precision: str,
              priority: str = "demand") -> tuple[Lease, bool]:
        """(where the blob sits now, whether an Ensure published it for this call), published
        first when missing. The caller reads `view(lease)` or `tensor()[lease.slot, :lease.size]`
        in place, then `valid(lease)`: False means the slot was replaced meanwhile and what was
        read must be discarded. A blob this call published was checked by the store as it
        entered (its xxh3 against the manifest); one found in place was published earlier."""
        if priority not in PRIORITIES:
            raise InvalidArgument(f"priority must be one of {sorted(PRIORITIES)}, got {priority!r}")
        model, ref = _check_model(model), _check_ref((layer, expert, precision))

        def take(reader: ArenaReader, generation: int | None) -> Lease | None:
            got = reader.lease(model, *ref)
            return got if got is not None and generation in (None, got.generation) else None

        return self._through_arena(model, ref, priority, take)

    def holds(self, model: str, layer: int, expert: int, precision: str) -> bool:
        """Whether the mapped arena holds the blob now (no call; False before the arena is mapped)."""
        with self._lock:
            return self._reader is not None and not self._reader.retired and \
                self._reader.find(model, layer, expert, precision) is not None

    def valid(self, lease: Lease) -> bool:
        """True when nothing replaced the leased blob since lease() (and stamps its use)."""
        with self._lock:
            return self._reader is not None and self._reader.valid(lease)

    def pinned_past(self, lease: Lease, margin_s: float) -> bool:
        """True when the leased blob is in place and pinned for at least `margin_s` more seconds
        (ArenaReader.pinned_past): a copy out of it issued now needs no check after it ends."""
        with self._lock:
            return (self._reader is not None and lease.mapping is self._reader.m
                    and self._reader.pinned_past(lease, time.monotonic_ns(), int(margin_s * 1e9)))

    def view(self, lease: Lease) -> memoryview | None:
        """The leased blob's bytes in place; None when the arena was mapped again since."""
        with self._lock:
            if self._reader is None or lease.mapping is not self._reader.m:
                return None
            return self._reader.view(lease)

    def payload(self, lease: Lease, start: int, stop: int) -> Any:
        """Bytes [start, stop) of the leased blob as a torch uint8 tensor over the mapping (no
        copy; page-locked when pin() succeeded): the source of a DMA into a GPU slot. None when
        the arena was mapped again since."""
        with self._lock:
            if self._reader is None or lease.mapping is not self._reader.m:
                return None
            if not 0 <= start <= stop <= lease.size:
                raise InvalidArgument(f"bytes [{start}, {stop}) of a {lease.size}-byte blob")
            return self._reader.tensor()[lease.slot, start:stop]

    def pin(self) -> bool:
        """Page-lock the mapping for DMA (cudaHostRegister) now and after every remap. False
        without CUDA (copies are then memcpy). The arena is mapped first (Unavailable until the
        store made it)."""
        with self._lock:
            self._pin = True
            return self._mapped().pin()

    # ---- the StoreClient API ----------------------------------------------------------------------
    def manifest(self, model: str) -> Manifest:
        return self.control.manifest(model)

    def fetch_expert(self, model, layer, expert, precision, out=None, priority="demand"):
        if priority not in PRIORITIES:
            raise InvalidArgument(f"priority must be one of {sorted(PRIORITIES)}, got {priority!r}")
        return self._read(_check_model(model), _check_ref((layer, expert, precision)), out, priority)

    def fetch_experts(self, model, refs, priority="demand") -> Iterator[tuple[tuple[int, int, str], Any]]:
        """(ref, blob) for every ref: the missing ones published in one Ensure per 64, then
        each copied out of the arena."""
        if priority not in PRIORITIES:
            raise InvalidArgument(f"priority must be one of {sorted(PRIORITIES)}, got {priority!r}")
        model = _check_model(model)
        refs = [_check_ref(r) for r in refs]
        with self._lock:
            try:
                reader = self._mapped()
            except Unavailable:
                reader = None
            missing = [r for r in dict.fromkeys(refs) if reader is None or reader.find(model, *r) is None]
        for i in range(0, len(missing), MAX_REFS_PER_ENSURE):
            self._ensure(model, missing[i:i + MAX_REFS_PER_ENSURE], priority)
        for ref in refs:
            yield ref, self._read(model, ref, None, priority)

    def fetch_dense(self, model: str, out: Any = None):
        return self.control.fetch_dense(model, out=out)

    def publish(self, model: str, refs: Sequence[tuple[int, int, str]], pin_s: float = 0.0,
                priority: str = "prefetch") -> int:
        """Have the store publish these blobs (a cold fill: at prefetch priority, on the store's
        prefetch threads, so demand misses pass it), and keep them from eviction for `pin_s`
        seconds (a lease). Returns how many blobs were asked for."""
        if priority not in PRIORITIES:
            raise InvalidArgument(f"priority must be one of {sorted(PRIORITIES)}, got {priority!r}")
        model = _check_model(model)
        refs = list(dict.fromkeys(_check_ref(r) for r in refs))
        for i in range(0, len(refs), MAX_REFS_PER_ENSURE):
            self._ensure(model, refs[i:i + MAX_REFS_PER_ENSURE], priority, pin_s=pin_s)
        return len(refs)

    def arena_info(self) -> apb.ArenaInfo:
        try:
            return self._stub.DescribeArena(apb.DescribeArenaRequest(), timeout=self.deadline_s,
                                            metadata=self._metadata)
        except grpc.RpcError as e:
            raise error_for_code(e.code().name, f"{self.control_address}: {e.details()}") from None

    def stat(self) -> dict:
        with self._lock:
            reader = dict(self._reader.counts) if self._reader is not None else {}
        return {"arena": {"path": self.path, "control": self.control_address, **self.counts, "reader": reader}}

    def close(self) -> None:
        with self._lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
        self._channel.close()
        self.control.close()


__all__ = ["ArenaStoreClient", "parse_target", "SCHEME"]
