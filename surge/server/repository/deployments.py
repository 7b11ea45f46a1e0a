"""Deployments: a loaded version, built within the server's memory budget, and its unloading
once the requests it serves are done. An LLM's deployment is its engine on its own thread
(Deployment); a tensor model's is its backend behind the dynamic batcher (TensorDeployment)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from surge.engine.args import EngineArgs
from surge.engine.async_engine import AsyncEngine
from surge.engine.data_parallel import DataParallelEngine
from surge.engine.engine_core import ReserveHook
from surge.engine.llm_engine import LLMEngine
from surge.errors import SurgeError
from surge.server.budget import MemoryBudget, MiB
from surge.tensor.config import TensorModelConfig
from surge.tensor.model import TensorModel

logger = logging.getLogger("surge.repository")

EngineFactory = Callable[[str | None, EngineArgs, ReserveHook], LLMEngine | DataParallelEngine]
BatchObserver = Callable[[str, int, list[float], float], None]  # (model, batch rows, queue waits, run seconds)


class ModelLoadError(SurgeError):
    """A load failed for a reason that is not one of surge's typed input errors."""


@dataclass(eq=False)
class Deployment:
    """One loaded LLM version: its engine and the requests it is serving. With data-parallel
    replicas both are the one DataParallelEngine (the front of the replicas' processes)."""

    kind = "llm"
    name: str
    version: str
    engine: LLMEngine | DataParallelEngine
    async_engine: AsyncEngine | DataParallelEngine
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

    def unfinished(self) -> int:
        return self.async_engine.num_unfinished()

    @property
    def running(self) -> bool:
        return self.async_engine.is_running

    @property
    def error(self) -> BaseException | None:
        return self.async_engine.error


@dataclass(eq=False)
class TensorDeployment:
    """One loaded tensor-model version (onnxruntime or torch): its model behind the dynamic
    batcher, and the requests it is serving."""

    name: str
    version: str
    model: TensorModel
    memory_bytes: int
    in_flight: int = 0
    sequences: int = 0
    drained: threading.Event = field(default_factory=threading.Event)
    running: bool = True
    error: BaseException | None = None

    @property
    def kind(self) -> str:
        return self.model.config.backend

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}"

    def close(self) -> None:
        self.running = False
        self.model.close()

    def unfinished(self) -> int:
        return self.model.batcher.queued()

    def busy(self) -> bool:
        return bool(self.in_flight or self.unfinished())


AnyDeployment = Deployment | TensorDeployment


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
        if isinstance(engine, DataParallelEngine):  # its replicas warmed up as they started
            warm = None
            aengine: AsyncEngine | DataParallelEngine = engine
        else:
            warm = engine.warm_up() if args.warmup else None
            aengine = AsyncEngine(engine)
        measured = engine.memory_bytes()
        budget.settle(key, measured)
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


def build_tensor_deployment(name: str, version: str, path: str, config: TensorModelConfig, budget: MemoryBudget,
                            observe: BatchObserver | None = None) -> TensorDeployment:
    """Load a tensor model's version with its file's size reserved in `budget` per instance; on
    failure nothing stays reserved and the error is a SurgeError."""
    key = f"{name}:{version}"
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    budget.reserve(key, size * config.instance_count, f"{config.backend} model files {size / MiB:.1f} MiB x "
                                                      f"{config.instance_count} instance(s)")
    try:
        watch = (lambda rows, waits, seconds: observe(name, rows, waits, seconds)) if observe else None
        model = TensorModel.load(path, config, key, watch)
    except BaseException as exc:
        budget.release(key)
        if isinstance(exc, SurgeError):
            raise
        raise ModelLoadError(f"{type(exc).__name__}: {exc}") from exc
    budget.settle(key, model.memory_bytes)
    return TensorDeployment(name, version, model, model.memory_bytes)


def wait_drained(deployment: AnyDeployment, timeout: float) -> None:
    """Until no request holds or runs on `deployment`, or `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while deployment.busy() and time.monotonic() < deadline:
        time.sleep(0.05)
    if deployment.in_flight:
        logger.warning("%s: %d requests still in flight after %.0fs; unloading anyway", deployment.key,
                       deployment.in_flight, timeout)
