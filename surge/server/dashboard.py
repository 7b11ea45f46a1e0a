"""The live dashboard's data: one point per second per model, kept for the last few minutes.

A sampler thread reads every loaded deployment's engine counters each second and turns them
into rates (tokens/s, requests/s); latencies come from the requests that finished in a
sliding window (p50 / p99 of TTFT and TPOT). /dashboard draws them; no external service.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from surge.engine.llm_engine import EngineStats

SERIES = ("tokens_per_s", "requests_per_s", "ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99",
          "queue_depth", "running", "kv_cache_usage", "prefix_cache_hit_rate",
          # speculative decoding: proposed tokens accepted in the interval / proposed (None: none proposed)
          "spec_acceptance_rate",
          # tensor models (their dynamic batcher): rows per batch, time queued for a batch
          "batch_size_mean", "batch_size_max", "queue_time_p50", "queue_time_p99")


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) of an ascending list, or None when it is empty."""
    if not sorted_values:
        return None
    rank = min(max(1, math.ceil(q * len(sorted_values))), len(sorted_values))
    return sorted_values[rank - 1]


@dataclass
class _ModelSeries:
    t: deque = field(default_factory=deque)
    values: dict[str, deque] = field(default_factory=lambda: {k: deque() for k in SERIES})
    finished: deque = field(default_factory=deque)  # (end time, ttft, tpot) of finished requests
    batches: deque = field(default_factory=deque)  # (end time, rows, queue waits) of a tensor model's batches
    kind: str = "llm"

    def trim(self, points: int) -> None:
        while len(self.t) > points:
            self.t.popleft()
            for v in self.values.values():
                v.popleft()


class StatsHistory:
    """Time series per model name, sampled from `deployments()` every `interval` seconds."""

    def __init__(self, deployments: Callable[[], list[tuple[str, str, EngineStats]]], interval: float = 1.0,
                 points: int = 300, latency_window: float = 10.0):
        self.deployments = deployments
        self.interval = interval
        self.points = points
        self.latency_window = latency_window
        self._models: dict[str, _ModelSeries] = defaultdict(_ModelSeries)
        self._last_tokens: dict[str, int] = {}
        self._last_spec: dict[str, tuple[int, int]] = {}  # (proposed, accepted) tokens at the last sample
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_time = time.monotonic()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="surge-dashboard", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def record_request(self, model: str, end: float, ttft: float | None, tpot: float | None) -> None:
        """A finished request (monotonic end time), for requests/s and the latency percentiles."""
        with self._lock:
            self._models[model].finished.append((end, ttft, tpot))

    def record_batch(self, model: str, rows: int, waits: list[float], seconds: float) -> None:
        """A batch a tensor model ran, for its requests/s, batch sizes and queue times."""
        with self._lock:
            series = self._models[model]
            series.kind = "tensor"
            series.batches.append((time.monotonic(), rows, waits))

    def sample(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        elapsed = max(now - self._last_time, 1e-6)
        self._last_time = now
        per_model: dict[str, list[tuple[str, EngineStats]]] = defaultdict(list)
        for model, version, stats in self.deployments():
            per_model[model].append((f"{model}:{version}", stats))
        wall = time.time()
        live = {key for rows in per_model.values() for key, _ in rows}
        with self._lock:
            self._last_tokens = {k: v for k, v in self._last_tokens.items() if k in live}
            self._last_spec = {k: v for k, v in self._last_spec.items() if k in live}
            for model in set(per_model) | set(self._models):
                series = self._models[model]
                rows = per_model.get(model, [])
                tokens = proposed = accepted = 0
                for key, stats in rows:
                    tokens += max(0, stats.generation_tokens - self._last_tokens.get(key, 0))
                    self._last_tokens[key] = stats.generation_tokens
                    last_proposed, last_accepted = self._last_spec.get(key, (0, 0))
                    proposed += max(0, stats.spec_draft_tokens - last_proposed)
                    accepted += max(0, stats.spec_accepted_tokens - last_accepted)
                    self._last_spec[key] = (stats.spec_draft_tokens, stats.spec_accepted_tokens)
                while series.finished and series.finished[0][0] < now - max(self.latency_window, elapsed):
                    series.finished.popleft()
                while series.batches and series.batches[0][0] < now - max(self.latency_window, elapsed):
                    series.batches.popleft()
                sizes = [b[1] for b in series.batches]
                waits = sorted(w for b in series.batches for w in b[2])
                served = sum(len(b[2]) for b in series.batches if b[0] >= now - elapsed)
                recent = [f for f in series.finished if f[0] >= now - elapsed]
                ttfts = sorted(f[1] for f in series.finished if f[1] is not None)
                tpots = sorted(f[2] for f in series.finished if f[2] is not None)
                queries = sum(s.prefix_cache_queries for _, s in rows)
                point = {
                    "tokens_per_s": tokens / elapsed,
                    "requests_per_s": (served if series.kind == "tensor" else len(recent)) / elapsed,
                    "ttft_p50": percentile(ttfts, 0.50), "ttft_p99": percentile(ttfts, 0.99),
                    "tpot_p50": percentile(tpots, 0.50), "tpot_p99": percentile(tpots, 0.99),
                    "queue_depth": sum(s.num_waiting for _, s in rows),
                    "running": sum(s.num_running for _, s in rows),
                    "kv_cache_usage": max((s.kv_cache_usage for _, s in rows), default=0.0),
                    "prefix_cache_hit_rate": sum(s.prefix_cache_hits for _, s in rows) / queries if queries else 0.0,
                    "spec_acceptance_rate": accepted / proposed if proposed else None,
                    "batch_size_mean": sum(sizes) / len(sizes) if sizes else None,
                    "batch_size_max": max(sizes, default=None),
                    "queue_time_p50": percentile(waits, 0.50), "queue_time_p99": percentile(waits, 0.99),
                }
                series.t.append(wall)
                for key, value in point.items():
                    series.values[key].append(value)
                series.trim(self.points)

    def data(self, since: float | None = None) -> dict[str, Any]:
        """{"interval", "models": {name: {"t": [...], <series>: [...]}}, "kinds": {name: "llm" | "tensor"}},
        points after `since` only."""
        with self._lock:
            models, kinds = {}, {}
            for name, series in sorted(self._models.items()):
                t = list(series.t)
                start = bisect.bisect_right(t, since) if since is not None else 0
                models[name] = {"t": t[start:], **{k: list(v)[start:] for k, v in series.values.items()}}
                kinds[name] = series.kind
        return {"interval": self.interval, "models": models, "kinds": kinds}


def dashboard_html() -> str:
    return resources.files("surge.server").joinpath("static/dashboard.html").read_text(encoding="utf-8")
