"""EngineCore: the scheduler and the executor, and one step between them.

It builds the executor, has the workers load the model and size the KV cache, and makes the
scheduler over the blocks they hold. `execute` runs a scheduled step with failure isolation:
when a step raises, each request is run alone, and only those that still fail are reported,
so one bad request never takes the batch (or the engine) with it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from surge.config import EngineConfig
from surge.core.runner_output import ModelRunnerOutput
from surge.core.scheduler import Scheduler
from surge.core.scheduler_output import SchedulerOutput
from surge.errors import EngineDeadError
from surge.executor.abstract import Executor
from surge.worker.reports import MemoryEstimate, ModelInfo, StepTimings

logger = logging.getLogger(__name__)

# What a failing request can raise: any Exception, and the panics of Rust extensions (the
# tokenizer's pyo3 PanicException derives from BaseException); never KeyboardInterrupt or SystemExit.
_FATAL = (KeyboardInterrupt, SystemExit, GeneratorExit, EngineDeadError)


def check_recoverable(exc: BaseException) -> None:
    if isinstance(exc, _FATAL):
        raise exc


MAX_FAILED_STEPS = 8  # single-request steps failing in a row before the engine calls itself broken

# Called with the memory a load will take before any weight is read; raising there stops it.
ReserveHook = Callable[[MemoryEstimate], None]


class EngineBrokenError(RuntimeError):
    """A step failed for reasons no request explains (the model, the device): the engine stops."""


class EngineCore:
    def __init__(self, config: EngineConfig, eos_token_ids: frozenset[int], reserve: ReserveHook | None = None):
        self.config = config
        self.executor = Executor.get_class(config)(config)
        try:
            if reserve is not None:
                reserve(self.executor.estimate_memory())
            self.executor.load_model()
            num_blocks = self.executor.determine_num_blocks()
            self.model_info: ModelInfo = self.executor.initialize_cache(num_blocks, eos_token_ids)
        except BaseException:
            self.executor.shutdown()
            raise
        self.scheduler = Scheduler(config.scheduler, config.cache, num_blocks, config.speculative,
                                   self.executor.max_in_flight)
        self.timings = StepTimings()  # the engine's side of each step; the workers keep theirs
        self.num_compiles = 0
        self._failed_steps = 0  # consecutive steps whose every request failed

    def execute(self, scheduled: SchedulerOutput) -> tuple[ModelRunnerOutput, list[tuple[str, BaseException]]]:
        """The step's result and the requests that failed alone, with their errors.

        Raises EngineBrokenError when the failure is not any request's: several requests
        scheduled and every one fails alone, or single-request steps keep failing; and
        EngineDeadError at once when the executor has lost its worker.
        """
        try:
            result = self.executor.execute_model(scheduled)
            self._failed_steps = 0
            self.num_compiles = result.num_compiles
            return result, []
        except BaseException as exc:  # isolated below
            check_recoverable(exc)
            first_error = exc
        # blocks cached for this step may hold garbage now
        self.scheduler.pool.reset_prefix_cache()
        logger.warning("a step of %d requests failed (%s: %s); running each alone",
                       len(scheduled.requests), type(first_error).__name__, first_error)
        result = ModelRunnerOutput()
        culprits: list[tuple[str, BaseException]] = []
        for request in scheduled.requests:
            try:
                result.merge(self.executor.execute_model(SchedulerOutput(requests=[request])))
            except BaseException as exc:
                check_recoverable(exc)
                culprits.append((request.request_id, exc))
        everyone = len(culprits) == len(scheduled.requests)
        self._failed_steps = self._failed_steps + 1 if everyone else 0
        if everyone and (len(culprits) > 1 or self._failed_steps >= MAX_FAILED_STEPS):
            self._failed_steps = 0
            raise EngineBrokenError(f"every request of the step fails: {type(first_error).__name__}: "
                                    f"{first_error}") from first_error
        for request_id, exc in culprits:
            logger.error("request %s failed in the engine and was ended: %s: %s",
                         request_id, type(exc).__name__, exc, exc_info=exc)
        self.num_compiles = max(self.num_compiles, result.num_compiles)
        return result, culprits

    def worker_timings(self) -> StepTimings:
        return self.timings.combined(self.executor.timings())

    def reset_timings(self) -> None:
        self.timings = StepTimings()
        self.executor.reset_timings()

    def finish_warmup(self) -> None:
        """Timings restart on both sides; the workers log compilations from now on as recompiles."""
        self.timings = StepTimings()
        self.executor.finish_warmup()

    def shutdown(self) -> None:
        self.executor.shutdown()
