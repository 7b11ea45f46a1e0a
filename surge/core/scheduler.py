"""Continuous-batching scheduler: one rule on num_computed_tokens covers prefill and decode.

Every step each running request is given the tokens it has not computed yet (its whole prompt
on the first step, one token afterwards); waiting requests are admitted in arrival order while
the token budget, the sequence limit and free KV blocks allow.
"""

from __future__ import annotations

from collections import deque

from surge.core.block_pool import BlockPool
from surge.core.request import FinishReason, Request, RequestStatus
from surge.core.scheduler_output import ScheduledRequest, SchedulerOutput
from surge.errors import InvalidArgumentError


class Scheduler:
    def __init__(self, num_blocks: int, block_size: int, max_num_seqs: int, max_num_batched_tokens: int):
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_ids: list[str] = []

    def add_request(self, request: Request) -> None:
        needed = self._blocks_for(len(request.prompt_token_ids) + request.max_tokens)
        if needed > self.pool.num_blocks:
            raise InvalidArgumentError(
                f"request {request.request_id} needs {needed} KV blocks for prompt + max_tokens, "
                f"the cache has {self.pool.num_blocks}; raise --kv-cache-memory or lower max_tokens"
            )
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _grow(self, request: Request, num_tokens: int) -> bool:
        """Give `request` blocks for `num_tokens` tokens in total; False if the pool is short."""
        extra = self._blocks_for(num_tokens) - len(request.block_ids)
        if extra <= 0:
            return True
        if extra > self.pool.num_free:
            return False
        request.block_ids.extend(self.pool.allocate(extra))
        return True

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_request_ids=self._finished_ids)
        self._finished_ids = []
        budget = self.max_num_batched_tokens
        for request in self.running:
            new = request.num_tokens - request.num_computed_tokens
            if new <= 0 or budget < new:
                continue
            if not self._grow(request, request.num_tokens):
                raise MemoryError("KV cache exhausted by running requests (preemption is not implemented)")
            out.requests.append(self._scheduled(request, new))
            budget -= new
        while self.waiting and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            new = request.num_tokens - request.num_computed_tokens
            # A request's whole lifetime is reserved up front so running ones never run out.
            lifetime = len(request.prompt_token_ids) + request.max_tokens
            if new > budget and out.requests:
                break
            if self._blocks_for(lifetime) > self.pool.num_free:
                break
            self.waiting.popleft()
            self._grow(request, lifetime)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.requests.append(self._scheduled(request, new))
            budget -= new
        return out

    def _scheduled(self, request: Request, new: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=request.all_token_ids[start : start + new],
            start_position=start,
            block_ids=list(request.block_ids),
            sample=True,
        )

    def update(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance computed counts and append sampled tokens; return the requests that changed."""
        by_id = {r.request_id: r for r in self.running}
        changed = []
        for scheduled in output.requests:
            request = by_id[scheduled.request_id]
            request.num_computed_tokens += len(scheduled.token_ids)
            if scheduled.request_id in sampled:
                request.output_token_ids.append(sampled[scheduled.request_id])
                changed.append(request)
        return changed

    def finish(self, request: Request, reason: FinishReason) -> None:
        """Mark finished and free its blocks at once."""
        if request.is_finished:
            return
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.pool.free(request.block_ids)
        request.block_ids = []
        self._finished_ids.append(request.request_id)

    def all_blocks_free(self) -> bool:
        return self.pool.all_free()
