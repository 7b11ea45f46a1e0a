"""Pipeline parallelism: contiguous ranges of decoder layers per stage, the hidden states and the
residual passed from stage to stage.

    stage 0     embedding, layers 0..a-1          ── send [x; residual] ──>
    stage 1     layers a..b-1                      ── send ──> ... last stage ──┐
    stage 0     final norm and LM head (samples)   <── send [x; residual] ─────┘

The first stage holds the embedding, the final norm and the LM head as well (a tied embedding
stays one tensor), so the ranks that sample are stage 0's: the last stage sends its output back.
Each stage's model is the model of a configuration that names its layers (`layer_range`): the
other layers are MissingLayers, whose checkpoint tensors loading skips, and their KV caches are
empty. With tensor parallelism too, each stage is a tensor-parallel group and each of its ranks
passes its copy of the (replicated) hidden states to the same rank of the next stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from surge.config import ModelConfig
from surge.distributed.comm import Communicator
from surge.errors import InvalidArgumentError


@dataclass(frozen=True)
class PipelineLayout:
    """Which layers stage `stage` of `stages` holds: near-equal contiguous ranges, the later
    stages one more where the layers do not split evenly (the first also holds the embedding
    and the LM head)."""

    num_layers: int
    stage: int
    stages: int

    def layer_range(self, stage: int | None = None) -> tuple[int, int]:
        s = self.stage if stage is None else stage
        base, extra = divmod(self.num_layers, self.stages)
        sizes = [base + (1 if i >= self.stages - extra else 0) for i in range(self.stages)]
        start = sum(sizes[:s])
        return start, start + sizes[s]

    def describe(self) -> str:
        ranges = ", ".join(f"{a}..{b - 1}" for a, b in (self.layer_range(s) for s in range(self.stages)))
        return f"pipeline of {self.stages} stages, layers {ranges}"


def check_pipeline_parallel(config: ModelConfig, stages: int, plan: object, architecture: str) -> None:
    """One line on why `config` cannot run in `stages` stages, if it cannot."""
    if stages == 1:
        return
    if plan is None:
        raise InvalidArgumentError(f"pipeline_parallel_size {stages}: pipeline parallelism is not available for the "
                                   f"{architecture} architecture yet")
    if stages > config.num_hidden_layers:
        raise InvalidArgumentError(f"pipeline_parallel_size {stages} is above the model's {config.num_hidden_layers} "
                                   "layers")


class PipelineStage(nn.Module):
    """A stage's decoder (a LlamaModel holding its layers). begin(ids, positions) runs its layers
    on what the previous stage sent (the first stage: on the embedding) and starts sending the
    result on; end(tokens), on the first stage, receives the last stage's output and applies the
    final norm. forward() is both (a step at a time). Sends do not wait for the receiver: a stage
    waits for its previous send only before the next one, so stages with several steps in flight
    never wait on each other in a circle."""

    def __init__(self, inner: nn.Module, layout: PipelineLayout, comm: Communicator, hidden_size: int,
                 dtype: torch.dtype):
        super().__init__()
        self.inner = inner
        self.layout, self.comm = layout, comm
        self.hidden_size, self.dtype = hidden_size, dtype
        self._sending: Callable[[], None] | None = None

    def _like(self, tokens: int, device: torch.device) -> torch.Tensor:
        return torch.empty((2, tokens, self.hidden_size), dtype=self.dtype, device=device)

    def begin(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        lay, inner = self.layout, self.inner
        if lay.stage == 0:
            x, residual = inner.embed(input_ids), None
        else:
            x, residual = self.comm.recv(self._like(input_ids.shape[0], input_ids.device), src=lay.stage - 1).unbind(0)
        x, residual = inner.run_layers(x, residual, positions, range(*lay.layer_range()))
        if self._sending is not None:
            self._sending()
        self._sending = self.comm.isend(torch.stack([x, residual]), dst=(lay.stage + 1) % lay.stages)
        return x

    def end(self, tokens: int) -> torch.Tensor:
        assert self.layout.stage == 0
        x, residual = self.comm.recv(self._like(tokens, self.inner.norm.weight.device),
                                     src=self.layout.stages - 1).unbind(0)
        return self.inner.norm(x, residual)[0]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The first stage: the final hidden states (the last stage's, normed); the others: their
        own output, which nobody reads."""
        x = self.begin(input_ids, positions)
        return self.end(input_ids.shape[0]) if self.layout.stage == 0 else x


def pipeline(model: nn.Module, layout: PipelineLayout, comm: Communicator) -> PipelineStage:
    """Make a loaded stage's model run its stage: its decoder wrapped in a PipelineStage."""
    model.model = PipelineStage(model.model, layout, comm, model.config.hidden_size, model.dtype)
    return model.model
