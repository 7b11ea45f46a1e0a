"""What a worker reports about itself to the engine: plain data, free of torch, picklable."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepTimings:
    """Where steps spend their wall time (seconds, summed). The worker fills prepare, forward
    (the model and the LM head; synchronous on CPU), sample and draft (a draft model's
    proposals, speculative method "draft"); the engine fills schedule,
    execute (the executor's call, transport to another process included) and postprocess."""

    steps: int = 0
    schedule: float = 0.0  # Scheduler.schedule
    execute: float = 0.0  # executor.execute_model as the engine sees it
    prepare: float = 0.0  # input tensors and attention metadata
    forward: float = 0.0  # the model and the LM head
    sample: float = 0.0  # sampler and prompt logprobs
    draft: float = 0.0  # the draft model proposing tokens
    postprocess: float = 0.0  # Scheduler.update, stop checks, detokenization, outputs

    @property
    def worker(self) -> float:
        return self.prepare + self.forward + self.sample + self.draft

    @property
    def transport(self) -> float:
        """Time in execute outside the worker's own work: shipping the step to another process and back."""
        return max(0.0, self.execute - self.worker) if self.execute else 0.0

    @property
    def total(self) -> float:
        return self.schedule + max(self.execute, self.worker) + self.postprocess

    def combined(self, worker: "StepTimings") -> "StepTimings":
        """The engine's parts with the worker's."""
        return StepTimings(self.steps, self.schedule, self.execute, worker.prepare, worker.forward, worker.sample,
                           worker.draft, self.postprocess)

    def summary(self) -> dict[str, float]:
        """Per-step milliseconds of each part and the share of the step outside the models' forwards."""
        n = max(self.steps, 1)
        names = ("schedule", "prepare", "forward", "sample", "draft", "transport", "postprocess")
        parts = {k: 1000 * getattr(self, k) / n for k in names}
        total = self.total
        return {**{f"{k}_ms": v for k, v in parts.items()}, "steps": self.steps,
                "overhead_pct": 100 * (total - self.forward - self.draft) / total if total else 0.0}


@dataclass(frozen=True)
class MemoryEstimate:
    """Before loading: an upper bound of the weights' bytes and the KV cache's budget."""

    weight_bytes: int
    kv_cache_bytes: int


@dataclass(frozen=True)
class ModelInfo:
    """What was loaded, measured after loading and allocating the KV cache."""

    name: str
    path: str
    architecture: str
    dtype: str  # float32, bfloat16, float16
    quantization: str  # "int4-g32 (210 linears), int8 (1 linears)" or "none"
    weight_bytes: int = 0
    kv_cache_bytes: int = 0

    @property
    def memory_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes


__all__ = ["MemoryEstimate", "ModelInfo", "StepTimings"]
