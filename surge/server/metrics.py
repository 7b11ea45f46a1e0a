"""Prometheus metrics (prometheus-client), all named surge_*.

Per-request measurements (latency, TTFT, TPOT, status) are observed by the server as requests
finish; engine-wide state (running, waiting, KV usage, prefix-cache hit rate, token and
preemption counts) is read from the engine's stats snapshot at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from surge.engine.llm_engine import EngineStats

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats | None], model: str):
        self.stats = stats
        self.model = model

    def collect(self) -> Iterator:
        s = self.stats()
        if s is None:
            return
        labels = ["model"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric([self.model], value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric([self.model], value)
            return c

        yield gauge("surge_num_requests_running", "Requests being computed", s.num_running)
        yield gauge("surge_num_requests_waiting", "Requests waiting for a slot", s.num_waiting)
        yield gauge("surge_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", s.kv_cache_usage)
        yield gauge("surge_kv_cache_blocks_total", "KV-cache blocks", s.kv_blocks_total)
        yield gauge("surge_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / looked up",
                    s.prefix_cache_hit_rate)
        yield counter("surge_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                      s.prefix_cache_queries)
        yield counter("surge_prefix_cache_hits", "Prompt tokens found in the prefix cache", s.prefix_cache_hits)
        yield counter("surge_num_preemptions", "Requests preempted for lack of KV blocks", s.num_preemptions)
        yield counter("surge_prompt_tokens", "Prompt tokens of admitted requests", s.prompt_tokens)
        yield counter("surge_generation_tokens", "Generated tokens", s.generation_tokens)


class ServerMetrics:
    def __init__(self, model: str, stats: Callable[[], EngineStats | None]):
        self.model = model
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "surge_requests", "HTTP requests by endpoint and status code", ["model", "endpoint", "status"],
            registry=self.registry,
        )
        self.finished = Counter(
            "surge_request_finish", "Finished completions by finish reason", ["model", "reason"],
            registry=self.registry,
        )
        self.e2e = Histogram("surge_e2e_request_latency_seconds", "End-to-end request latency", ["model"],
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("surge_time_to_first_token_seconds", "Time to first token", ["model"],
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram("surge_time_per_output_token_seconds", "Time per output token after the first",
                              ["model"], buckets=TPOT_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(stats, model))

    def record_status(self, endpoint: str, status: int) -> None:
        self.requests.labels(self.model, endpoint, str(status)).inc()

    def record_request(self, start: float, first_token: float | None, end: float, num_tokens: int) -> None:
        self.e2e.labels(self.model).observe(end - start)
        if first_token is not None:
            self.ttft.labels(self.model).observe(first_token - start)
            if num_tokens > 1:
                self.tpot.labels(self.model).observe((end - first_token) / (num_tokens - 1))

    def record_finish(self, reason: str | None) -> None:
        self.finished.labels(self.model, reason or "unknown").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
