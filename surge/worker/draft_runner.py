"""The draft model of speculative decoding (method "draft"): a smaller model with the target's
tokenizer proposes each speculating request's next tokens just before the target's forward
verifies them, in the same step.

The scheduler has already decided how many tokens each request may propose (`num_draft`) and
allocated their positions; the proposals arrive as placeholders at the end of the request's
`token_ids`, and `propose` gives the step back with the draft's tokens in their place. The
draft's KV cache has the target's blocks (the same number and size, its own tensors), so a
request's block table and slots serve both models.

What the draft has computed of each request is kept here: after a verification its KV is good
up to the last accepted proposal (`settle`); the positions after that, and all of a request
that starts speculating or was preempted, are computed by the next proposal's first pass
(catch-up, chunked to the step's token budget). Each later pass feeds the previous proposal,
one token a request, through the native decode step where the draft has one.

A request that starts speculating skips the blocks whose draft KV is already there: the
target's prefix cache hands it blocks another request filled, and where the draft computed
such a block for the same prefix (its chained hash, core/prefix_hash.py) the block's draft KV
is kept. Every draft write into a block forgets what the block held.

A proposal the draft itself doubts (its probability below `min_probability`, the config's
draft_p_min) ends the request's proposals there, as llama.cpp's --draft-p-min does: it would
likely be refused, and its row and the draft's later passes are saved. The request verifies
fewer tokens than the scheduler allowed (`proposed`, reported back with the step's output;
the speculator counts a doubt as a refusal).

Proposals are the draft's argmax, a one-hot q: the verifier accepts a proposal when the
target's own draw equals it, so the output is the target's distribution exactly and a seeded
request draws the same tokens as without speculation (layers/rejection_sampler.py).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence

import torch

from surge.core.prefix_hash import BlockHash, hash_block_tokens
from surge.core.scheduler_output import ScheduledRequest, SchedulerOutput


SHORT_CATCH_UP = 8  # a first pass whose requests each feed at most this many: rows of the decode step


class DraftProposer:
    def __init__(self, runner, vocab_size: int, max_chunk: int,  # noqa: ANN001 (a ModelRunner)
                 min_probability: float = 0.0, draft_vocab_size: int | None = None):
        self.runner = runner  # the draft model's runner: its model and KV caches
        self.min_probability = min_probability
        # the draft's embedding rows: a target id past them (padding the draft lacks) is fed as 0
        self.draft_vocab_size = draft_vocab_size or vocab_size
        self.block_size = runner.block_size
        self.vocab_size = vocab_size  # the target's: a draft id past it could not be verified
        self.max_chunk = max(1, max_chunk)  # tokens a catch-up pass takes at most
        self.computed: dict[str, int] = {}  # request id -> positions whose draft KV is good
        self.held: dict[int, BlockHash] = {}  # block id -> the full prefix block its draft KV is of
        self._hashes: dict[str, list[BlockHash]] = {}  # request id -> its context's full blocks' hashes
        # the last propose(): its passes of one token a request (a pass's cost without catch-up),
        # and how many tokens each request proposes (fewer than scheduled where the draft doubted)
        self.decode_passes = 0
        self.decode_seconds = 0.0
        self.proposed: dict[str, int] = {}

    @torch.inference_mode()
    def propose(self, output: SchedulerOutput, contexts: Mapping[str, Sequence[int]]) -> SchedulerOutput:
        """The step with the draft's tokens in place of the placeholders of every request with
        `num_draft` (fewer of them where the draft doubts: `proposed` says how many; `output`
        itself is left as the scheduler made it). `contexts` holds each request's known tokens
        (prompt and output), the last at its `start_position`. `decode_passes` and
        `decode_seconds` say how many draft passes fed one token a request, and their time."""
        self.decode_passes, self.decode_seconds, self.proposed = 0, 0.0, {}
        reqs = [r for r in output.requests if r.num_draft]
        if not reqs:
            return output
        proposals: dict[str, list[int]] = {r.request_id: [] for r in reqs}
        # first pass (and catch-up chunks): every position the draft lacks, through the current token
        cursor: dict[str, int] = {}
        for r in reqs:
            context = contexts[r.request_id]
            if len(context) != r.start_position + 1 or context[-1] != r.token_ids[0]:
                raise RuntimeError(f"request {r.request_id}: the draft's context ({len(context)} tokens) does not end "
                                   f"at the verified position {r.start_position}")
            done = self.computed.get(r.request_id)
            if done is None:
                done = self._kept(r, context)
            cursor[r.request_id] = min(done, r.start_position)
        while True:
            budget, step = self.max_chunk, []
            for r in reqs:
                start, end = cursor[r.request_id], r.start_position + 1
                if start >= end or (budget <= 0 and step):
                    continue
                n = min(end - start, max(budget, 1))
                tokens = [t if t < self.draft_vocab_size else 0 for t in contexts[r.request_id][start:start + n]]
                step.append(ScheduledRequest(r.request_id, tokens, start, r.block_ids, sample=start + n == end))
                cursor[r.request_id] = start + n
                budget -= n
            if not step:
                break
            if all(r.sample and len(r.token_ids) <= SHORT_CATCH_UP for r in step):
                for r in step:  # each token a row of the native decode step, as a verification's are
                    r.num_draft = len(r.token_ids) - 1
            for request_id, (token, prob) in self._timed(step, 1).items():
                if prob >= self.min_probability:
                    proposals[request_id].append(token)
        for r in reqs:  # the draft's KV is now good through the current token: its full blocks kept
            self.computed[r.request_id] = r.start_position + 1
            self._hold(r, contexts[r.request_id])
        # later passes: the previous proposal at the next position, for requests proposing that far
        for depth in range(2, max(r.num_draft for r in reqs) + 1):
            step = [ScheduledRequest(r.request_id, [proposals[r.request_id][-1]], r.start_position + depth - 1,
                                     r.block_ids, sample=True)
                    for r in reqs if r.num_draft >= depth and len(proposals[r.request_id]) == depth - 1]
            if not step:
                break
            for request_id, (token, prob) in self._timed(step, depth).items():
                if prob >= self.min_probability:
                    proposals[request_id].append(token)
        filled = {}
        for r in reqs:  # the placeholders become the proposals; those the draft doubted are dropped
            mine = proposals[r.request_id]
            self.proposed[r.request_id] = len(mine)
            filled[r.request_id] = dataclasses.replace(
                r, token_ids=r.token_ids[:len(r.token_ids) - r.num_draft] + mine, num_draft=len(mine))
        return dataclasses.replace(output, requests=[filled.get(r.request_id, r) for r in output.requests])

    def _timed(self, step: list[ScheduledRequest], depth: int) -> dict[str, tuple[int, float]]:
        """_run, forgetting what the blocks it writes held; a pass of one token a request timed."""
        bs = self.block_size
        for r in step:
            for i in range(r.start_position // bs, (r.start_position + len(r.token_ids) - 1) // bs + 1):
                self.held.pop(r.block_ids[i], None)
        if any(len(r.token_ids) != 1 + r.num_draft for r in step):  # a prompt's catch-up: not a pass's cost
            return self._run(step, depth)
        start = time.perf_counter()
        tokens = self._run(step, depth)
        self.decode_passes += 1
        self.decode_seconds += time.perf_counter() - start
        return tokens

    def _block_hashes(self, request_id: str, context: Sequence[int], count: int) -> list[BlockHash]:
        """The chained hashes of the context's first `count` full blocks (extended as it grows)."""
        hashes, bs = self._hashes.setdefault(request_id, []), self.block_size
        while len(hashes) < count:
            i = len(hashes)
            hashes.append(hash_block_tokens(hashes[-1] if hashes else None, context[i * bs:(i + 1) * bs]))
        return hashes[:count]

    def _kept(self, r: ScheduledRequest, context: Sequence[int]) -> int:
        """Positions at the start of a request whose draft KV its blocks already hold."""
        hashes = self._block_hashes(r.request_id, context, r.start_position // self.block_size)
        kept = 0
        for i, h in enumerate(hashes):
            held = self.held.get(r.block_ids[i])
            if held is None or not held.matches(h):
                break
            kept = i + 1
        return kept * self.block_size

    def _hold(self, r: ScheduledRequest, context: Sequence[int]) -> None:
        """The request's full blocks through its current token hold the draft's KV of its prefix."""
        hashes = self._block_hashes(r.request_id, context, (r.start_position + 1) // self.block_size)
        for i, h in enumerate(hashes):
            self.held[r.block_ids[i]] = h

    def _run(self, step: list[ScheduledRequest], depth: int) -> dict[str, tuple[int, float]]:
        """One forward of the draft over `step`: after each sampled request's last token, the
        argmax and the draft's probability of it, its proposal at `depth` (1: the first)."""
        runner = self.runner
        ids, positions, meta, _ = runner.prepare(SchedulerOutput(requests=step))
        hidden = runner.forward(ids, positions, meta)
        last, end = [], 0  # each sampled request's last row
        for r in step:
            end += len(r.token_ids)
            if r.sample:
                last.append(end - 1)
        logits = runner.model.compute_logits(hidden[last])[:, :self.vocab_size].float()
        best, tokens = logits.max(dim=-1)
        probs = (best - logits.logsumexp(dim=-1)).exp().tolist()
        return dict(zip((r.request_id for r in step if r.sample), zip(tokens.tolist(), probs)))

    def settle(self, request_id: str, position: int, num_draft: int, accepted: int) -> None:
        """A verification at `position` accepted `accepted` of `num_draft` proposals: the draft's
        KV is good through the last accepted one (the draft never fed its last proposal)."""
        self.computed[request_id] = position + min(accepted + 1, num_draft)

    def forget(self, request_id: str) -> None:
        self.computed.pop(request_id, None)
        self._hashes.pop(request_id, None)
