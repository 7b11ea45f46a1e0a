"""What to run in one step: the only contract between core/ (scheduling) and worker/ (running).

Plain dataclasses so an executor in another process can ship them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class NewRequestData:
    """Sent the first time a request is scheduled; the runner keeps it until the request finishes."""

    prompt_token_ids: list[int]
    sampling_params: Any


@dataclass(slots=True)
class ScheduledRequest:
    """`token_ids` are computed at positions start_position.. and written into `block_ids`."""

    request_id: str
    token_ids: list[int]
    start_position: int
    block_ids: list[int]
    sample: bool  # this chunk reaches the end of the known tokens: sample the next one
    new: NewRequestData | None = None
    # a constrained request's allowed next tokens (int32 bitmask words: bit b of word w is
    # token 32 w + b), filled by the engine before the step, or for a runner in the engine's
    # process a DeferredMask that computes them if the sampler asks; None: any token
    allowed: Any = None
    # the last num_draft of token_ids are proposed tokens to verify (speculative decoding): the
    # logits of the last num_draft + 1 positions decide how many are accepted, plus one sampled
    num_draft: int = 0


@dataclass(slots=True)
class SchedulerOutput:
    requests: list[ScheduledRequest] = field(default_factory=list)
    # Requests the runner can forget (finished or aborted since the last step).
    finished_request_ids: list[str] = field(default_factory=list)
    preempted_request_ids: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.requests)

    @property
    def decode_only(self) -> bool:
        """Every scheduled request decodes its one next token (with its proposals, if any)."""
        return bool(self.requests) and all(len(r.token_ids) == 1 + r.num_draft for r in self.requests)
