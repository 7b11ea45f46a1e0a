"""Continuous-batching scheduler: one rule on num_computed_tokens covers every case.

Each step hands out a token budget, first to running requests (in order), then to waiting
ones (in policy order). A scheduled request advances by the tokens it was given:

    new prompt          computed 0   -> gets min(prompt, budget)    (chunked prefill)
    prefix-cache hit    computed 400 -> gets the suffix only
    decoding            computed n-1 -> gets 1
    resumed (preempted) computed 0   -> recomputes prompt + output so far

When a running request needs a block and none is free, the lowest-priority running request
(the newest under FCFS) is preempted: its blocks are freed and it waits to be recomputed.

While some request is decoding, a prompt is prefilled at most `long_prefill_token_threshold`
tokens a step (vLLM's setting of that name), fewer deep into a long prompt where each token's
attention costs more (`attention_parity_tokens`: the context at which attention costs what the
linear layers do), so one 8k-token prompt costs every stream short steps instead of one long
one; alone, a prompt takes the whole budget.

    chunk at context s = threshold * parity / (parity + s)   (at least one block)
"""

from __future__ import annotations

import bisect
import enum
import itertools
from dataclasses import dataclass

from surge.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from surge.core.kv_cache_manager import KVCacheManager
from surge.core.request import FinishReason, Request, RequestStatus
from surge.core.scheduler_output import (
    NewRequestData,
    ScheduledRequest,
    SchedulerOutput,
)
from surge.core.speculation import Speculator
from surge.errors import InvalidArgumentError


class SchedulingPolicy(str, enum.Enum):
    FCFS = "fcfs"
    PRIORITY = "priority"


@dataclass(slots=True)
class SchedulerStats:
    num_preemptions: int = 0
    num_prompt_tokens: int = 0  # prompt tokens of admitted requests (cached ones included)
    num_computed_prompt_tokens: int = 0  # prompt tokens actually run through the model
    num_generated_tokens: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: CacheConfig, num_blocks: int,
                 speculative: SpeculativeConfig | None = None, max_in_flight: int = 1):
        self.config = config
        # steps the executor works on at once (a pipeline's stages): each step takes its share of
        # the requests, so the next one has some to run while this one is in the pipe
        self.max_in_flight = max_in_flight
        # proposes tokens for decoding requests; the runner verifies them (speculative decoding)
        self.speculator = Speculator(speculative) if speculative is not None else None
        self.long_prefill_token_threshold = config.long_prefill_token_threshold
        # 0: chunks of the threshold whatever the context
        self.attention_parity_tokens = config.attention_parity_tokens
        self.kv = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.block_size = cache.block_size
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.enable_chunked_prefill = config.enable_chunked_prefill
        self.policy = SchedulingPolicy(config.policy)
        self.waiting: list[Request] = []  # kept sorted by _key
        self.running: list[Request] = []
        self.stats = SchedulerStats()
        self._order = itertools.count()
        self._seq: dict[str, int] = {}
        self._sent: set[str] = set()  # requests the runner has seen
        self._finished_ids: list[str] = []
        # requests in a step whose result has not come back (update): never scheduled again, never
        # preempted until it has; the runner hears of one finished meanwhile once its step is back
        self.in_flight: set[str] = set()
        self._finished_in_flight: set[str] = set()

    @property
    def pool(self):
        return self.kv.pool

    def _key(self, request: Request) -> tuple:
        seq = self._seq[request.request_id]
        if self.policy is SchedulingPolicy.PRIORITY:
            return (request.priority, request.arrival, seq)
        return (request.arrival, seq)

    # ---- requests -----------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        lifetime = request.num_prompt_tokens + request.max_tokens
        needed = self.kv.blocks_for(lifetime)
        if needed > self.pool.num_blocks:
            raise InvalidArgumentError(
                f"request {request.request_id} needs {needed} KV blocks for prompt + max_tokens "
                f"({lifetime} tokens), the cache has {self.pool.num_blocks}; raise --kv-cache-memory "
                "or lower max_tokens"
            )
        if not self.enable_chunked_prefill and request.num_prompt_tokens > self.max_num_batched_tokens:
            raise InvalidArgumentError(
                f"the prompt has {request.num_prompt_tokens} tokens, more than max_num_batched_tokens "
                f"({self.max_num_batched_tokens}) without chunked prefill"
            )
        self._seq[request.request_id] = next(self._order)
        self._insert_waiting(request)

    def _insert_waiting(self, request: Request) -> None:
        bisect.insort(self.waiting, request, key=self._key)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request, reason: FinishReason) -> None:
        """Mark finished and free its blocks at once."""
        if request.is_finished:
            return
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self.kv.free(request)
        self._seq.pop(request.request_id, None)
        if self.speculator is not None:
            self.speculator.forget(request.request_id)
        if request.request_id in self._sent:
            self._sent.discard(request.request_id)
            if request.request_id in self.in_flight:
                self._finished_in_flight.add(request.request_id)
            else:
                self._finished_ids.append(request.request_id)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.stats.num_preemptions += 1
        self._insert_waiting(request)

    # ---- scheduling ---------------------------------------------------------------------

    def _prefill_cap(self, start: int) -> int:
        threshold, parity = self.long_prefill_token_threshold, self.attention_parity_tokens
        if not parity:
            return threshold
        return max(self.block_size, threshold * parity // (parity + start))

    def _chunk(self, wanted: int, budget: int, cap: int = 0) -> int:
        if cap and wanted > cap and self.enable_chunked_prefill:
            wanted = cap
        if wanted <= budget:
            return wanted
        return budget if self.enable_chunked_prefill else 0

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_request_ids=self._finished_ids)
        self._finished_ids = []
        budget = self.max_num_batched_tokens
        granted: dict[str, int] = {}  # request id -> tokens scheduled this step
        preempted: list[Request] = []
        decoding = [r for r in self.running if r.num_tokens - r.num_computed_tokens == 1]
        cap = self.long_prefill_token_threshold if decoding else 0
        drafts = self._plan_drafts(decoding, cap, budget)  # request id -> proposed tokens to verify

        share = self.max_num_seqs
        if self.max_in_flight > 1:
            share = max(1, -(-(len(self.running) + len(self.waiting)) // self.max_in_flight))
        i = 0
        while i < len(self.running) and budget > 0 and len(granted) < share:
            request = self.running[i]
            if request.request_id in self.in_flight:  # its tokens are not back yet
                i += 1
                continue
            remaining = request.num_tokens - request.num_computed_tokens
            draft = drafts.get(request.request_id)
            if draft and remaining < budget:  # a decoding request: its proposals as far as the budget goes
                del draft[budget - remaining:]
                num_new = remaining + len(draft)
            else:
                drafts.pop(request.request_id, None)
                num_new = self._chunk(remaining, budget, cap and self._prefill_cap(request.num_computed_tokens))
            if num_new <= 0:
                i += 1
                continue
            while self.kv.allocate_slots(request, num_new) is None:
                victim = max(self.running, key=self._key)
                if victim.request_id in self.in_flight:  # it is in a step not back yet: wait for it
                    drafts.pop(request.request_id, None)
                    i += 1
                    break
                victim_index = self.running.index(victim)
                self._preempt(victim)
                preempted.append(victim)
                drafts.pop(victim.request_id, None)
                budget += granted.pop(victim.request_id, 0)
                if victim is request:
                    break
                if victim_index < i:
                    i -= 1
            else:
                granted[request.request_id] = num_new
                budget -= num_new
                i += 1

        if not preempted:
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and len(granted) < share:
                request = self.waiting[0]
                computed, num_cached = self.kv.get_computed_blocks(request)
                num_new = self._chunk(request.num_tokens - num_cached, budget, cap and self._prefill_cap(num_cached))
                if num_new <= 0 or self.kv.allocate_slots(request, num_new, computed) is None:
                    break
                self.waiting.pop(0)
                if request.status is RequestStatus.WAITING:  # first admission, not a resume
                    request.num_cached_tokens = num_cached
                    self.stats.num_prompt_tokens += request.num_prompt_tokens
                    self.kv.stats.queries += request.num_prompt_tokens
                    self.kv.stats.hits += num_cached
                request.status = RequestStatus.RUNNING
                request.num_computed_tokens = num_cached
                self.running.append(request)
                granted[request.request_id] = num_new
                budget -= num_new

        for request in self.running:
            n = granted.get(request.request_id)
            if n is None:
                continue
            start = request.num_computed_tokens
            new = None
            if request.request_id not in self._sent:
                self._sent.add(request.request_id)
                new = NewRequestData(request.prompt_token_ids, request.sampling_params)
            draft = drafts.get(request.request_id, [])
            known = n - len(draft)
            prompt_part = max(0, min(start + known, request.num_prompt_tokens) - start)
            self.stats.num_computed_prompt_tokens += prompt_part
            out.requests.append(
                ScheduledRequest(
                    request_id=request.request_id,
                    token_ids=request.token_slice(start, start + known) + draft,
                    start_position=start,
                    block_ids=self.kv.block_ids(request.request_id),
                    sample=start + known == request.num_tokens,
                    new=new,
                    num_draft=len(draft),
                )
            )
        out.preempted_request_ids = [r.request_id for r in preempted]
        self.in_flight.update(r.request_id for r in out.requests)
        return out

    def _plan_drafts(self, decoding: list[Request], cap: int, budget: int) -> dict[str, list[int]]:
        """Proposed tokens for decoding requests this step (speculative decoding), sized against
        the step's other work: about one row per running request, a prompt's chunk per prefill."""
        if self.speculator is None or not decoding:
            return {}
        rows = sum(min(r.num_tokens - r.num_computed_tokens, cap or budget) for r in self.running)
        return self.speculator.plan(decoding, min(rows, budget))

    def update(self, output: SchedulerOutput, sampled: dict[str, int],
               more_tokens: dict[str, list[int]] | None = None,
               num_proposed: dict[str, int] | None = None) -> list[Request]:
        """Advance computed counts and append sampled tokens; return the requests that got some.
        A request that verified proposed tokens gets `sampled`'s token and `more_tokens`' (the
        accepted proposals and the one after them); its refused proposals are not computed: their
        KV is written over when those positions are computed again. `num_proposed`: requests
        that verified fewer proposals than scheduled (a draft model doubted the rest)."""
        for scheduled in output.requests:  # back: schedulable again (or, finished meanwhile, forgotten)
            self.in_flight.discard(scheduled.request_id)
            if scheduled.request_id in self._finished_in_flight:
                self._finished_in_flight.discard(scheduled.request_id)
                self._finished_ids.append(scheduled.request_id)
        by_id = {r.request_id: r for r in self.running}
        more_tokens = more_tokens or {}
        num_proposed = num_proposed or {}
        changed = []
        for scheduled in output.requests:
            request = by_id.get(scheduled.request_id)
            if request is None:  # finished or preempted meanwhile
                continue
            token = sampled.get(scheduled.request_id)
            if token is None:
                request.num_computed_tokens += len(scheduled.token_ids) - scheduled.num_draft
                continue
            more = more_tokens.get(scheduled.request_id, [])
            proposed = min(scheduled.num_draft, num_proposed.get(scheduled.request_id, scheduled.num_draft))
            if len(more) > proposed:
                raise ValueError(f"request {scheduled.request_id}: {len(more) + 1} tokens from "
                                 f"{proposed} proposed")
            request.num_computed_tokens += len(scheduled.token_ids) - scheduled.num_draft + len(more)
            request.output_token_ids.append(token)
            request.output_token_ids.extend(more)
            self.stats.num_generated_tokens += 1 + len(more)
            if scheduled.num_draft and self.speculator is not None:
                self.speculator.record(scheduled.request_id, proposed, len(more), proposed < scheduled.num_draft)
            changed.append(request)
        return changed

    def take_back(self, request: Request, num_tokens: int) -> None:
        """Drop a finished request's last `num_tokens` output tokens (a step's tokens past its stop)."""
        if num_tokens > 0:
            del request.output_token_ids[-num_tokens:]
            self.stats.num_generated_tokens -= num_tokens

    def all_blocks_free(self) -> bool:
        """Idle self-check: every block is free or evictable and no request holds any."""
        return not self.kv.req_blocks and self.pool.all_free()
