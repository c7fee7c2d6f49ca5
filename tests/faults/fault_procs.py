"""Helpers for the fault tests: real `expert-store serve` / `moe-decoder serve` processes on
loopback (tests/service_procs.py), fixed ports so a killed server can come back
on the same address, Generate with retries, and leak checks.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import grpc
import psutil

from redis_server import free_port  # noqa: E402
from service_procs import ServiceProcess, cli, pack_tiny_model, wait_until  # noqa: E402,F401

from decoder._proto.adapmoe.v1 import decoder_pb2 as dpb  # noqa: E402
from decoder._proto.adapmoe.v1 import decoder_pb2_grpc as dpb_grpc  # noqa: E402

PROMPTS = ["Once upon a time", "The quick brown fox jumps over", "Hello, world!", "Numbers: 0 1 2 3",
           "def forward(x): return silu(x @ w1.T)", "A mixture of experts routes every token"]


def store_proc(store_dir: Path, *extra: str, port: int | None = None) -> ServiceProcess:
    """`expert-store serve` (RAM tier off, so every fetch reaches Redis/NVMe) on a fixed port."""
    return ServiceProcess(cli("expert-store") + ["serve", "--store", str(store_dir),
                                                 "--listen", f"127.0.0.1:{port or free_port()}",
                                                 "--ram-bytes", "0", "--grace", "1", *extra])


def decoder_proc(store_target: str, model: str, *extra: str, port: int | None = None,
                 metrics: bool = True) -> ServiceProcess:
    argv = cli("moe-decoder") + ["serve", "--store", store_target, "--model", model,
                                 "--listen", f"127.0.0.1:{port or free_port()}", "--drain", "0", "--grace", "2",
                                 "--store-deadline", "10", *extra]
    if metrics:
        argv += ["--metrics-port", "0"]
    return ServiceProcess(argv)


def slot_bytes(store_dir: Path, model: str) -> int:
    """GPU slot size of one expert of `model` (to give the decoder a cache that must refetch)."""
    from decoder import Engine

    with Engine.from_store(str(store_dir), model, gpu_cache_bytes=None, host_cache_bytes=0) as eng:
        return eng.provider.slot_bytes


def small_cache_args(store_dir: Path, model: str, layers: int) -> list[str]:
    """One GPU slot per layer (+2 scratch) and no host tier: experts are refetched all the time."""
    return ["--gpu-cache-bytes", str((layers + 2) * slot_bytes(store_dir, model)), "--host-cache-bytes", "0"]


def generate(stub: Any, timeout: float = 60.0, metadata: Any = None, on_delta: Callable | None = None,
             **req: Any) -> tuple[list[int], str, Any]:
    """Generate -> (token ids, text, usage)."""
    ids: list[int] = []
    text, usage = "", None
    for msg in stub.Generate(dpb.GenerateRequest(**req), timeout=timeout, metadata=metadata):
        if msg.HasField("delta"):
            ids += list(msg.delta.token_ids)
            text += msg.delta.text
            if on_delta is not None:
                on_delta(len(ids))
        else:
            usage = msg.usage
    assert usage is not None, "stream ended without a Usage message"
    return ids, text, usage


def generate_with_retry(address: str, deadline_s: float = 90.0, **req: Any) -> tuple[list[int], int]:
    """What a well-behaved client does while a decoder restarts: retry UNAVAILABLE (and a
    stream cut by the restart) with backoff until an overall deadline. -> (ids, attempts)."""
    end = time.monotonic() + deadline_s
    attempts, backoff = 0, 0.05
    while True:
        attempts += 1
        try:
            with grpc.insecure_channel(address) as ch:
                ids, _, _ = generate(dpb_grpc.DecoderStub(ch), timeout=max(1.0, min(30.0, end - time.monotonic())),
                                     **req)
                return ids, attempts
        except grpc.RpcError as e:
            if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) \
                    or time.monotonic() + backoff > end:
                raise
        time.sleep(backoff)
        backoff = min(0.5, backoff * 2)


def reference_tokens(store_dir: Path, model: str, prompts: list[str], max_tokens: int) -> dict[str, list[int]]:
    """Fault-free greedy tokens from an in-process Engine on the store directory."""
    from decoder import Engine

    with Engine.from_store(str(store_dir), model) as eng:
        return {p: eng.generate(p, max_tokens=max_tokens).token_ids for p in prompts}


def my_children() -> set[int]:
    """Live (non-zombie) child processes of this test process."""
    out = set()
    for c in psutil.Process().children(recursive=True):
        try:
            if c.status() != psutil.STATUS_ZOMBIE:
                out.add(c.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def decoder_stats(address: str) -> tuple[Any, dict]:
    import json

    with grpc.insecure_channel(address) as ch:
        s = dpb_grpc.DecoderStub(ch).GetStats(dpb.GetStatsRequest(), timeout=10)
    return s, json.loads(s.stats_json)


def child_env_with(**extra: str) -> dict[str, str]:
    """The environment server children run with (tests/service_procs.child_env) plus extra."""
    from service_procs import child_env

    env = child_env()
    env.update(extra)
    return env


def failover_warnings(records: Any) -> list[str]:
    """The store client's failover warnings among log records (caplog.records, with the
    expert_store.client logger at WARNING): one per transport failure (UNAVAILABLE, a broken
    stream), the only path on which a client call waits (a backoff sleep after each full round
    of replicas, rounds for RETRY_WINDOW_S). None: every replica asked answered, at once."""
    return [r.getMessage() for r in records if r.name == "expert_store.client"
            and r.getMessage().endswith(("; failing over", "; giving up"))]
