"""The decoder service under 4x overload (CI-sized): a real store and decoder on loopback,
`benchmarks/load_test.py` as the load generator.

With --max-active 2 --max-queue 2 the service holds at most 4 requests; 16 closed-loop
clients offer 4x that. Every request must be answered with success or RESOURCE_EXHAUSTED
(refusals right away, never a timeout or an internal error), the service must keep serving
correct results afterwards, and its resident memory must return to near its warmed-up
baseline (rejected and finished requests leave nothing behind).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from decoder._proto.adapmoe.v1 import decoder_pb2 as pb
from decoder._proto.adapmoe.v1 import decoder_pb2_grpc as pb_grpc
from service_procs import ROOT, ServiceProcess, pack_tiny_model, wait_until

pytestmark = pytest.mark.timeout(240)

MAX_ACTIVE, MAX_QUEUE = 2, 2
CLIENTS = 4 * (MAX_ACTIVE + MAX_QUEUE)
MiB = 1 << 20


def load_test_module():
    spec = importlib.util.spec_from_file_location("load_test", ROOT / "benchmarks" / "load_test.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["load_test"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def generate(stub, prompt: str, max_tokens: int) -> list[int]:
    ids = []
    for msg in stub.Generate(pb.GenerateRequest(prompt=prompt, max_tokens=max_tokens), timeout=60):
        if msg.HasField("delta"):
            ids += msg.delta.token_ids
    return ids


def test_four_times_overload_is_refused_cleanly_and_leaves_nothing_behind(tmp_path):
    lt = load_test_module()
    store_dir = pack_tiny_model(tmp_path, "tiny", max_position_embeddings=256)
    with ServiceProcess.expert_store(store_dir) as store, \
            ServiceProcess.decoder(store.address, "tiny", "--max-active", str(MAX_ACTIVE),
                                   "--max-queue", str(MAX_QUEUE)) as dec, \
            grpc.insecure_channel(dec.address) as ch:
        stub = pb_grpc.DecoderStub(ch)
        prompt = lt.DEFAULT_PROMPT
        reference = generate(stub, prompt, 16)
        # warm up at full capacity: every expert fetched, every row and code path used once
        warm = lt.run_load(lt.LoadSpec(kind="decoder", target=dec.address, clients=MAX_ACTIVE + MAX_QUEUE,
                                       seconds=1.5, max_tokens=16, deadline_s=30))
        assert warm["ok"] > 0
        assert wait_until(lambda: stub.GetStats(pb.GetStatsRequest(), timeout=5).active == 0, 10)
        time.sleep(0.5)
        baseline = dec.rss()
        sched_before = json.loads(stub.GetStats(pb.GetStatsRequest(), timeout=5).scheduler_json)

        result = lt.run_load(lt.LoadSpec(kind="decoder", target=dec.address, clients=CLIENTS, seconds=4.0,
                                         max_tokens=16, deadline_s=30, backoff_ms=20))
        print(lt.format_summary(result))
        assert set(result["statuses"]) <= {"OK", "RESOURCE_EXHAUSTED"}, result["statuses"]
        assert result["ok"] >= MAX_ACTIVE and result["statuses"].get("RESOURCE_EXHAUSTED", 0) > 0
        # refusals come at once, not after queueing: each one the client saw is the scheduler's
        # admission check saying no (the queue was full when the request arrived), and no queued
        # request was dropped for its deadline
        sched = json.loads(stub.GetStats(pb.GetStatsRequest(), timeout=5).scheduler_json)
        assert sched["rejected"] - sched_before["rejected"] == result["statuses"]["RESOURCE_EXHAUSTED"]
        assert sched["expired"] == sched_before["expired"]

        # keeps serving, correctly
        assert wait_until(lambda: (lambda s: s.active == 0 and s.queued == 0)(
            stub.GetStats(pb.GetStatsRequest(), timeout=5)), 10)
        assert generate(stub, prompt, 16) == reference
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        # memory back to (near) the warmed-up baseline
        time.sleep(0.5)
        after = dec.rss()
        print(f"rss baseline {baseline / MiB:.1f} MiB, after overload {after / MiB:.1f} MiB")
        assert after <= baseline + max(24 * MiB, baseline // 10), (baseline, after)
