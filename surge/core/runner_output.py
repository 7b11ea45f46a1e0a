"""What one step produced: the contract from worker/ back to the engine, beside SchedulerOutput.

Plain dataclasses, free of torch, so an executor in another process ships them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenLogprobs:
    """Logprob and rank (1 = most likely) of one chosen token, plus the top alternatives."""

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass(slots=True)
class ModelRunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)
    # a request that verified proposed tokens: the step's tokens after `sampled`'s (the accepted
    # proposals follow in order, then the one sampled where the first was refused or after all)
    more_tokens: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    # prompt logprobs computed this step, in prompt order (position p scores token p + 1)
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    # embedding requests whose prompt ended this step: the pooled, normalised hidden state
    pooled: dict[str, list[float]] = field(default_factory=dict)
    num_compiles: int = 0  # graphs the worker has compiled so far (with --compile)
    # requests whose draft model proposed fewer tokens than scheduled (it doubted the rest): how many
    num_proposed: dict[str, int] = field(default_factory=dict)
    # a draft model's proposals this step (speculative method "draft"): all its time, and its
    # passes of one token a request (what a proposal's depth costs, without catch-up) and theirs
    draft_seconds: float = 0.0
    draft_passes: int = 0
    draft_pass_seconds: float = 0.0

    def merge(self, other: "ModelRunnerOutput") -> None:
        self.sampled.update(other.sampled)
        self.more_tokens.update(other.more_tokens)
        self.num_proposed.update(other.num_proposed)
        self.logprobs.update(other.logprobs)
        self.prompt_logprobs.update(other.prompt_logprobs)
        self.pooled.update(other.pooled)
        self.num_compiles = max(self.num_compiles, other.num_compiles)
        self.draft_seconds = max(self.draft_seconds, other.draft_seconds)
        self.draft_passes = max(self.draft_passes, other.draft_passes)
        self.draft_pass_seconds = max(self.draft_pass_seconds, other.draft_pass_seconds)
