"""Prometheus metrics of `moe-decoder serve` (one registry per process, served on
--metrics-port and on the HTTP API's /metrics): requests and latency by final status, time to
first token, tokens, batch sizes and step times, queue depth and active sequences from the
scheduler, and the engine's cache/routing figures read from engine.stats() at scrape time."""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from typing import Any, Callable

from decoder.batching import BatchScheduler

log = logging.getLogger("decoder.metrics")


class DecoderMetrics:
    """Prometheus metrics of one decoder process (own registry; a no-op when disabled).
    Engine figures (cache tiers, bytes, routing) are read from engine.stats() at scrape time."""

    def __init__(self, enabled: bool, scheduler: BatchScheduler | None = None, window_s: float = 10.0) -> None:
        self.enabled = enabled
        self.window_s = window_s
        self._steps: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        if not enabled:
            return
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        lat = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
        self.requests = Counter("adapmoe_decoder_requests", "Generate requests by final status", ["status"],
                                registry=r)
        self.latency = Histogram("adapmoe_decoder_request_seconds", "Generate latency by final status",
                                 ["status"], buckets=lat, registry=r)
        self.first_token = Histogram("adapmoe_decoder_time_to_first_token_seconds",
                                     "request received -> first token", buckets=lat, registry=r)
        self.generated = Counter("adapmoe_decoder_generated_tokens", "tokens generated", registry=r)
        self.prompt = Counter("adapmoe_decoder_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.batch = Histogram("adapmoe_decoder_batch_size", "sequences per decode step",
                               buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.step = Histogram("adapmoe_decoder_step_seconds", "duration of one decode step",
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
                              registry=r)
        tps = Gauge("adapmoe_decoder_tokens_per_second", f"decode throughput over the last {window_s:g}s",
                    registry=r)
        tps.set_function(self.tokens_per_s)
        self.model_loaded = Gauge("adapmoe_decoder_model_loaded",
                                  "1 once the model is loaded and Generate is served (0: waiting for it)",
                                  registry=r)
        if scheduler is not None:
            self.bind(scheduler)

    def bind(self, scheduler: BatchScheduler) -> None:
        """The scheduler's gauges and the engine's figures (for a model loaded after the
        metrics endpoint started: --wait-for-model)."""
        if not self.enabled:
            return
        from prometheus_client import Gauge

        r = self.registry
        Gauge("adapmoe_decoder_queue_depth", "sequences waiting for a batch slot",
              registry=r).set_function(lambda: scheduler.queued)
        Gauge("adapmoe_decoder_active_sequences", "sequences being decoded",
              registry=r).set_function(lambda: scheduler.active)
        Gauge("adapmoe_decoder_max_active", "--max-active", registry=r).set(scheduler.max_active)
        Gauge("adapmoe_decoder_max_queue", "--max-queue", registry=r).set(scheduler.max_queue)
        r.register(EngineStatsCollector(scheduler.engine_stats))
        self.model_loaded.set(1)

    def on_step(self, batch: int, seconds: float) -> None:
        now = time.monotonic()
        with self._lock:
            self._steps.append((now, batch))
            while self._steps and now - self._steps[0][0] > self.window_s:
                self._steps.popleft()
        if self.enabled:
            self.batch.observe(batch)
            self.step.observe(seconds)

    def tokens_per_s(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._steps and now - self._steps[0][0] > self.window_s:
                self._steps.popleft()
            return sum(b for _, b in self._steps) / self.window_s

    def request(self, status: str, seconds: float, prompt_tokens: int = 0, tokens: int = 0,
                first_token_s: float | None = None) -> None:
        if not self.enabled:
            return
        self.requests.labels(status).inc()
        self.latency.labels(status).observe(seconds)
        if tokens:
            self.generated.inc(tokens)
        if prompt_tokens:
            self.prompt.inc(prompt_tokens)
        if first_token_s is not None:
            self.first_token.observe(first_token_s)

    def serve_http(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint; returns the bound port (port 0 allowed)."""
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return server.server_port

    def close(self) -> None:
        http = getattr(self, "_http", None)
        if http is not None:
            http.shutdown()
            http.server_close()


class EngineStatsCollector:
    """engine.stats() as gauges, at scrape time: per expert-cache tier hits, misses, hit rate and
    bytes; bytes fetched from the store; experts per token; single-expert ratio; stall time."""

    TIER_FIELDS = ("hits", "misses", "lookups", "loads", "bytes", "hit_rate")

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def describe(self):  # no eager collect at registration
        return []

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        try:
            s = self._stats()
        except Exception:  # a scrape must not fail because the engine is closing
            log.debug("engine.stats() failed during a scrape", exc_info=True)
            return
        tiers = s.get("tiers") or {}
        for f in self.TIER_FIELDS:
            name = {"bytes": "adapmoe_decoder_cache_tier_bytes", "hit_rate": "adapmoe_decoder_cache_hit_rate"}.get(
                f, f"adapmoe_decoder_cache_tier_{f}")
            g = GaugeMetricFamily(name, f"expert cache {f.replace('_', ' ')} per tier (engine.stats())",
                                  labels=["tier"])
            any_value = False
            for tier, t in tiers.items():
                v = t.get(f) if isinstance(t, dict) else None
                if isinstance(v, (int, float)) and math.isfinite(v):
                    g.add_metric([str(tier)], float(v))
                    any_value = True
            if any_value:
                yield g
        per_token = (s.get("provider") or {}).get("bytes_per_token")
        if isinstance(per_token, dict):
            g = GaugeMetricFamily("adapmoe_decoder_tier_bytes_per_token", "bytes moved per token per tier",
                                  labels=["tier"])
            for tier, v in per_token.items():
                if isinstance(v, (int, float)):
                    g.add_metric([str(tier)], float(v))
            yield g
        for key, name, doc in (
                ("bytes_fetched", "adapmoe_decoder_store_bytes_fetched", "expert bytes fetched from the store"),
                ("fetches", "adapmoe_decoder_store_fetches", "expert blobs fetched from the store"),
                ("stall_s", "adapmoe_decoder_stall_seconds", "time compute waited for experts"),
                ("tokens_per_s", "adapmoe_decoder_engine_decode_tokens_per_second",
                 "engine decode throughput since start"),
                ("generated_tokens", "adapmoe_decoder_engine_generated_tokens", "tokens generated by the engine")):
            v = s.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                yield GaugeMetricFamily(name, doc, value=float(v))
        # routing of decode steps (prefill is a burst of one request's prompt)
        decode = (s.get("routing") or {}).get("decode") or {}
        for key, name, doc in (
                ("experts_per_token", "adapmoe_decoder_experts_per_token", "experts per token and layer (decode)"),
                ("single_expert_ratio", "adapmoe_decoder_single_expert_ratio", "share of top-1 decisions (decode)")):
            v = decode.get(key)
            if decode.get("decisions") and isinstance(v, (int, float)) and math.isfinite(v):
                yield GaugeMetricFamily(name, doc, value=float(v))

