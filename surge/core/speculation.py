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

where STEP_FIXED_ROWS is a step's cost apart from its rows, in rows: measured as the engine
runs (`observe`: a least-squares line of decode steps' seconds against their rows, older
steps forgotten gradually), the model's, the machine's and the context's own; until the
steps have varied enough to fit it, a prior (the default model on 2 cores: ~5 ms a step plus
~1.7 ms a row at a 500-token context, docs/performance.md). So at batch 1 a request with a
good record proposes up to K tokens, at batch 32 only near-certain ones, and a request whose
proposals keep failing stops proposing; its estimate drifts back to the prior while it does
not speculate, so it tries again later. The prior is the method's own recent acceptance over
every request (0.5 before any verification), worth two of a request's observations.

With a draft model (method "draft") the proposals are made in the worker, just before the
step's forward: the plan holds placeholders (DRAFT_PLACEHOLDER) the draft writes over. A
proposal at depth j also needs the draft's j-th forward pass of the step, shared by every
request proposing that far: the first bet at a new depth pays that pass too, in rows
(`pass_rows`: the measured seconds of a draft pass over the fitted seconds of a row).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from surge.config import SpeculativeConfig
from surge.core.ngram_proposer import NgramProposer
from surge.core.request import Request

STEP_FIXED_ROWS = 3.0  # the prior: a step's cost apart from its rows, in rows
FIXED_ROWS_RANGE = (0.5, 64.0)  # what a fit may say
FIT_DECAY = 0.99  # weight a step's timing keeps at each newer one (a memory of ~100 steps)
FIT_MIN_VARIANCE = 0.25  # rows must vary this much (weighted variance) before the fit is used
PRIOR_ACCEPTED, PRIOR_TRIALS = 1.0, 2.0  # the first requests' estimate: 0.5, worth two observations
METHOD_DECAY = 0.99  # the method's own record (every request's tested tokens): a memory of ~100
DRAFT_PASS_ROWS = 0.5  # the prior: a draft model's forward pass, in rows of the target's step
DRAFT_PLACEHOLDER = -1  # a proposal the worker's draft model fills in
DECAY = 0.9  # weight an older tested token keeps at each newer one (a memory of ~10 tokens)
IDLE_DECAY = 0.97  # towards the prior, each step a request decodes without proposing


def acceptance_rate(accepted: int, proposed: int) -> float:
    return accepted / proposed if proposed else 0.0


def mean_accepted_length(accepted: int, drafts: int) -> float:
    """Tokens a verifying request gained per step: its accepted proposals plus the one sampled."""
    return 1.0 + accepted / drafts if drafts else 0.0


@dataclass(slots=True)
class SpeculationStats:
    num_drafts: int = 0  # verifications: a request's proposed tokens checked in a step
    num_draft_tokens: int = 0  # proposed tokens
    num_accepted_tokens: int = 0  # of them, accepted

    @property
    def acceptance_rate(self) -> float:
        return acceptance_rate(self.num_accepted_tokens, self.num_draft_tokens)

    @property
    def mean_accepted_length(self) -> float:
        return mean_accepted_length(self.num_accepted_tokens, self.num_drafts)


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
        self.drafted = config.method == "draft"  # proposals filled in by the worker's draft model
        self.stats = SpeculationStats()
        self._records: dict[str, _Record] = {}
        # every request's verifications together: where a new request's estimate starts (a draft
        # model's acceptance is mostly the pair's, not the request's)
        self._method = _Record()
        self._fit = [0.0] * 5  # weighted sums of 1, rows, rows^2, seconds, rows * seconds
        self._passes = [0.0, 0.0]  # weighted sums of a step's draft passes and their seconds

    def observe(self, rows: int, seconds: float) -> None:
        """A decode step's rows (tokens, proposals included) and the seconds its target forward
        took (a draft model's passes apart: `observe_draft`)."""
        fit = self._fit
        for i, value in enumerate((1.0, rows, rows * rows, seconds, rows * seconds)):
            fit[i] = fit[i] * FIT_DECAY + value

    def observe_draft(self, passes: int, seconds: float) -> None:
        """A step's draft-model passes and their seconds (not counted in `observe`'s)."""
        if passes > 0:
            self._passes[0] = self._passes[0] * FIT_DECAY + passes
            self._passes[1] = self._passes[1] * FIT_DECAY + seconds

    def _line(self) -> tuple[float, float] | None:
        """(intercept, slope) of decode steps' seconds against their rows, or None while the
        steps have not varied enough to fit a line."""
        n, x, xx, t, xt = self._fit
        spread = n * xx - x * x  # n^2 times the weighted variance of rows
        if n <= 0 or spread < FIT_MIN_VARIANCE * n * n:
            return None
        slope = (n * xt - x * t) / spread
        if slope <= 0:
            return None
        return (t - slope * x) / n, slope

    @property
    def fixed_rows(self) -> float:
        """A step's cost apart from its rows, in rows: the fitted intercept over the slope, or
        the prior while there is no line."""
        line = self._line()
        if line is None:
            return STEP_FIXED_ROWS
        low, high = FIXED_ROWS_RANGE
        return min(high, max(low, line[0] / line[1]))

    @property
    def pass_rows(self) -> float:
        """A draft pass's cost in rows (0 without a draft model): its measured seconds over a
        row's, or the prior until both are measured."""
        if not self.drafted:
            return 0.0
        line, (passes, seconds) = self._line(), self._passes
        if line is None or passes <= 0:
            return DRAFT_PASS_ROWS
        low, high = FIXED_ROWS_RANGE
        return min(high, max(0.0, seconds / passes / line[1]))

    def plan(self, decoding: list[Request], rows: int) -> dict[str, list[int]]:
        """Proposed tokens for some of `decoding` (requests about to decode one token; only those
        whose `speculate` is set may get any), in a step of about `rows` tokens."""
        if not decoding:
            return {}
        bets: list[tuple[float, int, int]] = []  # (-gain, index, j) of each request's next token
        proposals: list[list[int]] = []
        rates: list[float] = []
        fixed = self.fixed_rows
        floor = len(decoding) / (fixed + rows)  # a first proposed token's gain must beat it
        for i, request in enumerate(decoding):
            record = self._record(request.request_id)
            room = request.max_tokens - len(request.output_token_ids) - 1  # the last token is sampled
            proposal = []
            if request.speculate and room > 0 and record.rate > floor:  # else no lookup: it could not win
                if self.drafted:
                    proposal = [DRAFT_PLACEHOLDER] * min(self.k, room)
                else:
                    proposal = self.proposer.propose(request, min(self.k, room))
            proposals.append(proposal)
            rates.append(record.rate)
            if proposal:
                bets.append((-record.rate, i, 1))
        heapq.heapify(bets)
        expected = float(len(decoding))
        cost = fixed + rows  # the step's, in rows
        depth, pass_rows = 0, self.pass_rows  # draft passes the step has so far, and what one costs
        taken = [0] * len(decoding)
        while bets:
            neg_gain, i, j = heapq.heappop(bets)
            gain = -neg_gain
            more = 1.0 + (pass_rows if j > depth else 0.0)  # a row, and a draft pass at a new depth
            # it pays where the step's tokens per unit of time rise: (E + g) / (C + m) > E / C
            if gain * cost <= more * expected:
                if pass_rows == 0.0:
                    break  # every bet left gains less for the same cost
                continue  # a cheaper bet at a depth already paid for may still pay
            expected += gain
            cost += more
            depth = max(depth, j)
            taken[i] = j
            if j < len(proposals[i]):
                heapq.heappush(bets, (-gain * rates[i], i, j + 1))
        plan = {}
        for i, request in enumerate(decoding):
            if taken[i]:
                plan[request.request_id] = proposals[i][:taken[i]]
            else:  # not speculating: the estimate drifts back towards the prior
                record, prior = self._records[request.request_id], self._prior()
                record.accepted = prior.accepted + (record.accepted - prior.accepted) * IDLE_DECAY
                record.trials = prior.trials + (record.trials - prior.trials) * IDLE_DECAY
        return plan

    def record(self, request_id: str, proposed: int, accepted: int, doubted: bool = False) -> None:
        """A verification's outcome: `accepted` of `proposed` tokens, in order (the first
        refused one ends it). `doubted`: a draft model stopped proposing short of what was
        scheduled, which counts as one more refused token (its pass was spent for nothing)."""
        if proposed:
            self.stats.num_drafts += 1
            self.stats.num_draft_tokens += proposed
            self.stats.num_accepted_tokens += accepted
        record = self._record(request_id)
        trials = accepted + (1 if accepted < proposed or doubted else 0)  # tested: up to the first refusal
        keep = DECAY ** trials
        record.accepted = record.accepted * keep + accepted
        record.trials = record.trials * keep + trials
        method, keep = self._method, METHOD_DECAY ** trials
        method.accepted = method.accepted * keep + accepted
        method.trials = method.trials * keep + trials

    def _record(self, request_id: str) -> _Record:
        """A request's estimate, from the prior the first time it is asked for."""
        record = self._records.get(request_id)
        if record is None:
            record = self._records[request_id] = self._prior()
        return record

    def _prior(self) -> _Record:
        """A request's estimate before its own verifications: the method's recent rate, worth
        two observations."""
        return _Record(PRIOR_TRIALS * self._method.rate, PRIOR_TRIALS)

    def forget(self, request_id: str) -> None:
        self._records.pop(request_id, None)
        self.proposer.forget(request_id)
