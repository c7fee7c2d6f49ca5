"""Faults under a decoding service: store replicas SIGKILLed and restarted while
`moe-decoder serve` generates, and Redis SIGKILLed and restarted under concurrent load.

The promise: no request fails, every greedy output is identical to a fault-free in-process
run, the Redis tier fills again once Redis is back, and nothing is left running afterwards.
(tests/integration/test_store_faults.py covers the same faults one level down: a single
StoreClient fetch resuming on another replica, and fetches while Redis is stopped.)
"""

from __future__ import annotations

import threading

import grpc
import psutil
import pytest

from fault_procs import (PROMPTS, decoder_proc, decoder_stats, free_port, generate, my_children, pack_tiny_model,
                         reference_tokens, small_cache_args, store_proc, wait_until)

from decoder._proto.adapmoe.v1 import decoder_pb2_grpc as dpb_grpc
from expert_store.client import StoreClient

pytestmark = pytest.mark.timeout(150)
MODEL, LAYERS, MAX_TOKENS = "tiny", 2, 40


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return pack_tiny_model(tmp_path_factory.mktemp("faults"), MODEL, layers=LAYERS)


@pytest.fixture(scope="module")
def reference(store_dir):
    return reference_tokens(store_dir, MODEL, PROMPTS, MAX_TOKENS)


class Load:
    """`clients` threads sending Generate back to back (cycling PROMPTS) until stop(); every
    result is checked against the reference; every failure is kept."""

    def __init__(self, address: str, reference: dict, clients: int = 2) -> None:
        self.address, self.reference = address, reference
        self.tokens = 0          # tokens received so far, all clients
        self.in_flight = 0       # requests that have received tokens but not finished
        self.done = 0
        self.mismatches: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        with grpc.insecure_channel(self.address) as ch:
            stub = dpb_grpc.DecoderStub(ch)
            n = i
            while not self._stop.is_set():
                prompt = PROMPTS[n % len(PROMPTS)]
                n += 1
                seen = [0]

                def on_delta(total: int) -> None:
                    with self._lock:
                        if seen[0] == 0:
                            self.in_flight += 1
                        self.tokens += total - seen[0]
                        seen[0] = total

                try:
                    ids, _, usage = generate(stub, timeout=60, prompt=prompt, max_tokens=MAX_TOKENS, on_delta=on_delta)
                    if ids != self.reference[prompt]:
                        self.mismatches.append(prompt)
                    with self._lock:
                        self.done += 1
                except grpc.RpcError as e:
                    self.errors.append(f"{e.code().name}: {e.details()}")
                finally:
                    with self._lock:
                        if seen[0]:
                            self.in_flight -= 1

    def start(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def wait_tokens(self, more: int, timeout: float = 60.0) -> None:
        target = self.tokens + more
        assert wait_until(lambda: self.tokens >= target or bool(self.errors), timeout), \
            f"decoding stalled at {self.tokens} tokens"
        assert not self.errors, self.errors

    def wait_mid_stream(self, timeout: float = 30.0) -> None:
        assert wait_until(lambda: self.in_flight > 0, timeout, interval=0.002)

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(90)
        assert not any(t.is_alive() for t in self.threads)


def test_replicas_killed_mid_stream_and_restarted_while_decoding(store_dir, reference):
    children_before = my_children()
    ports = [free_port(), free_port()]
    # 10 ms per blob: a kill lands while fetch streams are open
    replicas = [store_proc(store_dir, "--inject-latency-ms", "10", port=p).start() for p in ports]
    target = ",".join(r.address for r in replicas)
    dec = decoder_proc(target, MODEL, "--max-active", "2", *small_cache_args(store_dir, MODEL, LAYERS)).start()
    load = None
    try:
        threads_before = psutil.Process(dec.proc.pid).num_threads()
        fetched0 = decoder_stats(dec.address)[1]["bytes_fetched"]
        load = Load(dec.address, reference).start()
        load.wait_tokens(20)
        for victim in (0, 1):  # the second kill leaves only the restarted replica
            load.wait_mid_stream()
            pid = replicas[victim].proc.pid
            replicas[victim].proc.kill()            # SIGKILL, mid-generation
            replicas[victim].proc.wait(10)
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            load.wait_tokens(2 * MAX_TOKENS)        # decoding goes on, on the other replica
            replicas[victim] = store_proc(store_dir, "--inject-latency-ms", "10", port=ports[victim]).start()
            load.wait_tokens(MAX_TOKENS)            # and on the restarted one, same address
        load.stop()
        assert not load.errors, load.errors
        assert not load.mismatches, f"outputs differ from the fault-free run: {load.mismatches}"
        assert load.done >= 4
        stats = decoder_stats(dec.address)[1]
        assert stats["bytes_fetched"] > fetched0          # the experts really streamed throughout
        assert "failing over" in dec.stderr_text()          # and the client did fail over
        # every request finished: no row held, no thread piling up in the decoder
        s, _ = decoder_stats(dec.address)
        assert s.active == 0 and s.queued == 0
        assert psutil.Process(dec.proc.pid).num_threads() <= threads_before + 8
    finally:
        if load is not None:
            load._stop.set()
        dec.stop()
        for r in replicas:
            r.stop()
    assert wait_until(lambda: my_children() <= children_before, 10), "a server process outlived the test"


def test_redis_killed_and_restarted_under_load(store_dir, reference, redis_server):
    children_before = my_children()
    store = store_proc(store_dir, "--redis", redis_server.url).start()
    dec = decoder_proc(store.address, MODEL, "--max-active", "4", *small_cache_args(store_dir, MODEL, LAYERS)).start()
    load = None
    try:
        with StoreClient.open(store.address, deadline_s=10) as admin:
            def redis_hits() -> int:
                return next(iter(admin.stat().values()))["tiers"]["redis"]["hits"]

            load = Load(dec.address, reference, clients=3).start()
            load.wait_tokens(60)
            assert wait_until(lambda: redis_hits() > 0, 20), "Redis never served a blob before the fault"
            assert redis_server.client().dbsize() > 0
            load.wait_mid_stream()
            redis_server.kill()                       # SIGKILL under load
            load.wait_tokens(2 * MAX_TOKENS)          # served from NVMe meanwhile
            hits_while_down = redis_hits()
            load.wait_tokens(MAX_TOKENS)
            assert redis_hits() == hits_while_down
            redis_server.start()                      # back, empty
            # the tier repopulates (after its retry back-off) and answers again
            assert wait_until(lambda: redis_server.client().dbsize() > 0 and redis_hits() > hits_while_down, 30), \
                "the Redis tier did not repopulate"
            load.wait_tokens(MAX_TOKENS)
            load.stop()
        assert not load.errors, f"requests failed while Redis was down: {load.errors}"
        assert not load.mismatches, load.mismatches
        assert "redis" in store.stderr_text().lower()  # the outage was logged (rate-limited)
    finally:
        if load is not None:
            load._stop.set()
        dec.stop()
        store.stop()
    assert wait_until(lambda: my_children() - children_before <= {redis_server.proc.pid} if redis_server.proc
                      else my_children() <= children_before, 10)
