"""Speculative decoding on the scheduler's side: which decoding requests get proposed tokens
this step, how many, and what verifying them showed.

Proposed tokens are scheduled like prompt tokens (their KV is written, their logits verify
them); a step's cost grows with its rows, so each proposed token is a bet. The bets are
placed by the expected gain: a request whose proposals were accepted with probability a
(estimated from its own verifications) gains a^j expected tokens from its j-th proposed
token, and a token more in the step costs every request in it the time of one row. Proposed
tokens are handed out, best bet first, while a bet raises the step's expected tokens per
unit of time:

    add one where  a^j * (STEP_FIXED_ROWS + rows) > expected tokens of the step so far

STEP_FIXED_ROWS is a step's cost apart from its rows, in rows (measured: a decode step of
the default model takes ~6.5 ms at one row and ~1.3 ms more per row on 2 cores; see
docs/performance.md). So at batch 1 a request with a good record proposes up to K tokens, at
batch 32 only near-certain ones, and a request whose proposals keep failing stops proposing;
its estimate drifts back to the prior while it does not speculate, so it tries again later.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from surge.config import SpeculativeConfig
from surge.core.ngram_proposer import NgramProposer
from surge.core.request import Request

STEP_FIXED_ROWS = 5.0
PRIOR_ACCEPTED, PRIOR_TRIALS = 1.0, 2.0  # a new request's estimate: 0.5, worth two observations
DECAY = 0.9  # weight an older tested token keeps at each newer one (a memory of ~10 tokens)
IDLE_DECAY = 0.97  # towards the prior, each step a request decodes without proposing


@dataclass(slots=True)
class SpeculationStats:
    num_drafts: int = 0  # verifications: a request's proposed tokens checked in a step
    num_draft_tokens: int = 0  # proposed tokens
    num_accepted_tokens: int = 0  # of them, accepted

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verifying request gained per step (its accepted tokens plus the one sampled)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


@dataclass(slots=True)
class _Record:
    accepted: float = PRIOR_ACCEPTED
    trials: float = PRIOR_TRIALS

    @property
    def rate(self) -> float:
        return self.accepted / self.trials


class Speculator:
    def __init__(self, config: SpeculativeConfig):
        self.method = config.method
        self.k = config.num_speculative_tokens
        self.proposer = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
        self.stats = SpeculationStats()
        self._records: dict[str, _Record] = {}

    def plan(self, decoding: list[Request], rows: int) -> dict[str, list[int]]:
        """Proposed tokens for some of `decoding` (requests about to decode one token; only those
        whose `speculate` is set may get any), in a step of about `rows` tokens."""
        if not decoding:
            return {}
        bets: list[tuple[float, int, int]] = []  # (-gain, index, j) of each request's next token
        proposals: list[list[int]] = []
        rates: list[float] = []
        floor = len(decoding) / (STEP_FIXED_ROWS + rows)  # a first proposed token's gain must beat it
        for i, request in enumerate(decoding):
            record = self._records.setdefault(request.request_id, _Record())
            room = request.max_tokens - len(request.output_token_ids) - 1  # the last token is sampled
            proposal = []
            if request.speculate and room > 0 and record.rate > floor:  # else no lookup: it could not win
                proposal = self.proposer.propose(request, min(self.k, room))
            proposals.append(proposal)
            rates.append(record.rate)
            if proposal:
                bets.append((-record.rate, i, 1))
        heapq.heapify(bets)
        expected = float(len(decoding))
        taken = [0] * len(decoding)
        while bets:
            neg_gain, i, j = bets[0]
            gain = -neg_gain
            if gain * (STEP_FIXED_ROWS + rows) <= expected:
                break
            heapq.heappop(bets)
            expected += gain
            rows += 1
            taken[i] = j
            if j < len(proposals[i]):
                heapq.heappush(bets, (-gain * rates[i], i, j + 1))
        plan = {}
        for i, request in enumerate(decoding):
            if taken[i]:
                plan[request.request_id] = proposals[i][:taken[i]]
            else:  # not speculating: the estimate drifts back towards the prior
                record = self._records[request.request_id]
                record.accepted = PRIOR_ACCEPTED + (record.accepted - PRIOR_ACCEPTED) * IDLE_DECAY
                record.trials = PRIOR_TRIALS + (record.trials - PRIOR_TRIALS) * IDLE_DECAY
        return plan

    def record(self, request_id: str, proposed: int, accepted: int) -> None:
        """A verification's outcome: `accepted` of `proposed` tokens, in order (the first
        refused one ends it)."""
        self.stats.num_drafts += 1
        self.stats.num_draft_tokens += proposed
        self.stats.num_accepted_tokens += accepted
        record = self._records.setdefault(request_id, _Record())
        trials = accepted + (1 if accepted < proposed else 0)  # the tokens tested: up to the first refusal
        keep = DECAY ** trials
        record.accepted = record.accepted * keep + accepted
        record.trials = record.trials * keep + trials

    def forget(self, request_id: str) -> None:
        self._records.pop(request_id, None)
        self.proposer.forget(request_id)
