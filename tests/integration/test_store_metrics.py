"""The store's Prometheus metrics from a real `expert-store serve` process: an RPC latency
histogram by method and status, and tier hit/miss counters that follow the tiers' own counts
(as the Stat RPC reports them), with one worker and with two (multiprocess mode sums them)."""

from __future__ import annotations

import random
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from checkpoints import make_packed_store
from redis_server import free_port
from service_procs import StoreServerProcess

from expert_store.client import StoreClient
from expert_store.errors import NotFound

pytestmark = pytest.mark.timeout(240)
MODEL, LAYERS, EXPERTS = "tiny", 2, 4


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("store-metrics")
    return make_packed_store(root, model=MODEL, precisions=("bf16", "int8"), layers=LAYERS, experts=EXPERTS, seed=5)


def scrape(port: int) -> dict[str, dict]:
    """{family name: {"type": ..., "samples": [(name, labels, value)]}} from /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {f.name: {"type": f.type, "samples": [(s.name, s.labels, s.value) for s in f.samples]}
            for f in text_string_to_metric_families(text)}


def sample(families: dict, family: str, name: str, **labels: str) -> float:
    values = [v for n, lab, v in families[family]["samples"] if n == name and all(lab.get(k) == x for k, x in labels.items())]
    return sum(values)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_rpc_latency_histograms_and_tier_counters(store_dir, tmp_path, workers):
    rng = random.Random(17)
    port = free_port()
    with StoreServerProcess(store_dir, "--workers", workers, "--ram-bytes", "64M", "--metrics-port", str(port),
                            log_dir=tmp_path) as srv:
        fetches = 0
        for _ in range(3):  # separate clients: with 2 workers, the kernel spreads the connections
            with StoreClient.open(srv.address, deadline_s=20.0) as c:
                for _ in range(4):
                    c.fetch_expert(MODEL, rng.randrange(LAYERS), rng.randrange(EXPERTS), rng.choice(["bf16", "int8"]))
                    fetches += 1
                with pytest.raises(NotFound):
                    c.fetch_expert("no-such-model", 0, 0, "bf16")
        m = scrape(port)

        hist = m["adapmoe_store_rpc_seconds"]
        assert hist["type"] == "histogram"
        ok = dict(method="FetchExperts", status="OK")
        assert sample(m, "adapmoe_store_rpc_seconds", "adapmoe_store_rpc_seconds_count", **ok) == fetches
        assert sample(m, "adapmoe_store_requests", "adapmoe_store_requests_total", **ok) == fetches
        assert sample(m, "adapmoe_store_rpc_seconds", "adapmoe_store_rpc_seconds_bucket", le="+Inf", **ok) == fetches
        assert sample(m, "adapmoe_store_rpc_seconds", "adapmoe_store_rpc_seconds_sum", **ok) > 0
        failed = [lab for n, lab, v in hist["samples"] if n.endswith("_count") and lab["status"] == "NOT_FOUND" and v]
        assert failed and all(lab["method"] in ("GetManifest", "FetchExperts") for lab in failed)
        # buckets are cumulative
        buckets = sorted(((float(lab["le"]), v) for n, lab, v in hist["samples"]
                          if n.endswith("_bucket") and lab["method"] == "FetchExperts" and lab["status"] == "OK"))
        assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))

        for family in ("adapmoe_store_tier_hits", "adapmoe_store_tier_misses"):
            assert m[family]["type"] == "counter"
        hits = {lab["tier"]: v for n, lab, v in m["adapmoe_store_tier_hits"]["samples"] if n.endswith("_total")}
        misses = {lab["tier"]: v for n, lab, v in m["adapmoe_store_tier_misses"]["samples"] if n.endswith("_total")}
        assert sum(hits.values()) >= fetches  # every fetched blob was answered by some tier
        if workers == "1":  # one process: the counters are exactly the tiers' counts that Stat reports
            with StoreClient.open(srv.address, deadline_s=20.0) as c:
                tiers = next(iter(c.stat().values()))["tiers"]
            after = scrape(port)
            for tier, s in tiers.items():
                assert sample(after, "adapmoe_store_tier_hits", "adapmoe_store_tier_hits_total", tier=tier) \
                    == s["hits"], tier
                assert sample(after, "adapmoe_store_tier_misses", "adapmoe_store_tier_misses_total", tier=tier) \
                    == s["misses"], tier
            assert hits and misses
