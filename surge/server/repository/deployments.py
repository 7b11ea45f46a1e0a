"""Deployments: a loaded version's engine, built within the server's memory budget, and its
unloading once the requests it serves are done."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from surge.engine.args import EngineArgs
from surge.engine.async_engine import AsyncEngine
from surge.engine.engine_core import ReserveHook
from surge.engine.llm_engine import LLMEngine
from surge.errors import SurgeError
from surge.server.budget import MemoryBudget, MiB

logger = logging.getLogger("surge.repository")

EngineFactory = Callable[[str | None, EngineArgs, ReserveHook], LLMEngine]


class ModelLoadError(SurgeError):
    """A load failed for a reason that is not one of surge's typed input errors."""


@dataclass(eq=False)
class Deployment:
    """One loaded version: its engine and the requests it is serving."""

    name: str
    version: str
    engine: LLMEngine
    async_engine: AsyncEngine
    memory_bytes: int
    in_flight: int = 0  # requests holding a lease
    sequences: int = 0  # their sequences (n x prompts), what --max-queue counts
    drained: threading.Event = field(default_factory=threading.Event)

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}"

    def close(self) -> None:
        """Stop the engine's thread, then its workers (a worker process exits)."""
        self.async_engine.shutdown()
        self.engine.shutdown()

    def busy(self) -> bool:
        return bool(self.in_flight or self.async_engine.num_unfinished())


def build_deployment(name: str, version: str, path: str | None, args: EngineArgs, factory: EngineFactory,
                     budget: MemoryBudget) -> Deployment:
    """Build the engine of one version: its weights and KV cache reserved in `budget` before
    they are allocated, warmed up, settled to what it measures, its loop started. On failure
    nothing stays behind (engine, workers, reservation) and the error is a SurgeError."""
    key = f"{name}:{version}"
    start = time.perf_counter()
    engine: LLMEngine | None = None
    try:
        def reserve(estimate: Any) -> None:
            weights, kv = estimate.weight_bytes, estimate.kv_cache_bytes
            budget.reserve(key, weights + kv, f"weights ~{weights / MiB:.0f} MiB + KV cache {kv / MiB:.0f} MiB")

        engine = factory(path, args, reserve)
        warm = engine.warm_up() if args.warmup else None
        measured = engine.memory_bytes()
        budget.settle(key, measured)
        aengine = AsyncEngine(engine)
        aengine.start()
    except BaseException as exc:
        if engine is not None:  # its warm-up failed: its workers go too
            engine.shutdown()
        budget.release(key)
        error = exc if isinstance(exc, SurgeError) else ModelLoadError(f"{type(exc).__name__}: {exc}")
        if error is exc:
            raise
        raise error from exc
    info = engine.model_info
    logger.info(
        "loaded %s in %.1fs: %s from %s, dtype %s, quantization %s, KV cache %d tokens, %.0f MiB%s", key,
        time.perf_counter() - start, info.architecture, info.path, info.dtype, info.quantization,
        engine.capacity_tokens, measured / MiB,
        f", warm-up {warm.seconds:.1f}s (prefill {warm.prefill_lengths}, decode batches "
        f"{warm.decode_batch_sizes})" if warm else "",
    )
    return Deployment(name, version, engine, aengine, measured)


def wait_drained(deployment: Deployment, timeout: float) -> None:
    """Until no request holds or runs on `deployment`, or `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while deployment.busy() and time.monotonic() < deadline:
        time.sleep(0.05)
    if deployment.in_flight:
        logger.warning("%s: %d requests still in flight after %.0fs; unloading anyway", deployment.key,
                       deployment.in_flight, timeout)
