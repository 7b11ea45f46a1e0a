"""The worker in the engine's own process: calls are plain method calls, nothing is copied."""

from __future__ import annotations

from typing import Any

from surge.config import EngineConfig
from surge.core.runner_output import ModelRunnerOutput
from surge.core.scheduler_output import SchedulerOutput
from surge.errors import EngineDeadError
from surge.executor.abstract import Executor
from surge.worker.worker import Worker


class UniProcExecutor(Executor):
    in_process = True

    def __init__(self, config: EngineConfig):
        super().__init__(config)
        self.worker = Worker(config)
        self.worker.init_device()
        self._closed = False

    def collective_rpc(self, method: str, *args: Any, timeout: float | None = None) -> list[Any]:
        self.check_health()
        return [getattr(self.worker, method)(*args)]

    def execute_model(self, scheduled: SchedulerOutput) -> ModelRunnerOutput:
        if self._closed:
            raise EngineDeadError("the engine was shut down")
        return self.worker.execute_model(scheduled)

    def check_health(self) -> None:
        if self._closed:
            raise EngineDeadError("the engine was shut down")
        self.worker.check_health()

    def shutdown(self) -> None:
        self._closed = True
        self.worker.shutdown()
