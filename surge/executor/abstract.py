"""Executor: what the engine needs of its workers, whatever process or machine they run in.

    engine core ──execute_model(SchedulerOutput)──> executor ──> worker(s) ──> ModelRunnerOutput

Set-up goes through the same calls for every backend (estimate_memory, load_model,
determine_num_blocks, initialize_cache); everything else is collective_rpc: a Worker method
called on every worker, their results in rank order. A backend that loses a worker raises
EngineDeadError from then on and tells the callers registered with on_failure.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from surge.config import EngineConfig
from surge.core.runner_output import ModelRunnerOutput
from surge.core.scheduler_output import SchedulerOutput
from surge.worker.reports import MemoryEstimate, ModelInfo, StepTimings


class Executor(ABC):
    # the worker runs in the engine's process: a SchedulerOutput may carry live objects (a
    # constrained request's DeferredMask), not only data that pickles
    in_process = False

    def __init__(self, config: EngineConfig):
        self.config = config
        self._failure_callbacks: list[Callable[[BaseException], None]] = []

    @staticmethod
    def get_class(config: EngineConfig) -> type["Executor"]:
        backend = config.parallel.distributed_executor_backend
        if config.parallel.world_size > 1:
            from surge.executor.distributed import DistributedExecutor

            return DistributedExecutor
        if backend == "mp":
            from surge.executor.multiproc import MultiprocExecutor

            return MultiprocExecutor
        from surge.executor.uniproc import UniProcExecutor

        return UniProcExecutor

    # ---- what every backend implements --------------------------------------------------

    @abstractmethod
    def collective_rpc(self, method: str, *args: Any, timeout: float | None = None) -> list[Any]:
        """Worker.<method>(*args) on every worker; their results in rank order."""

    @abstractmethod
    def execute_model(self, scheduled: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step; the driver worker's (rank 0's) result."""

    @abstractmethod
    def check_health(self) -> None:
        """Raises EngineDeadError when a worker is gone or stuck."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the workers and free what they hold; no process is left behind. Idempotent."""

    # ---- set-up, shared -----------------------------------------------------------------

    def estimate_memory(self) -> MemoryEstimate:
        return self.collective_rpc("estimate_memory")[0]

    def load_model(self) -> ModelInfo:
        return self.collective_rpc("load_model")[0]

    def determine_num_blocks(self) -> int:
        """The blocks every worker can hold."""
        return min(self.collective_rpc("determine_num_blocks"))

    def initialize_cache(self, num_blocks: int, eos_token_ids: frozenset[int]) -> ModelInfo:
        return self.collective_rpc("initialize_cache", num_blocks, eos_token_ids)[0]

    def timings(self) -> StepTimings:
        return self.collective_rpc("timings")[0]

    def reset_timings(self) -> None:
        self.collective_rpc("reset_timings")

    def finish_warmup(self) -> None:
        self.collective_rpc("finish_warmup")

    # ---- steps in flight (a pipeline's stages work on several) -----------------------------

    max_in_flight = 1  # steps that may be submitted before the oldest is collected

    def submit(self, scheduled: SchedulerOutput) -> Any:
        """Start a step; collect(the handle) returns its result. Steps are collected in the order
        they were submitted; at most max_in_flight are out at a time."""
        return scheduled

    def collect(self, handle: Any) -> ModelRunnerOutput:
        return self.execute_model(handle)

    def on_failure(self, callback: Callable[[BaseException], None]) -> None:
        """Call `callback(error)` (from any thread) once a worker is lost."""
        self._failure_callbacks.append(callback)

    def _notify_failure(self, error: BaseException) -> None:
        for callback in list(self._failure_callbacks):
            callback(error)
