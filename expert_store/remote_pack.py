"""Pack a MoE checkpoint into running store replicas over gRPC (PutBlob): the files a local pack
(``expert_store.pack``) writes, byte for byte; see ``pack_remote``. ``expert-store pack --store
grpc://...`` (or ``dns:///``, ``k8s://``) runs it."""

from __future__ import annotations

import logging
import mmap
import os
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

import grpc
from tqdm.auto import tqdm

from . import format as fmt
from ._proto.adapmoe.v1 import expert_store_pb2 as pb
from .checkpoint import check_pack_args, default_model_name, dense_file, pack_manifest, read_checkpoint_layout, tokenizer_files
from .client import GrpcStoreClient, Pem, parse_replicas, rendezvous_order
from .discovery import open_discovery
from .errors import DataLoss, NotFound, StoreError, error_for_code
from .manifest import BlobEntry, Manifest, Ref
from .quant import DEFAULT_GROUP_SIZE, expert_to_blob

log = logging.getLogger(__name__)


PLACEMENTS = ("all", "owner")
# The deadline of one upload (or one probe) grows with its size: deadline_s plus the bytes at
# this rate, so a 3 GB dense file over a slow link is not cut off by a deadline meant for RPCs.
MIN_TRANSFER_BYTES_PER_S = 16 << 20
UPLOAD_WINDOW = 2  # blobs whose uploads may still be in flight while the next one is quantized
PROBE_MAX_REFS = 64  # the server's default --max-refs
PROBE_MAX_BYTES = 1 << 30  # stored bytes the server may hash for one probe call


@dataclass
class RemotePackResult:
    model: str
    manifest: Manifest
    replicas: list[str]
    placement: str
    uploaded: dict[str, int]  # replica -> files this run uploaded to it (blobs, dense, config, ..., manifest)
    skipped: dict[str, int]  # replica -> files it already held with the same size and xxh3 (checked by it)
    bytes_uploaded: int = 0  # over all replicas


def resolve_replicas(target: str, timeout_s: float = 30.0) -> list[str]:
    """The replica addresses a target names now: "grpc://h:p,h:p" (or "h:p,h:p") as given,
    "dns:///host:port" / "k8s://ns/svc:port" through expert_store.discovery (the ready set at
    this moment). ValueError for a malformed target, discovery.DiscoveryError when none is ready."""
    if target.startswith(("dns:", "k8s://")):
        members = open_discovery(target)
        try:
            return members.wait_ready(timeout_s)
        finally:
            members.close()
    return parse_replicas(target)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _probe_answers() -> tuple:
    """Statuses by which a replica answers a probe with "not as expected" (the file is then
    uploaded); anything else (UNAVAILABLE, a broken stream) is an outage."""
    c = grpc.StatusCode
    return (c.NOT_FOUND, c.DATA_LOSS, c.INVALID_ARGUMENT, c.FAILED_PRECONDITION, c.OUT_OF_RANGE,
            c.RESOURCE_EXHAUSTED)


@dataclass
class _Replica:
    address: str
    client: GrpcStoreClient  # over this one address
    old: Manifest | None = None  # the model as this replica serves it before the pack (None: none)
    uploaded: int = 0
    skipped: int = 0
    bytes: int = 0


class _RemotePack:
    """One remote pack run: the replicas, their prior state, the upload pool."""

    def __init__(self, model: str, replicas: list[_Replica], placement: str, deadline_s: float, on_upload):
        self.model = model
        self.replicas = replicas
        self.addresses = [r.address for r in replicas]
        self.placement = placement
        self.deadline_s = deadline_s
        self.on_upload = on_upload
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=len(replicas) * (UPLOAD_WINDOW + 1),
                                       thread_name_prefix="pack-upload")
        self.pending: list[list[tuple[_Replica, Any]]] = []  # groups of (replica, future), oldest first

    # ---- placement

    def holders(self, key: str) -> list[_Replica]:
        """The replicas that must hold ``key``: every one ("all"), or its rendezvous owner
        (the replica a StoreClient over the same set fetches it from first)."""
        if self.placement == "all":
            return self.replicas
        owner = rendezvous_order(key, self.addresses)[0]
        return [r for r in self.replicas if r.address == owner]

    # ---- prior state

    def preflight(self) -> None:
        """Every replica answers Stat (one attempt each, so a replica that is down fails the pack
        at once), then its manifest of the model is read."""
        for r in self.replicas:
            reply = r.client.stat().get(r.address, {"error": "UNAVAILABLE: not in the replica set"})
            if "error" in reply:  # "CODE: details"
                code = reply["error"].split(":", 1)[0]
                what = "is unreachable" if code == "UNAVAILABLE" else "refused Stat"
                raise error_for_code(code, f"replica {r.address} {what}: {_one_line(reply['error'])}")
        request = pb.GetManifestRequest(model=self.model)
        for r in self.replicas:
            try:
                r.old = Manifest.from_proto(r.client.call(
                    fmt.file_key(self.model, "manifest.json"),
                    lambda stub, timeout, metadata: stub.GetManifest(request, timeout=timeout, metadata=metadata),
                    f"GetManifest({self.model})"))
            except NotFound:
                continue
            except DataLoss as e:
                log.warning("replica %s: its manifest of %s is unusable (%s); uploading everything",
                            r.address, self.model, _one_line(e))
                continue
            except Exception as e:
                raise self.replica_error(r, e) from None

    # ---- probes: does a replica hold a file with this size and xxh3? (resume)

    def probe_experts(self, r: _Replica, refs: list[Ref]) -> set[Ref]:
        """The refs (each listed in r's manifest) that r serves: each asked from its last byte
        (FetchExperts, offset size-1), so one byte per blob crosses the wire while the server
        checks the whole stored file against its manifest's size and xxh3 before it answers
        (tiers.nvme.NvmeRangeReader; a file it checked before and that has not changed since is
        trusted). A ref it cannot serve ends that stream (NOT_FOUND, DATA_LOSS, ...); the refs
        after it are asked again in the next call."""
        answers = _probe_answers()
        old_blobs = r.old.blobs if r.old is not None else {}
        refs = sorted(ref for ref in refs if ref in old_blobs and old_blobs[ref].size > 0)
        confirmed: set[Ref] = set()
        i = 0
        while i < len(refs):
            batch, nbytes = [], 0
            for ref in refs[i:i + PROBE_MAX_REFS]:
                if batch and nbytes + old_blobs[ref].size > PROBE_MAX_BYTES:
                    break
                batch.append(ref)
                nbytes += old_blobs[ref].size
            request = pb.FetchExpertsRequest(model=self.model, priority=pb.PREFETCH, refs=[
                pb.ExpertRef(layer=l, expert=e, precision=p, offset=old_blobs[(l, e, p)].size - 1)
                for (l, e, p) in batch])

            def rpc(stub, timeout, metadata, batch=batch, request=request, nbytes=nbytes):
                done: list[int] = []
                try:
                    for chunk in stub.FetchExperts(request, timeout=timeout + nbytes / MIN_TRANSFER_BYTES_PER_S,
                                                   metadata=metadata):
                        if chunk.last and chunk.index < len(batch) \
                                and chunk.total_size == old_blobs[batch[chunk.index]].size:
                            done.append(chunk.index)
                except grpc.RpcError as e:
                    if e.code() in answers:
                        return done, True
                    raise
                return done, False

            done, stopped = r.client.call(fmt.expert_key(self.model, *batch[0]), rpc,
                                          f"FetchExperts({self.model}) probe")
            confirmed.update(batch[j] for j in done)
            # a failed stream stops at the first ref it could not serve: the ones after it are unknown
            i += (max(done, default=-1) + 2) if stopped else len(batch)
        return confirmed

    def probe_dense(self, r: _Replica, size: int) -> bool:
        def rpc(stub, timeout, metadata):
            request = pb.FetchDenseRequest(model=self.model, offset=size - 1)
            try:
                for chunk in stub.FetchDense(request, timeout=timeout + size / MIN_TRANSFER_BYTES_PER_S,
                                             metadata=metadata):
                    if chunk.last:
                        return chunk.total_size == size
            except grpc.RpcError as e:
                if e.code() in _probe_answers():
                    return False
                raise
            return False

        return r.client.call(fmt.dense_key(self.model), rpc, f"FetchDense({self.model}) probe")

    # ---- uploads

    def upload(self, r: _Replica, kind: str, data: Any, key: str, **ref: Any) -> None:
        size = len(memoryview(data))
        r.client.put(self.model, kind, data, timeout_s=self.deadline_s + size / MIN_TRANSFER_BYTES_PER_S, **ref)
        with self.lock:
            r.uploaded += 1
            r.bytes += size
        if self.on_upload is not None:
            self.on_upload(r.address, key)

    def skip(self, r: _Replica) -> None:
        with self.lock:
            r.skipped += 1

    def ensure_file(self, r: _Replica, kind: str, data: bytes, same: bool) -> None:
        key = fmt.file_key(self.model, {"config": "config.json", "tokenizer": "tokenizer.json",
                                        "tokenizer_config": "tokenizer_config.json"}[kind])
        if same:
            self.skip(r)
        else:
            self.upload(r, kind, data, key)

    def ensure_expert(self, r: _Replica, ref: Ref, data: bytes, size: int, digest: str) -> None:
        if r.old is not None and r.old.blobs.get(ref) == (size, digest) and self.probe_experts(r, [ref]):
            self.skip(r)
            return
        layer, expert, precision = ref
        self.upload(r, "expert", data, fmt.expert_key(self.model, *ref), layer=layer, expert=expert,
                    precision=precision)

    def ensure_dense(self, r: _Replica, data: Any, size: int, digest: str) -> None:
        old = r.old
        if old is not None and (old.dense_size, old.dense_xxh3) == (size, digest) and self.probe_dense(r, size):
            self.skip(r)
            return
        self.upload(r, "dense", data, fmt.dense_key(self.model))

    def submit(self, replicas: list[_Replica], task, *args: Any) -> None:
        self.pending.append([(r, self.pool.submit(task, r, *args)) for r in replicas])

    def wait(self, keep: int = 0) -> None:
        """Wait until at most ``keep`` groups are in flight; the first failure raises, naming
        its replica."""
        while len(self.pending) > keep:
            for r, future in self.pending.pop(0):
                try:
                    future.result()
                except Exception as e:
                    raise self.replica_error(r, e) from None

    @staticmethod
    def replica_error(r: _Replica, e: BaseException) -> Exception:
        if isinstance(e, StoreError):
            return error_for_code(e.code, f"replica {r.address}: {_one_line(e)}")
        return StoreError(f"replica {r.address}: {type(e).__name__}: {_one_line(e)}")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        for r in self.replicas:
            r.client.close()  # cancels uploads still in flight after a failure


def pack_remote(
    checkpoint_dir: str | os.PathLike,
    target: str,
    model: str | None = None,
    precisions: Iterable[str] = ("bf16",),
    group_size: int = DEFAULT_GROUP_SIZE,
    *,
    codec: str = "auto",
    placement: str = "all",
    token: str | None = None,
    tls_ca: Pem = None,
    tls_cert: Pem = None,
    tls_key: Pem = None,
    tls_server_name: str | None = None,
    deadline_s: float = 30.0,
    discovery_timeout_s: float = 30.0,
    max_attempts: int | None = None,
    progress: bool = True,
    on_upload: Callable[[str, str], None] | None = None,
) -> RemotePackResult:
    """Pack a MoE checkpoint into running store replicas over gRPC (PutBlob), as
    ``pack_checkpoint`` does into a directory: the same blobs, dense file, config, tokenizer and
    manifest, byte for byte.

    target: "grpc://h:p[,h:p]", "h:p[,h:p]", "dns:///host:port" or "k8s://ns/svc:port" (the
    ready set when the pack starts).

    placement: "all" (default) uploads every file to every replica: each replica holds the
    whole model and serves it alone, as a store directory packed locally would. "owner"
    uploads each expert blob and the dense file only to its rendezvous owner (the replica a
    StoreClient over the same address set fetches it from first): 1/N of the disk per replica,
    but no redundancy (a replica down makes its blobs unavailable) and only for a replica set
    that does not change; config, tokenizer and manifest still go to every replica, since
    each one needs them to serve.

    Order and visibility: config and tokenizer, the dense file, every expert blob, and last
    the manifest, to every replica, only once every replica accepted all of its files. The
    server makes an upload visible only when it is complete and its xxh3 matched, and a model
    is listed and served only once its manifest is there, so nothing of a failed pack is
    visible. Any replica failing (unreachable at the start or past the client's retry window
    later, or rejecting a file) stops the pack before any manifest is written, with an error
    naming that replica. Only a failure in the manifest step itself can leave some replicas
    with the new manifest and others without it; a re-run completes them.

    Resume: a replica that already serves this model (a manifest from an earlier pack, e.g. a
    re-run, or another precision) is not sent a file it already holds with the same size and
    xxh3: the manifest names them and a probe of the file's last byte has the server check
    the whole stored file first (``_RemotePack.probe_experts``). Without a manifest (a first
    pack that broke off) the protocol offers no way to see the files already uploaded, so they
    are uploaded again. Every blob is still quantized again (its xxh3 is what is compared).

    Memory: one expert's weights plus at most UPLOAD_WINDOW + 1 blobs, and the dense part once
    while its temp file (under $TMPDIR) is written; the dense file is uploaded from a memory
    map. Every RPC has a deadline: deadline_s, plus the size at MIN_TRANSFER_BYTES_PER_S for
    uploads and probes. on_upload(address, key) is called after each accepted upload."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    precisions = check_pack_args(precisions, group_size)
    layout = read_checkpoint_layout(checkpoint_dir)
    model = fmt.validate_model_name(model) if model is not None else default_model_name(checkpoint_dir)
    addresses = resolve_replicas(target, discovery_timeout_s)
    replicas = []
    run = None
    try:
        for address in addresses:
            replicas.append(_Replica(address, GrpcStoreClient(
                [address], token=token, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
                tls_server_name=tls_server_name, deadline_s=deadline_s, max_streams=UPLOAD_WINDOW + 1,
                max_attempts=max_attempts, target=address)))
        run = _RemotePack(model, replicas, placement, deadline_s, on_upload)
        run.preflight()

        # config first (the server checks expert indices against it), then the tokenizer files
        tokenizer, tokenizer_config = tokenizer_files(layout)
        for kind, data in (("config", layout.config_bytes), ("tokenizer", tokenizer),
                           ("tokenizer_config", tokenizer_config)):
            if data is None:
                continue
            for r in replicas:
                held = None if r.old is None else {
                    "config": lambda m: m.config_json.encode(), "tokenizer": lambda m: bytes(m.tokenizer_json),
                    "tokenizer_config": lambda m: m.tokenizer_config_json.encode()}[kind](r.old)
                run.submit([r], run.ensure_file, kind, data, held == data)
        run.wait()

        with dense_file(layout, None) as (path, dense_size, dense_xxh3):
            with open(path, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            try:
                holders = run.holders(fmt.dense_key(model))
                log.info("dense.safetensors (%.1f MB) -> %s", dense_size / 1e6, ", ".join(r.address for r in holders))
                run.submit(holders, run.ensure_dense, mapped, dense_size, dense_xxh3)
                run.wait()
            finally:
                try:
                    mapped.close()
                except BufferError:  # a finished upload's view not yet collected: the GC unmaps it
                    pass

        blobs: dict[Ref, BlobEntry] = {}
        total = len(layout.expert_layers) * layout.num_experts * len(precisions)
        desc = f"pack {model} -> {len(replicas)} replica{'s' if len(replicas) > 1 else ''}"
        with tqdm(total=total, unit="blob", desc=desc, disable=not progress) as bar:
            for layer in layout.expert_layers:
                for expert in range(layout.num_experts):
                    weights = layout.expert_tensors(layer, expert)
                    for precision in precisions:
                        data = expert_to_blob(model, layer, expert, precision, weights, group_size=group_size,
                                              codec=codec)
                        entry = blobs[(layer, expert, precision)] = BlobEntry.of(data)
                        run.submit(run.holders(fmt.expert_key(model, layer, expert, precision)), run.ensure_expert,
                                   (layer, expert, precision), data, entry.size, entry.xxh3)
                        del data
                        run.wait(keep=UPLOAD_WINDOW)
                        bar.update(1)
                        bar.set_postfix_str(f"{sum(r.bytes for r in replicas) / 1e6:.1f} MB sent", refresh=False)
                    del weights
            run.wait()

        manifest = pack_manifest(layout, model, precisions, group_size, blobs, dense_size, dense_xxh3, tokenizer,
                               tokenizer_config)
        manifest = _merge_remote(run, manifest)
        data = manifest.to_json()
        # last, to every replica: every one of them has accepted all of its files by now
        key = fmt.file_key(model, "manifest.json")
        run.submit(replicas, run.upload, "manifest", data, key)
        run.wait()
    finally:
        if run is not None:
            run.close()
        else:
            for r in replicas:
                r.client.close()
    result = RemotePackResult(
        model=model, manifest=manifest, replicas=addresses, placement=placement,
        uploaded={r.address: r.uploaded for r in replicas}, skipped={r.address: r.skipped for r in replicas},
        bytes_uploaded=sum(r.bytes for r in replicas))
    log.info("packed %s into %s (placement %s): %d files uploaded (%d bytes), %d already there",
             model, ", ".join(addresses), placement, sum(result.uploaded.values()), result.bytes_uploaded,
             sum(result.skipped.values()))
    return result


def _merge_remote(run: _RemotePack, manifest: Manifest) -> Manifest:
    """_merge_previous for replicas: keep a precision an earlier pack left (named by the first
    replica's manifest that has the model) when every replica that must hold each of its blobs
    lists it with the same size and xxh3 and serves it (probe). The manifest is the same on
    every replica. The served manifest carries no checkpoint shapes: config.json's
    hidden_size/intermediate_size stand in for them."""
    old = next((r.old for r in run.replicas if r.old is not None), None)
    if old is None:
        return manifest
    old = replace(old, hidden_size=old.config.get("hidden_size"), intermediate_size=old.config.get("intermediate_size"))
    extras = manifest.older_precisions(old)
    if not extras:
        return manifest
    kept = {}
    for precision, entries in extras.items():
        need: dict[str, list[Ref]] = defaultdict(list)
        ok = True
        for ref, b in entries.items():
            for r in run.holders(fmt.expert_key(manifest.model, *ref)):
                if r.old is None or r.old.blobs.get(ref) != b:
                    ok = False
                need[r.address].append(ref)
        if ok:
            for r in run.replicas:
                if need[r.address] and len(run.probe_experts(r, need[r.address])) != len(need[r.address]):
                    ok = False
                    break
        if ok:
            kept[precision] = entries
        else:
            log.warning("dropping %s from %s's manifest: not every replica still holds all of its blobs",
                        precision, manifest.model)
    return manifest.with_precisions(kept)
