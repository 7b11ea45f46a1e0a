"""ModelRunner: turns a SchedulerOutput into flat tensors, runs the model, samples.

It keeps what it needs of each request between steps (sampling settings, seeded generator,
token history for penalties) from the first time the request is scheduled until the
scheduler reports it finished; a preempted request keeps its state, so a seeded request
resumes its random stream where it stopped.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from surge.core.runner_output import ModelRunnerOutput, TokenLogprobs
from surge.core.scheduler_output import SchedulerOutput
from surge.layers.attention import AttentionMetadata, native_decode, native_prefill
from surge.layers.forward_context import ForwardContext, set_forward_context
from surge.layers.native_decoder import NativeDecoder
from surge.layers.rejection_sampler import verify
from surge.layers.sampler import Sampler, SamplingRow, token_logprobs
from surge.worker.draft_runner import DraftProposer
from surge.worker.reports import StepTimings

if TYPE_CHECKING:
    from surge.distributed.pipeline_parallel import PipelineStage


@dataclass(slots=True)
class _Step:
    """A step between its start (inputs prepared) and its finish (hidden states in)."""

    output: SchedulerOutput
    result: ModelRunnerOutput
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_rows: list[int]
    t0: float
    t1: float


PROMPT_LOGPROBS_ROWS = 256  # prompt positions scored per LM-head call (256 x 49k vocab: ~50 MB)


class ModelRunner:
    """Owns the KV cache tensors; `execute` runs one scheduled step."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        block_size: int,
        device: str,
        eos_ids: frozenset[int] = frozenset(),
        decoder: NativeDecoder | None = None,
        drafter: DraftProposer | None = None,
        driver: bool = True,
        holds_head: bool = True,
        stage: "PipelineStage | None" = None,
    ):
        self.model = model
        # the model's decoder when it is a pipeline stage: steps may start and finish apart
        self.stage = stage
        self._started: deque[_Step | None] = deque()
        # a later pipeline stage runs its layers and hands on: no LM head, nothing to sample
        self.holds_head = holds_head
        # the rank that samples; under tensor parallelism the others run the same forward and
        # LM-head calls (their collectives) and return nothing
        self.driver = driver
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.eos_ids = eos_ids
        self.sampler = Sampler()
        self.requests: dict[str, SamplingRow] = {}
        # mean-pooled embedding requests' hidden-state sums and counts so far, per chunk start (a
        # chunk re-run after a failure overwrites its own entry)
        self.pools: dict[str, dict[int, tuple[torch.Tensor, int]]] = {}
        self.timings = StepTimings()
        # Builds (or loads from its cache) the native decode kernel now, at load, not in the first step.
        self.native_decode = bool(kv_caches) and native_decode(kv_caches[0])
        self.native_prefill = self.native_decode and native_prefill(kv_caches[0])  # prompt chunks in one call
        self.decoder = decoder if self.native_decode else None  # a decode-only step's stack in one call
        self.drafter = drafter  # speculative method "draft": the model that fills in proposals

    def prepare(self, output: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """(input ids, positions, attention metadata, rows of the tokens to sample from)."""
        if self.native_decode and output.decode_only:
            return self._prepare_decode(output)
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        bs = self.block_size
        width = max((len(r.block_ids) for r in output.requests), default=1)
        tables = [r.block_ids + [0] * (width - len(r.block_ids)) for r in output.requests]
        for r in output.requests:
            n = len(r.token_ids)
            ids.extend(r.token_ids)
            pos = range(r.start_position, r.start_position + n)
            positions.extend(pos)
            table = r.block_ids
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            starts.append(starts[-1] + n)
            seq_lens.append(r.start_position + n)
            if r.sample:  # the last token's row, and a proposal's rows before it
                sample_rows.extend(range(starts[-1] - 1 - r.num_draft, starts[-1]))
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int64, device=dev),
            query_start_loc=starts,
            seq_lens=seq_lens,
            block_size=bs,
        )
        meta.split_decode(native=self.native_decode, native_prefill=self.native_prefill)
        return (
            torch.tensor(ids, dtype=torch.int64, device=dev),
            torch.tensor(positions, dtype=torch.int64, device=dev),
            meta,
            sample_rows,
        )

    def _prepare_decode(self, output: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """prepare() of a step in which every request decodes one token: the per-token values in
        one tensor (a batch-1 step's Python is measurable against its forward). A request that
        verifies proposed tokens brings a row for each, as if each were a sequence of its own
        with one new token: the same block table, the context up to its own position (every
        row's K/V is written before any row attends)."""
        bs, reqs = self.block_size, output.requests
        if any(r.num_draft for r in reqs):
            rows = [(r, j) for r in reqs for j in range(len(r.token_ids))]
        else:
            rows = [(r, 0) for r in reqs]
        positions = [r.start_position + j for r, j in rows]
        lens = [p + 1 for p in positions]
        values = torch.tensor([[r.token_ids[j] for r, j in rows], positions,
                               [r.block_ids[p // bs] * bs + p % bs for (r, _), p in zip(rows, positions)], lens],
                              dtype=torch.int64, device=self.device)
        ids, pos, slots, seq_lens = values.unbind(0)
        width = max(len(r.block_ids) for r in reqs)
        tables = torch.tensor([r.block_ids + [0] * (width - len(r.block_ids)) for r, _ in rows], dtype=torch.int64,
                              device=self.device)
        meta = AttentionMetadata(slots, tables, list(range(len(rows) + 1)), lens, bs)
        meta.set_decode_only(seq_lens)
        return ids, pos, meta, [i for i, (r, _) in enumerate(rows) if r.sample]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The model's hidden states, its attention layers reading the caches and `meta` from the
        forward context; a decode-only step goes to the native kernel as tensors (a DecodeBatch),
        through the native decoder stack where the model has one."""
        batch = meta.decode_batch() if self.native_decode else None
        if batch is not None and self.decoder is not None:
            return self.decoder(input_ids, positions, self.kv_caches, batch)
        with set_forward_context(ForwardContext(self.kv_caches, meta if batch is None else batch)):
            return self.model(input_ids, positions)

    @torch.inference_mode()
    def hidden_states(self, output: SchedulerOutput) -> tuple[torch.Tensor, AttentionMetadata]:
        """Run a schedule through the model without sampling (evaluation, calibration, tests):
        (hidden states of every scheduled token, the step's metadata)."""
        input_ids, positions, meta, _ = self.prepare(output)
        return self.forward(input_ids, positions, meta), meta

    def _update_states(self, output: SchedulerOutput) -> None:
        for request_id in output.finished_request_ids:
            self.requests.pop(request_id, None)
            self.pools.pop(request_id, None)
            if self.drafter is not None:
                self.drafter.forget(request_id)
        for request_id in output.preempted_request_ids:  # recomputed from its first token
            self.pools.pop(request_id, None)
            if self.drafter is not None:  # its blocks are gone: the draft's KV with them
                self.drafter.forget(request_id)
        for r in output.requests:
            # a step re-run after a failure resends `new`: the state (and its generator) stays
            if r.new is not None and r.request_id not in self.requests:
                params = r.new.sampling_params
                gen = None
                if params.seed is not None:
                    gen = torch.Generator(device="cpu").manual_seed(params.seed)
                self.requests[r.request_id] = SamplingRow(params, gen, r.new.prompt_token_ids, [])

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> ModelRunnerOutput:
        step = self._start(output)
        if step is None:
            return ModelRunnerOutput()
        hidden = self.forward(step.input_ids, step.positions, step.meta)
        return self._finish(step, hidden if self.holds_head else None)

    @torch.inference_mode()
    def start(self, output: SchedulerOutput) -> None:
        """The first half of a step whose forward is a pipeline's (`self.stage`): this stage's part
        of the forward, handed on; finish() completes the oldest step started. Steps start and
        finish in order, several may be between the two (batches in flight)."""
        assert self.stage is not None
        step = self._start(output)
        if step is not None:
            with set_forward_context(ForwardContext(self.kv_caches, step.meta)):
                self.stage.begin(step.input_ids, step.positions)
        self._started.append(step)

    @torch.inference_mode()
    def finish(self) -> ModelRunnerOutput:
        assert self.stage is not None
        step = self._started.popleft()
        if step is None:
            return ModelRunnerOutput()
        if not self.holds_head:  # a later stage: its part was all of it
            return self._finish(step, None)
        return self._finish(step, self.stage.end(step.input_ids.shape[0]))

    def _start(self, output: SchedulerOutput) -> _Step | None:
        """A step's inputs (None: nothing to run), the requests' states brought up to date."""
        self._update_states(output)
        result = ModelRunnerOutput()
        if not output.requests:
            return None
        if self.drafter is not None and any(r.num_draft for r in output.requests):
            start = time.perf_counter()
            contexts = {r.request_id: self.requests[r.request_id].context() for r in output.requests if r.num_draft}
            output = self.drafter.propose(output, contexts)  # the step with the draft's tokens in it
            result.draft_seconds = time.perf_counter() - start
            result.draft_passes, result.draft_pass_seconds = self.drafter.decode_passes, self.drafter.decode_seconds
            result.num_proposed = dict(self.drafter.proposed)
            self.timings.draft += result.draft_seconds
        t0 = time.perf_counter()
        input_ids, positions, meta, sample_rows = self.prepare(output)
        return _Step(output, result, input_ids, positions, meta, sample_rows, t0, time.perf_counter())

    def _finish(self, step: _Step, hidden: torch.Tensor | None) -> ModelRunnerOutput:
        """Logits, pooling, prompt logprobs and sampling of a step from its final hidden states
        (None on a pipeline stage without the LM head: nothing left to do)."""
        output, result, meta, sample_rows, t1 = step.output, step.result, step.meta, step.sample_rows, step.t1
        clock = self.timings
        if hidden is None:
            clock.prepare += t1 - step.t0
            clock.forward += time.perf_counter() - t1
            return result
        sampled = [r for r in output.requests if r.sample]
        if any(self.requests[r.request_id].params.pooling for r in output.requests):
            if self.driver:
                self._pool(output, hidden, meta, result)
            rows_of, start = [], 0  # each sampled request's rows in sample_rows (1 + its proposals)
            for r in sampled:
                rows_of.append(sample_rows[start:start + 1 + r.num_draft])
                start += 1 + r.num_draft
            keep = [k for k, r in enumerate(sampled) if self.requests[r.request_id].params.pooling is None]
            sampled, sample_rows = [sampled[k] for k in keep], [row for k in keep for row in rows_of[k]]
        rows = hidden if len(sample_rows) == hidden.shape[0] else hidden[sample_rows]  # all rows: in order
        logits = self.model.compute_logits(rows) if sampled else None
        if logits is not None and logits.device.type != "cpu":
            logits = logits.cpu()
        t2 = time.perf_counter()
        clock.prepare += t1 - step.t0
        clock.forward += t2 - t1
        self._prompt_logprobs(output, hidden, meta, result)
        if logits is None or not self.driver:
            clock.sample += time.perf_counter() - t2
            return result
        if any(r.num_draft for r in sampled):
            logits, sampled = self._verify(logits, sampled, result)
        rows = [self.requests[r.request_id] for r in sampled]
        if rows:
            allowed = [r.allowed for r in sampled] if any(r.allowed is not None for r in sampled) else None
            tokens, logprobs = self.sampler(logits, rows, self.eos_ids, allowed)
            for r, row, token, lp in zip(sampled, rows, tokens, logprobs):
                row.output_ids.append(token)
                result.sampled[r.request_id] = token
                if lp is not None:
                    result.logprobs[r.request_id] = lp
        clock.sample += time.perf_counter() - t2
        return result

    def _verify(self, logits: torch.Tensor, sampled: list, result: ModelRunnerOutput) -> tuple[torch.Tensor, list]:
        """The requests that proposed tokens verified (their tokens into `result`); returns the
        logits and requests left for the sampler, one row each."""
        if logits.dtype != torch.float32:
            logits = logits.float()
        plain_rows, plain = [], []
        start = 0
        for r in sampled:
            n = 1 + r.num_draft
            if r.num_draft:
                row = self.requests[r.request_id]
                tokens = verify(logits[start:start + n], row, r.token_ids[-r.num_draft:], self.eos_ids)
                if self.drafter is not None:
                    self.drafter.settle(r.request_id, r.start_position, r.num_draft, len(tokens) - 1)
                row.output_ids.extend(tokens)
                result.sampled[r.request_id] = tokens[0]
                result.more_tokens[r.request_id] = tokens[1:]
            else:
                plain_rows.append(start)
                plain.append(r)
            start += n
        return logits[plain_rows], plain

    def _pool(self, output: SchedulerOutput, hidden: torch.Tensor, meta: AttentionMetadata,
              result: ModelRunnerOutput) -> None:
        """Embedding requests: pool this chunk's final hidden states (float32); where the prompt
        ends, the request's vector, L2-normalised."""
        for i, r in enumerate(output.requests):
            mode = self.requests[r.request_id].params.pooling
            if mode is None or (mode == "last" and not r.sample):  # "last" needs only the prompt's end
                continue
            rows = hidden[meta.query_start_loc[i]: meta.query_start_loc[i + 1]].float()
            if mode == "last":
                vector = rows[-1]
            else:
                sums = self.pools.setdefault(r.request_id, {})
                sums[r.start_position] = (rows.sum(0), rows.shape[0])
                if not r.sample:
                    continue
                vector = torch.stack([v for v, _ in sums.values()]).sum(0) / sum(n for _, n in sums.values())
                del self.pools[r.request_id]
            result.pooled[r.request_id] = torch.nn.functional.normalize(vector, dim=0).tolist()

    def _prompt_logprobs(
        self, output: SchedulerOutput, hidden: torch.Tensor, meta: AttentionMetadata, result: ModelRunnerOutput
    ) -> None:
        """Score each prompt token from the logits of the position before it."""
        for i, r in enumerate(output.requests):
            state = self.requests[r.request_id]
            top_n = state.params.prompt_logprobs
            if top_n is None:
                continue
            prompt = state.prompt_ids
            last = min(r.start_position + len(r.token_ids), len(prompt) - 1)  # positions < last
            if last <= r.start_position:
                continue
            first = meta.query_start_loc[i]
            scores: list[TokenLogprobs] = []
            # in slices: logits of a whole 8k-token chunk at once would be 8k x vocab floats (GBs)
            for a in range(0, last - r.start_position, PROMPT_LOGPROBS_ROWS):
                b = min(a + PROMPT_LOGPROBS_ROWS, last - r.start_position)
                rows = torch.arange(first + a, first + b, device=hidden.device)
                logits = self.model.compute_logits(hidden[rows])
                if not self.driver:
                    continue
                logprobs = logits.cpu().float().log_softmax(-1)
                start = r.start_position + 1 + a
                targets = torch.tensor(prompt[start : start + b - a], dtype=torch.long)
                scores.extend(token_logprobs(logprobs, targets, [top_n] * len(targets)))
            result.prompt_logprobs[r.request_id] = scores
