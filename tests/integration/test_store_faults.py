"""Faults with real processes: a replica SIGKILLed while a large blob streams from it (the
client finishes from the other replica, resuming, with identical bytes), and Redis stopped
mid-run (fetches keep succeeding from NVMe)."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import xxhash

from redis_server import free_port
from service_procs import StoreServerProcess

from expert_store import format as blob_format
from expert_store.client import StoreClient, rendezvous_order
from expert_store.quant import expert_to_blob
from expert_store.store import ModelStore

pytestmark = pytest.mark.timeout(240)
DEADLINE = 60.0


def build_store(root: Path, model: str, layers: int, experts: int, hidden: int, ffn: int,
                seed: int = 0) -> dict[tuple[int, int, str], bytes]:
    """A store holding random bf16 experts (written through ModelStore, as PutBlob would)."""
    store = ModelStore.open(root, ram_bytes=0)

    def put(kind: str, data: bytes, **ref) -> None:
        store.put_file(model, kind, data, xxhash.xxh3_128_hexdigest(data), **ref)

    put("config", json.dumps({"num_hidden_layers": layers, "num_local_experts": experts,
                              "hidden_size": hidden, "intermediate_size": ffn}).encode())
    g = torch.Generator().manual_seed(seed)
    blobs = {}
    for layer in range(layers):
        for expert in range(experts):
            w = {"w1": torch.randn(ffn, hidden, generator=g), "w3": torch.randn(ffn, hidden, generator=g),
                 "w2": torch.randn(hidden, ffn, generator=g)}
            blob = expert_to_blob(model, layer, expert, "bf16", w)
            put("expert", blob, layer=layer, expert=expert, precision="bf16")
            blobs[(layer, expert, "bf16")] = blob
    manifest = {"model": model, "num_layers": layers, "num_experts": experts, "precisions": ["bf16"],
                "blobs": [{"layer": l, "expert": e, "precision": p, "size": len(b), "xxh3": blob_format.blob_checksum(b)}
                          for (l, e, p), b in blobs.items()]}
    put("manifest", json.dumps(manifest).encode())
    store.close()
    return blobs


def served_bytes(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    m = re.search(r'^adapmoe_store_bytes_served_total\{method="FetchExperts"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_replica_killed_mid_stream_client_finishes_from_another(tmp_path):
    blob = build_store(tmp_path / "store", "big", 1, 1, hidden=2048, ffn=3072)[(0, 0, "bf16")]
    assert len(blob) > 24 << 20  # a large fetch: ~31 MB, 30+ chunks
    ports = [free_port(), free_port()]
    replicas = [StoreServerProcess(tmp_path / "store", "--ram-bytes", "0", "--metrics-port", str(p),
                                   log_dir=tmp_path).start() for p in ports]
    try:
        key = blob_format.expert_key("big", 0, 0, "bf16")
        owner_address = rendezvous_order(key, [r.address for r in replicas])[0]
        owner = next(r for r in replicas if r.address == owner_address)
        other = next(r for r in replicas if r is not owner)
        other_metrics = ports[replicas.index(other)]

        buf = bytearray(len(blob))
        outcome: dict = {}
        with StoreClient.open(",".join(r.address for r in replicas), max_streams=1, deadline_s=DEADLINE) as client:
            def fetch():
                try:
                    outcome["view"] = client.fetch_expert("big", 0, 0, "bf16", out=buf)
                except BaseException as e:  # reported below
                    outcome["error"] = e

            worker = threading.Thread(target=fetch)
            worker.start()
            t_end = time.monotonic() + 30
            while bytes(buf[:8]) != blob_format.MAGIC and time.monotonic() < t_end and worker.is_alive():
                time.sleep(0.0005)
            assert bytes(buf[:8]) == blob_format.MAGIC, "the owner never started streaming"
            owner.kill()  # SIGKILL while the blob streams
            partial = bytes(buf[-(1 << 20):]) != blob[-(1 << 20):]
            worker.join(DEADLINE)
            assert not worker.is_alive()
            assert "error" not in outcome, outcome.get("error")
        assert partial, "the owner finished before it was killed: nothing was tested"
        assert bytes(outcome["view"]) == blob and bytes(buf) == blob  # identical bytes
        # the other replica served only the rest: the client resumed, it did not start over
        rest = served_bytes(other_metrics)
        assert 0 < rest < len(blob)
    finally:
        for r in replicas:
            r.kill()


def test_redis_stopped_mid_run_fetches_keep_succeeding_from_nvme(tmp_path, redis_server):
    blobs = build_store(tmp_path / "store", "small", 2, 4, hidden=128, ffn=256, seed=1)
    refs = sorted(blobs)
    with StoreServerProcess(tmp_path / "store", "--redis", redis_server.url, "--ram-bytes", "0",
                            log_dir=tmp_path) as srv, \
            StoreClient.open(srv.address, deadline_s=DEADLINE) as client:

        def fetch_all_and_compare() -> float:
            t0 = time.monotonic()
            got = dict(client.fetch_experts("small", refs))
            assert {r: bytes(b) for r, b in got.items()} == blobs
            for r in refs[:2]:
                assert bytes(client.fetch_expert("small", *r)) == blobs[r]
            return time.monotonic() - t0

        def tiers() -> dict:
            return next(iter(client.stat().values()))["tiers"]

        fetch_all_and_compare()  # NVMe -> promoted into Redis
        fetch_all_and_compare()
        before = tiers()
        assert before["redis"]["hits"] >= len(refs)  # Redis answered the second pass
        assert redis_server.client().dbsize() > 0

        redis_server.stop()
        elapsed = fetch_all_and_compare()  # Redis gone: a miss, not a failure
        assert elapsed < 20, f"fetches stalled {elapsed:.1f}s on the dead Redis"
        during = tiers()
        assert during["nvme"]["hits"] >= before["nvme"]["hits"] + len(refs)
        assert during["redis"]["hits"] == before["redis"]["hits"]
        assert "redis" in srv.log().lower()  # the warning was logged

        redis_server.start()  # back, empty: fetches succeed, and once the tier's retry
        t_end = time.monotonic() + 15  # backoff (1 s) has passed, it is refilled and used again
        while tiers()["redis"]["hits"] == during["redis"]["hits"] and time.monotonic() < t_end:
            fetch_all_and_compare()
            time.sleep(0.2)
        assert tiers()["redis"]["hits"] > during["redis"]["hits"]
