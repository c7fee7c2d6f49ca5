"""Ranged serving: a blob larger than --stream-above-bytes streams from NVMe chunk by chunk,
checked against the manifest's xxh3 before its last chunk goes out, so a server holds a few
chunks per stream, not the blob (a Mixtral bf16 expert is ~350 MB).

Real `expert-store serve` processes on loopback: server RSS growth while a 70 MB blob
streams (and, as a control, the whole-blob path on the same blob), resume from an offset,
and corrupted files (a flipped byte in the middle, in the last chunk, in the prefix a resume
skips; a truncated file) -> DATA_LOSS, never a last chunk, never a blob the client accepts.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest
import torch
import xxhash

from service_procs import StoreServerProcess

from expert_store import format as blob_format
from expert_store._proto.adapmoe.v1 import expert_store_pb2 as pb
from expert_store._proto.adapmoe.v1 import expert_store_pb2_grpc as pb_grpc
from expert_store.client import StoreClient
from expert_store.errors import DataLoss
from expert_store.quant import expert_to_blob
from expert_store.store import ModelStore
from expert_store.tiers.nvme import NvmeRangeReader

pytestmark = pytest.mark.timeout(300)
MODEL = "ranged"
HIDDEN = 1024
BIG_FFN = 13632      # 3 * 1024 * 13632 * 2 bytes raw: a ~70 MB blob after lz4 of the exponent plane
SMALL_FFN = 512      # ~3 MB
MiB = 1 << 20


def build(root: Path) -> dict:
    store = ModelStore.open(root, ram_bytes=0)

    def put(kind: str, data: bytes, **ref) -> None:
        store.put_file(MODEL, kind, data, xxhash.xxh3_128_hexdigest(data), **ref)

    put("config", json.dumps({"num_hidden_layers": 1, "num_local_experts": 2, "hidden_size": HIDDEN,
                              "intermediate_size": BIG_FFN}).encode())
    g = torch.Generator().manual_seed(0)
    blobs = {}
    for expert, ffn in ((0, BIG_FFN), (1, SMALL_FFN)):
        w = {"w1": torch.randn(ffn, HIDDEN, generator=g), "w3": torch.randn(ffn, HIDDEN, generator=g),
             "w2": torch.randn(HIDDEN, ffn, generator=g)}
        blob = expert_to_blob(MODEL, 0, expert, "bf16", w)
        put("expert", blob, layer=0, expert=expert, precision="bf16")
        blobs[expert] = blob
    dense = torch.randint(0, 256, (3 * MiB + 17,), dtype=torch.uint8, generator=g).numpy().tobytes()
    put("dense", dense)
    put("manifest", json.dumps({
        "model": MODEL, "num_layers": 1, "num_experts": 2, "precisions": ["bf16"],
        "blobs": [{"layer": 0, "expert": e, "precision": "bf16", "size": len(b), "xxh3": blob_format.blob_checksum(b)}
                  for e, b in blobs.items()],
        "dense_size": len(dense), "dense_xxh3": xxhash.xxh3_128_hexdigest(dense)}).encode())
    store.close()
    return {"blobs": blobs, "dense": dense}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranged") / "store"
    return root, build(root)


def blob_path(root: Path, expert: int) -> Path:
    return root / "models" / blob_format.expert_key(MODEL, 0, expert, "bf16")


def corrupt_copy(root: Path, dest: Path, expert: int, at: int | None = None, truncate: int | None = None) -> Path:
    shutil.copytree(root, dest)
    path = blob_path(dest, expert)
    data = bytearray(path.read_bytes())
    if at is not None:
        data[at] ^= 0x40
    if truncate is not None:
        del data[truncate:]
    path.write_bytes(bytes(data))
    return dest


def raw_stream(address: str, expert: int, offset: int = 0) -> tuple[list[pb.BlobChunk], grpc.RpcError | None]:
    """Every chunk a FetchExperts stream delivers (data dropped after its length is noted) and
    the error it ended with, if any."""
    chunks, error = [], None
    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 16 * MiB)]) as channel:
        stub = pb_grpc.ExpertStoreStub(channel)
        request = pb.FetchExpertsRequest(model=MODEL, priority=pb.DEMAND, refs=[
            pb.ExpertRef(layer=0, expert=expert, precision="bf16", offset=offset)])
        try:
            for chunk in stub.FetchExperts(request, timeout=60):
                chunks.append(chunk)
        except grpc.RpcError as e:
            error = e
    return chunks, error


def serve(root: Path, tmp_path: Path, *args: str) -> StoreServerProcess:
    return StoreServerProcess(root, "--workers", "1", "--ram-bytes", "0", "--stream-above-bytes", "1M", *args,
                              log_dir=tmp_path).start()


def rss_growth_while(pid: int, fn) -> int:
    """Peak RSS of `pid` while fn() runs, minus its RSS just before (bytes)."""
    proc = psutil.Process(pid)
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        stop.set()
        t.join()
    return peak[0] - base


def test_large_blob_streams_with_bounded_server_memory(good, tmp_path):
    root, data = good
    big = data["blobs"][0]
    assert len(big) > 60 * MiB
    out = bytearray(len(big))
    growth = {}
    for mode, args in (("ranged", ()), ("whole", ("--stream-above-bytes", "1G"))):
        with serve(root, tmp_path, *args) as server, \
                StoreClient.open(server.address, deadline_s=120, max_streams=1) as client:
            client.fetch_expert(MODEL, 0, 1, "bf16")  # warm: code paths, buffers, page cache
            client.fetch_expert(MODEL, 0, 0, "bf16", out=out)
            out[:] = bytes(len(out))
            growth[mode] = rss_growth_while(server.pid, lambda: client.fetch_expert(MODEL, 0, 0, "bf16", out=out))
            assert out == big
    print({k: f"{v / MiB:.1f} MiB" for k, v in growth.items()})
    # a stream holds a couple of 1 MiB chunks plus gRPC's buffers; the control holds the blob
    assert growth["ranged"] < 24 * MiB, growth
    assert growth["whole"] > 0.8 * len(big), growth


def test_resume_from_offset(good, tmp_path):
    root, data = good
    big = data["blobs"][0]
    offset = 37 * MiB + 123
    with serve(root, tmp_path) as server:
        chunks, error = raw_stream(server.address, 0, offset)
        assert error is None
        assert [c.offset for c in chunks][0] == offset
        assert all(c.total_size == len(big) for c in chunks)
        assert all(len(c.data) <= MiB for c in chunks)
        assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
        assert b"".join(c.data for c in chunks) == big[offset:]
        # at the very end: one empty last chunk; past it: INVALID_ARGUMENT
        chunks, error = raw_stream(server.address, 0, len(big))
        assert error is None and len(chunks) == 1 and chunks[0].last and not chunks[0].data
        chunks, error = raw_stream(server.address, 0, len(big) + 1)
        assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT and not chunks
        # the dense file streams the same way, checked against the manifest's dense_xxh3
        with StoreClient.open(server.address, deadline_s=60) as client:
            client.manifest(MODEL)
            assert bytes(client.fetch_dense(MODEL)) == data["dense"]
            assert bytes(client.fetch_expert(MODEL, 0, 1, "bf16")) == data["blobs"][1]


@pytest.mark.parametrize("where", ["middle", "last_chunk", "prefix_of_resume", "truncated"])
def test_corrupted_file_yields_data_loss_and_never_a_last_chunk(good, tmp_path, where):
    root, data = good
    big = data["blobs"][0]
    offset = 0
    if where == "middle":
        bad = corrupt_copy(root, tmp_path / "bad", 0, at=len(big) // 2)
    elif where == "last_chunk":
        bad = corrupt_copy(root, tmp_path / "bad", 0, at=len(big) - 10)
    elif where == "prefix_of_resume":
        bad = corrupt_copy(root, tmp_path / "bad", 0, at=5 * MiB)
        offset = 60 * MiB  # the flipped byte is in the part the client already has
    else:
        bad = corrupt_copy(root, tmp_path / "bad", 0, truncate=len(big) - 1000)
    with serve(bad, tmp_path) as server:
        chunks, error = raw_stream(server.address, 0, offset)
        assert error is not None and error.code() == grpc.StatusCode.DATA_LOSS, error
        assert not any(c.last for c in chunks)
        assert sum(len(c.data) for c in chunks) < len(big) - offset
        with StoreClient.open(server.address, deadline_s=60) as client:
            with pytest.raises(DataLoss):
                client.fetch_expert(MODEL, 0, 0, "bf16", out=bytearray(len(big)))
            # the other blob is unaffected
            assert bytes(client.fetch_expert(MODEL, 0, 1, "bf16")) == data["blobs"][1]
        assert "DATA_LOSS" in server.log() or "xxh3" in server.log() or "size" in server.log()


def test_open_expert_prefers_a_checked_cached_copy(good, tmp_path):
    """In-process: a good copy in RAM is served from there; a bad one is dropped and the
    file is streamed (and checked) instead."""
    root, data = good
    small = data["blobs"][1]
    key = blob_format.expert_key(MODEL, 0, 1, "bf16")
    with ModelStore.open(root, ram_bytes=64 * MiB, stream_above_bytes=MiB) as store:
        with store.open_expert(MODEL, 0, 1, "bf16", chunk_bytes=MiB) as reader:
            assert isinstance(reader, NvmeRangeReader)
            assert b"".join(c[1] for c in reader) == small
        assert not store.tiered.memory.contains(key)  # streamed blobs are not promoted
        store.tiered.memory.put(key, small)
        with store.open_expert(MODEL, 0, 1, "bf16", offset=5, chunk_bytes=MiB) as reader:
            assert reader.source == "cached"
            assert b"".join(c[1] for c in reader) == small[5:]
        flipped = bytearray(small)
        flipped[100] ^= 1
        store.tiered.memory.put(key, bytes(flipped))
        with store.open_expert(MODEL, 0, 1, "bf16", chunk_bytes=MiB) as reader:
            assert reader.source == "nvme"
            assert b"".join(c[1] for c in reader) == small
        assert not store.tiered.memory.contains(key)
        assert store.tiered.totals()["corrupt_copies"] == 1


def test_nvme_reader_chunks_at_every_kind_of_offset(good):
    """In-process: chunk offsets, sizes and last flags from offsets on and off the 8 MiB read
    blocks and the 1 MiB chunks; the bytes are always blob[offset:]."""
    from expert_store.tiers.nvme import READ_BLOCK_BYTES

    root, data = good
    big = data["blobs"][0]
    B = READ_BLOCK_BYTES
    with ModelStore.open(root, ram_bytes=0, stream_above_bytes=MiB) as store:
        for offset in (0, 1, MiB - 1, B - 1, B, B + 1, 3 * B + MiB // 2, len(big) - 1, len(big)):
            with store.open_expert(MODEL, 0, 0, "bf16", offset=offset, chunk_bytes=MiB) as reader:
                pieces = list(reader)
            assert pieces[0][0] == offset
            assert [p[2] for p in pieces] == [False] * (len(pieces) - 1) + [True]
            assert all(len(p[1]) <= MiB for p in pieces)
            assert all(a[0] + len(a[1]) == b[0] for a, b in zip(pieces, pieces[1:]))
            assert b"".join(p[1] for p in pieces) == big[offset:], offset
        assert store.stats()["nvme"]["hits"] >= 9


def test_a_part_from_an_offset_hashes_nothing_until_it_reaches_the_end(good, monkeypatch):
    """In-process, an unchecked file: a part of the blob from an offset that stops before the
    end (a striped fetch's middle part, cancelled once its range is in) hashes nothing; the part
    that reaches the end hashes the whole file once, from byte 0, before its last chunk, and
    leaves the file checked, so later parts seek straight to their offsets."""
    import types

    from expert_store.tiers import nvme

    hashed: list[int] = []

    class CountingHash:
        def __init__(self) -> None:
            self.h = xxhash.xxh3_128()

        def update(self, data) -> None:
            hashed.append(len(data))
            self.h.update(data)

        def hexdigest(self) -> str:
            return self.h.hexdigest()

    monkeypatch.setattr(nvme, "xxhash", types.SimpleNamespace(xxh3_128=CountingHash))
    monkeypatch.setattr(nvme, "SETTLE_NS", 0)   # the fixture's files may be younger than the settle time
    root, data = good
    big = data["blobs"][0]
    with ModelStore.open(root, ram_bytes=0, stream_above_bytes=MiB) as store:
        with store.open_expert(MODEL, 0, 0, "bf16", offset=20 * MiB, chunk_bytes=MiB) as reader:
            assert not reader.trusted
            got = [next(reader) for _ in range(2)]
        assert b"".join(c[1] for c in got) == big[20 * MiB:22 * MiB] and sum(hashed) == 0
        with store.open_expert(MODEL, 0, 0, "bf16", offset=60 * MiB, chunk_bytes=MiB) as reader:
            pieces = list(reader)
        assert b"".join(p[1] for p in pieces) == big[60 * MiB:] and pieces[-1][2]
        assert sum(hashed) == len(big)
        with store.open_expert(MODEL, 0, 0, "bf16", offset=5, chunk_bytes=MiB) as reader:
            assert reader.trusted
            assert b"".join(p[1] for p in reader) == big[5:]
        assert sum(hashed) == len(big)
