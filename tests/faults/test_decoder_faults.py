"""Client-side faults against `moe-decoder serve`: cancellations and deadlines in the middle
of generations while experts stream from a slow store, and the decoder SIGKILLed and
restarted while clients retry.

Every request either finishes with tokens identical to a fault-free greedy run or ends with
the status its client caused (CANCELLED, DEADLINE_EXCEEDED); the rows it held are freed,
its neighbours in the batch are unaffected, and no thread or process is left behind.
(tests/integration/test_decoder_service.py covers one cancel and one deadline on an idle
service, and SIGTERM draining.)
"""

from __future__ import annotations

import json
import random
import threading

import grpc
import psutil
import pytest

from fault_procs import (PROMPTS, decoder_proc, decoder_stats, free_port, generate, generate_with_retry,
                         my_children, pack_tiny_model, reference_tokens, small_cache_args, store_proc, wait_until)

from decoder._proto.adapmoe.v1 import decoder_pb2 as dpb
from decoder._proto.adapmoe.v1 import decoder_pb2_grpc as dpb_grpc

pytestmark = pytest.mark.timeout(170)
MODEL, LAYERS, MAX_TOKENS = "tiny", 2, 24


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return pack_tiny_model(tmp_path_factory.mktemp("decoder-faults"), MODEL, layers=LAYERS)


@pytest.fixture(scope="module")
def reference(store_dir):
    return reference_tokens(store_dir, MODEL, PROMPTS, MAX_TOKENS)


def test_cancels_and_deadlines_mid_generation_leave_the_batch_intact(store_dir, reference):
    children_before = my_children()
    rng = random.Random(11)
    # 20 ms per expert blob: cancellations and deadlines hit while a step waits on the store
    with store_proc(store_dir, "--inject-latency-ms", "20") as store, \
            decoder_proc(store.address, MODEL, "--max-active", "4", "--max-queue", "8",
                         *small_cache_args(store_dir, MODEL, LAYERS)) as dec, \
            grpc.insecure_channel(dec.address) as ch:
        stub = dpb_grpc.DecoderStub(ch)
        proc = psutil.Process(dec.proc.pid)
        generate(stub, prompt=PROMPTS[0], max_tokens=2)  # warm
        threads_before = proc.num_threads()
        sched0 = json.loads(decoder_stats(dec.address)[0].scheduler_json)
        outcome: dict[str, list] = {"ok": [], "cancelled": [], "deadline": [], "unexpected": []}
        lock = threading.Lock()

        def normal(prompt: str) -> None:
            try:
                ids, _, _ = generate(stub, timeout=90, prompt=prompt, max_tokens=MAX_TOKENS)
                with lock:
                    outcome["ok"].append((prompt, ids))
            except grpc.RpcError as e:
                outcome["unexpected"].append(f"{e.code().name}: {e.details()}")

        def cancelling(prompt: str, after: int) -> None:
            call = stub.Generate(dpb.GenerateRequest(prompt=prompt, max_tokens=400),
                                 timeout=90)
            got = 0
            try:
                for msg in call:
                    got += len(msg.delta.token_ids)
                    if got >= after:
                        call.cancel()
            except grpc.RpcError as e:
                with lock:
                    (outcome["cancelled"] if e.code() == grpc.StatusCode.CANCELLED
                     else outcome["unexpected"]).append(e.code().name)
                return
            outcome["unexpected"].append("a cancelled stream finished normally")

        def deadline(prompt: str, seconds: float) -> None:
            try:
                generate(stub, timeout=seconds, prompt=prompt, max_tokens=400)
                outcome["unexpected"].append("400 tokens within the deadline")
            except grpc.RpcError as e:
                with lock:
                    (outcome["deadline"] if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                     else outcome["unexpected"]).append(e.code().name)

        jobs = [threading.Thread(target=normal, args=(p,)) for p in PROMPTS[:4]]
        jobs += [threading.Thread(target=cancelling, args=(PROMPTS[4 + i % 2], rng.randint(1, 6))) for i in range(3)]
        jobs += [threading.Thread(target=deadline, args=(PROMPTS[i % 6], rng.uniform(0.6, 1.5))) for i in range(3)]
        rng.shuffle(jobs)
        for t in jobs:
            t.start()
        for t in jobs:
            t.join(120)
        assert not any(t.is_alive() for t in jobs)
        assert not outcome["unexpected"], outcome["unexpected"]
        assert len(outcome["cancelled"]) == 3 and len(outcome["deadline"]) == 3
        assert len(outcome["ok"]) == 4
        for prompt, ids in outcome["ok"]:
            assert ids == reference[prompt], f"{prompt!r}: differs from the fault-free run"

        # every row freed, the scheduler counted what happened, and the service goes on
        assert wait_until(lambda: decoder_stats(dec.address)[0].active == 0
                          and decoder_stats(dec.address)[0].queued == 0, 10)
        sched = json.loads(decoder_stats(dec.address)[0].scheduler_json)
        assert sched["cancelled"] + sched["expired"] - sched0["cancelled"] - sched0["expired"] >= 6
        ids, _, _ = generate(stub, prompt=PROMPTS[5], max_tokens=MAX_TOKENS)
        assert ids == reference[PROMPTS[5]]
        assert wait_until(lambda: proc.num_threads() <= threads_before + 4, 10), \
            f"decoder threads grew from {threads_before} to {proc.num_threads()}"
    assert wait_until(lambda: my_children() <= children_before, 10)


def test_decoder_killed_and_restarted_while_clients_retry(store_dir, reference):
    children_before = my_children()
    port = free_port()
    with store_proc(store_dir) as store:
        dec = decoder_proc(store.address, MODEL, "--max-active", "2", port=port, metrics=False).start()
        address = dec.address
        results: list[tuple[str, list[int], int]] = []
        errors: list[str] = []
        started = threading.Barrier(4)

        def client(i: int) -> None:
            started.wait()
            for j in range(3):
                prompt = PROMPTS[(i + j) % len(PROMPTS)]
                try:
                    ids, attempts = generate_with_retry(address, deadline_s=120, prompt=prompt, max_tokens=MAX_TOKENS)
                    results.append((prompt, ids, attempts))
                except grpc.RpcError as e:
                    errors.append(f"{e.code().name}: {e.details()}")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        try:
            started.wait()
            assert wait_until(lambda: decoder_stats(address)[0].active > 0, 30, interval=0.005)
            dec.proc.kill()                      # SIGKILL with requests in flight
            dec.proc.wait(10)
            dec.proc = None
            dec = decoder_proc(store.address, MODEL, "--max-active", "2", port=port, metrics=False).start()
            for t in threads:
                t.join(150)
            assert not any(t.is_alive() for t in threads)
        finally:
            dec.stop()
    assert not errors, errors
    assert len(results) == 9
    for prompt, ids, _ in results:
        assert ids == reference[prompt], f"{prompt!r}: differs from the fault-free run"
    assert any(attempts > 1 for _, _, attempts in results), "no request saw the restart"
    assert wait_until(lambda: my_children() <= children_before, 10)
