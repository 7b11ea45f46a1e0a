"""What the routes share: the repository, the settings, the server's status and its metrics."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from surge.engine.data_parallel import DataParallelEngine, ReplicaReport
from surge.engine.llm_engine import EngineStats
from surge.server.dashboard import StatsHistory
from surge.server.metrics import ServerMetrics
from surge.server.repository import Deployment, ModelRepository
from surge.server.response_cache import ResponseCache
from surge.server.settings import ServerSettings


@dataclass
class ServerState:
    """`status` is loading -> ready -> draining (or failed)."""

    repository: ModelRepository
    settings: ServerSettings
    status: str = "loading"
    load_error: str | None = None
    engine_error: str | None = None  # set when an engine died: /health answers 503 with it, the process exits
    # set (on the event loop) when the shutdown grace is over: every request still running ends with 503
    aborting: asyncio.Event | None = None
    loop: asyncio.AbstractEventLoop | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: ServerMetrics = field(init=False)
    history: StatsHistory = field(init=False)
    response_cache: ResponseCache | None = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = ServerMetrics(self.engine_stats, self.replica_reports)
        self.history = StatsHistory(self.engine_stats)
        self.metrics.listeners.append(self.history.record_request)
        self.repository.observe_batch = self._observe_batch
        size = self.settings.response_cache_size
        self.response_cache = ResponseCache(size) if size > 0 else None
        if self.response_cache is not None:
            self.repository.on_unloaded.append(self.response_cache.drop_version)

    def _observe_batch(self, model: str, rows: int, waits: list[float], seconds: float) -> None:
        self.metrics.record_batch(model, rows, waits, seconds)
        self.history.record_batch(model, rows, waits, seconds)

    def engine_stats(self) -> list[tuple[str, str, EngineStats]]:
        return [(d.name, d.version, d.async_engine.stats()) for d in self.repository.deployments()
                if isinstance(d, Deployment)]

    def replica_reports(self) -> list[tuple[str, str, ReplicaReport]]:
        return [(d.name, d.version, r) for d in self.repository.deployments()
                if isinstance(d, Deployment) and isinstance(d.async_engine, DataParallelEngine)
                for r in d.async_engine.replicas()]

    def in_flight(self) -> int:
        return self.repository.in_flight()

    def deadline(self) -> float | None:
        """When a request started now must end (--request-timeout), on the monotonic clock."""
        timeout = self.settings.request_timeout
        return time.monotonic() + timeout if timeout else None
