"""The worker in the engine's own process: calls are plain method calls, nothing is copied."""

from __future__ import annotations

from typing import Any

from surge.config import EngineConfig
from surge.core.runner_output import ModelRunnerOutput
from surge.core.scheduler_output import SchedulerOutput
from surge.executor.abstract import Executor
from surge.worker.worker import Worker


class UniProcExecutor(Executor):
    def __init__(self, config: EngineConfig):
        super().__init__(config)
        self.worker = Worker(config)
        self.worker.init_device()

    def collective_rpc(self, method: str, *args: Any, timeout: float | None = None) -> list[Any]:
        return [getattr(self.worker, method)(*args)]

    def execute_model(self, scheduled: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(scheduled)

    def check_health(self) -> None:
        self.worker.check_health()

    def shutdown(self) -> None:
        self.worker.shutdown()
