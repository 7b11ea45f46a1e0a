"""Prometheus metrics (prometheus-client), all named surge_*.

Per-request measurements (latency, TTFT, TPOT, status) are observed by the server as requests
finish; engine-wide state (running, waiting, KV usage, prefix-cache hit rate, token and
preemption counts) is read from the engine's stats snapshot at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from surge.engine.data_parallel import ReplicaReport
from surge.engine.llm_engine import EngineStats

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
QUEUE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _EngineCollector(Collector):
    """Engine state of every loaded deployment, read at scrape time, labelled by model and version."""

    def __init__(self, deployments: Callable[[], list[tuple[str, str, EngineStats]]]):
        self.deployments = deployments

    def collect(self) -> Iterator:
        rows = self.deployments()
        labels = ["model", "version"]

        def family(kind: type, name: str, doc: str, value: Callable[[EngineStats], float]) -> Any:
            metric = kind(name, doc, labels=labels)
            for model, version, stats in rows:
                metric.add_metric([model, version], value(stats))
            return metric

        G, C = GaugeMetricFamily, CounterMetricFamily
        yield family(G, "surge_num_requests_running", "Requests being computed", lambda s: s.num_running)
        yield family(G, "surge_num_requests_waiting", "Requests waiting for a slot", lambda s: s.num_waiting)
        yield family(G, "surge_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", lambda s: s.kv_cache_usage)
        yield family(G, "surge_kv_cache_blocks_total", "KV-cache blocks", lambda s: s.kv_blocks_total)
        yield family(G, "surge_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / looked up",
                     lambda s: s.prefix_cache_hit_rate)
        yield family(C, "surge_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                     lambda s: s.prefix_cache_queries)
        yield family(C, "surge_prefix_cache_hits", "Prompt tokens found in the prefix cache",
                     lambda s: s.prefix_cache_hits)
        yield family(C, "surge_num_preemptions", "Requests preempted for lack of KV blocks",
                     lambda s: s.num_preemptions)
        yield family(C, "surge_prompt_tokens", "Prompt tokens of admitted requests", lambda s: s.prompt_tokens)
        yield family(C, "surge_generation_tokens", "Generated tokens", lambda s: s.generation_tokens)
        for name, doc, value in (
                ("surge_spec_decode_num_drafts", "Speculative decoding: verifications of a request's proposed "
                 "tokens", lambda s: s.spec_drafts),
                ("surge_spec_decode_num_draft_tokens", "Speculative decoding: proposed tokens",
                 lambda s: s.spec_draft_tokens),
                ("surge_spec_decode_num_accepted_tokens", "Speculative decoding: proposed tokens accepted",
                 lambda s: s.spec_accepted_tokens)):
            metric = C(name, doc, labels=labels + ["method"])
            for model, version, stats in rows:
                if stats.spec_method is not None:
                    metric.add_metric([model, version, stats.spec_method], value(stats))
            yield metric
        yield family(C, "surge_compilations", "Graphs compiled for the forward (--compile); growth while "
                     "serving means a shape outside the warmed-up buckets", lambda s: s.num_compiles)


class _ReplicaCollector(Collector):
    """Data-parallel replicas of every deployment that has them, labelled by model, version and replica."""

    def __init__(self, replicas: Callable[[], list[tuple[str, str, ReplicaReport]]]):
        self.replicas = replicas

    def collect(self) -> Iterator:
        rows = self.replicas()
        labels = ["model", "version", "replica"]
        G, C = GaugeMetricFamily, CounterMetricFamily

        def family(kind: type, name: str, doc: str, value: Callable[[ReplicaReport], float | None]) -> Any:
            metric = kind(name, doc, labels=labels)
            for model, version, r in rows:
                v = value(r)
                if v is not None:
                    metric.add_metric([model, version, str(r.index)], v)
            return metric

        def stat(field: str) -> Callable[[ReplicaReport], float | None]:
            return lambda r: None if r.stats is None else getattr(r.stats, field)

        yield family(G, "surge_replica_up", "1 while the replica serves (draining included), 0 while it is down, "
                     "restarting or starting", lambda r: float(r.up))
        info = G("surge_replica_info", "1 per replica, labelled by its state (up, down, starting, draining), node "
                 "(a Ray node id; empty for a process of this machine) and process id",
                 labels=[*labels, "state", "node", "pid"])
        for model, version, r in rows:
            info.add_metric([model, version, str(r.index), r.state, r.where, str(r.pid or "")], 1.0)
        yield info
        yield family(C, "surge_replica_restarts", "Times the replica's process was started again", lambda r: r.restarts)
        yield family(C, "surge_replica_requests", "Requests routed to the replica", lambda r: r.router.routed)
        routed = C("surge_replica_routed", "Requests routed to the replica, by why it was chosen",
                   labels=[*labels, "reason"])
        for model, version, r in rows:
            for reason, n in (("affinity", r.router.by_affinity), ("load", r.router.by_load),
                              ("explicit", r.router.explicit)):
                routed.add_metric([model, version, str(r.index), reason], n)
        yield routed
        yield family(G, "surge_replica_weight", "The router's share weight of the replica (adapted to its speed)",
                     lambda r: r.router.weight)
        yield family(G, "surge_replica_num_requests_running", "Requests being computed", stat("num_running"))
        yield family(G, "surge_replica_num_requests_waiting", "Requests waiting for a slot", stat("num_waiting"))
        yield family(G, "surge_replica_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use",
                     stat("kv_cache_usage"))
        yield family(G, "surge_replica_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / looked up",
                     stat("prefix_cache_hit_rate"))
        yield family(C, "surge_replica_prefix_cache_hits", "Prompt tokens found in the prefix cache",
                     stat("prefix_cache_hits"))
        yield family(C, "surge_replica_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                     stat("prefix_cache_queries"))


class ServerMetrics:
    """Per-request measurements, labelled by the model name a request was routed to."""

    def __init__(self, deployments: Callable[[], list[tuple[str, str, EngineStats]]],
                 replicas: Callable[[], list[tuple[str, str, ReplicaReport]]] = lambda: []):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "surge_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"],
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
        self.cache = Counter("surge_response_cache", "Response-cache lookups of deterministic requests",
                             ["model", "result"], registry=self.registry)
        self.batch_size = Histogram("surge_batch_size", "Requests' rows per batch a tensor model ran (dynamic batcher)",
                                    ["model"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.queue_time = Histogram("surge_queue_time_seconds", "Time a tensor model's request waited for its batch",
                                    ["model"], buckets=QUEUE_BUCKETS, registry=self.registry)
        self.compute_time = Histogram("surge_batch_compute_seconds", "Time a tensor model took to run one batch",
                                      ["model"], buckets=QUEUE_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(deployments))
        self.registry.register(_ReplicaCollector(replicas))
        self.listeners: list[Callable[[str, float, float | None, float | None], None]] = []

    def record_status(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def record_request(self, model: str, start: float, first_token: float | None, end: float,
                       num_tokens: int) -> None:
        self.e2e.labels(model).observe(end - start)
        ttft = tpot = None
        if first_token is not None:
            ttft = first_token - start
            self.ttft.labels(model).observe(ttft)
            if num_tokens > 1:
                tpot = (end - first_token) / (num_tokens - 1)
                self.tpot.labels(model).observe(tpot)
        for listener in self.listeners:
            listener(model, end, ttft, tpot)

    def record_finish(self, model: str, reason: str | None) -> None:
        self.finished.labels(model, reason or "unknown").inc()

    def record_batch(self, model: str, rows: int, waits: list[float], seconds: float) -> None:
        self.batch_size.labels(model).observe(rows)
        self.compute_time.labels(model).observe(seconds)
        for wait in waits:
            self.queue_time.labels(model).observe(wait)

    def record_cache(self, model: str, hit: bool) -> None:
        self.cache.labels(model, "hit" if hit else "miss").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
