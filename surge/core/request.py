"""A request's state as the scheduler sees it: tokens, progress, blocks, status."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from surge.core.prefix_hash import BlockHash, hash_block_tokens


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # blocks taken back; waits to be recomputed
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"
    ERROR = "error"  # the step failed for this request alone; the others go on


@dataclass(slots=True, eq=False)
class Request:
    """Progress is `num_computed_tokens` over prompt + output; the scheduler only advances it."""

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    # Opaque to core/: the engine's sampling parameters travel with the request to the runner.
    sampling_params: Any = None
    arrival: float = 0.0
    priority: int = 0  # lower runs first under the priority policy (as in vLLM)
    # Keys that make equal tokens cache differently (LoRA, quantization, ...).
    cache_salt: Any = None
    # Requests that need logits at every prompt position cannot skip cached ones.
    skip_prefix_cache: bool = False
    # Whether proposed tokens may be verified for it (speculative decoding; the engine decides
    # from its sampling settings).
    speculate: bool = False
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    block_hashes: list[BlockHash] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    first_token_time: float | None = None  # when the first output token was sampled (monotonic)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def token_slice(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        return (self.prompt_token_ids[start:] if start < n else []) + self.output_token_ids[
            max(start - n, 0) : end - n
        ]

    def update_block_hashes(self, block_size: int) -> None:
        """Hash every newly full block of known tokens, each chained to the one before."""
        while (len(self.block_hashes) + 1) * block_size <= self.num_tokens:
            i = len(self.block_hashes)
            parent = self.block_hashes[-1] if self.block_hashes else None
            tokens = self.token_slice(i * block_size, (i + 1) * block_size)
            self.block_hashes.append(hash_block_tokens(parent, tokens, self.cache_salt))
