"""LLMEngine: add_request / step / abort, over an EngineCore (scheduler + executor) and an
OutputProcessor (stops, detokenization, logprobs, outputs).

    add_request: tokenize, validate -> OutputProcessor.add_request -> Scheduler
    step:        Scheduler.schedule -> EngineCore.execute (the executor, its workers) -> OutputProcessor.process

Everything outside the engine (server, repository, bench, eval) uses this class's public
methods and attributes: the configuration, the model's info and footprint, stats, timings.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from surge.config import SELF_DRAFTS, DraftModelConfig, EngineConfig
from surge.core.kv_cache_manager import PrefixCacheStats
from surge.core.scheduler import SchedulerStats
from surge.core.scheduler_output import SchedulerOutput
from surge.core.speculation import acceptance_rate, mean_accepted_length
from surge.engine.args import EngineArgs
from surge.engine.engine_core import MAX_FAILED_STEPS, EngineBrokenError, EngineCore, ReserveHook
from surge.engine.output_processor import OutputProcessor
from surge.errors import InvalidArgumentError
from surge.outputs import RequestOutput
from surge.sampling_params import RequestOutputKind, SamplingParams
from surge.structured.manager import StructuredOutputManager
from surge.tokenizer import Tokenizer
from surge.worker.reports import ModelInfo, StepTimings

logger = logging.getLogger(__name__)

__all__ = ["MAX_FAILED_STEPS", "EngineBrokenError", "EngineStats", "LLMEngine", "WarmupReport", "check_prompt",
           "decode_buckets", "split_prompt"]


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    kv_cache_usage: float
    prefix_cache_queries: int  # prompt tokens looked up
    prefix_cache_hits: int  # of those, found cached
    prefix_cache_hit_rate: float
    num_preemptions: int
    prompt_tokens: int
    computed_prompt_tokens: int  # prompt tokens actually run through the model (recomputes included)
    generation_tokens: int
    num_compiles: int = 0  # graphs compiled for the forward (with --compile)
    # speculative decoding: its method (None: off), verifications, proposed and accepted tokens
    spec_method: str | None = None
    spec_drafts: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0

    @property
    def spec_acceptance_rate(self) -> float:
        return acceptance_rate(self.spec_accepted_tokens, self.spec_draft_tokens)

    @property
    def spec_mean_accepted_length(self) -> float:
        return mean_accepted_length(self.spec_accepted_tokens, self.spec_drafts)


@dataclass
class WarmupReport:
    prefill_lengths: list[int]
    decode_batch_sizes: list[int]
    seconds: float


def decode_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes a decode step is shaped for: powers of two up to max_num_seqs, and it."""
    sizes, b = [], 1
    while b < max_num_seqs:
        sizes.append(b)
        b *= 2
    return sizes + [max_num_seqs]


def check_draft_tokenizer(tokenizer: Tokenizer, draft: DraftModelConfig) -> None:
    """A draft model must share the target's vocabulary: the same token for every id."""
    from surge.loader import load_tokenizer
    from surge.loader.hub import ModelSource

    load = draft.load
    if load.name in SELF_DRAFTS:  # the target itself, quantized
        return
    theirs = load_tokenizer(ModelSource(load.kind, load.path, load.name), draft.model)
    ours_vocab, their_vocab = tokenizer.backend.get_vocab(), theirs.backend.get_vocab()
    if ours_vocab != their_vocab:
        differ = sorted(set(ours_vocab.items()) ^ set(their_vocab.items()), key=lambda kv: kv[1])
        example = f"; e.g. id {differ[0][1]} is {differ[0][0]!r} in one of them" if differ else ""
        raise InvalidArgumentError(
            f"speculative_config: the draft model {load.name!r} has another vocabulary than the target "
            f"({len(their_vocab)} tokens against {len(ours_vocab)}{example}); a draft must use the target's tokenizer")


def split_prompt(tokenizer: Tokenizer, prompt: str | list[int]) -> tuple[str | None, list[int]]:
    """A prompt's text (None for token ids) and its token ids."""
    if isinstance(prompt, str):
        return prompt, tokenizer.encode(prompt)
    return None, [int(t) for t in prompt]


def check_prompt(ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int,
                 structured: StructuredOutputManager) -> int:
    """Check a prompt against the vocabulary and context (and compile its grammar, cached in
    `structured`); return its effective max_tokens. Raises InvalidArgumentError."""
    if not ids:
        raise InvalidArgumentError("the prompt is empty")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidArgumentError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    room = max_model_len - len(ids)
    if params.pooling is not None:  # an embedding: the prompt alone, nothing generated
        if room < 0:
            raise InvalidArgumentError(
                f"the input has {len(ids)} tokens; the model's context is {max_model_len} tokens")
        return 1
    if room <= 0:
        raise InvalidArgumentError(
            f"the prompt has {len(ids)} tokens; the model's context is {max_model_len} tokens"
        )
    max_tokens = room if params.max_tokens is None else params.max_tokens
    if max_tokens > room:
        raise InvalidArgumentError(
            f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's context "
            f"of {max_model_len} tokens"
        )
    bad_bias = [t for t in (params.logit_bias or {}) if not 0 <= t < vocab_size]
    if bad_bias:
        raise InvalidArgumentError(f"logit_bias token id {bad_bias[0]} is outside the vocabulary")
    if params.structured_outputs is not None:
        structured.grammar(params.structured_outputs)  # compiled (or refused) here, then cached
    return max_tokens


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer | None = None, reserve: ReserveHook | None = None):
        from surge.loader import load_tokenizer
        from surge.loader.hub import ModelSource

        if config.parallel.replicated:
            raise InvalidArgumentError(
                f"data_parallel_size {config.parallel.data_parallel_size}, max_replicas or the ray backend: replicas "
                f"run behind `surge serve --data-parallel-size` (--max-replicas, --distributed-executor-backend ray); "
                f"LLM(...) and LLMEngine run one engine")
        self.config = config
        self.model_config = config.model
        load = config.load
        self.tokenizer: Tokenizer = tokenizer or load_tokenizer(ModelSource(load.kind, load.path, load.name),
                                                                config.model)
        self.eos_ids = frozenset(config.model.eos_token_ids) | frozenset(self.tokenizer.eos_token_ids)
        if config.draft is not None:  # before any weight is read
            check_draft_tokenizer(self.tokenizer, config.draft)
        self.core = EngineCore(config, self.eos_ids, reserve)
        self.scheduler = self.core.scheduler
        # steps submitted and not collected yet (a pipeline works on up to max_in_flight at once)
        self._in_flight: deque[tuple[SchedulerOutput, Any]] = deque()
        self.model_info: ModelInfo = self.core.model_info
        self.structured = StructuredOutputManager(self.tokenizer, config.model.vocab_size, self.eos_ids)
        self.processor = OutputProcessor(self.tokenizer, self.scheduler, self.eos_ids, self.structured)
        self.max_model_len = config.scheduler.max_model_len
        self.max_num_seqs = config.scheduler.max_num_seqs
        self.block_size = config.cache.block_size
        self.capacity_tokens = self.scheduler.pool.num_blocks * self.block_size
        self.vocab_size = config.model.vocab_size
        self._ids = itertools.count()

    @classmethod
    def from_engine_args(cls, args: EngineArgs, reserve: ReserveHook | None = None) -> "LLMEngine":
        return cls(args.create_engine_config(), reserve=reserve)

    # ---- requests -----------------------------------------------------------------------

    def tokenize_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        return split_prompt(self.tokenizer, prompt)

    def validate(self, ids: list[int], params: SamplingParams) -> int:
        """Check a prompt against the vocabulary and context; return its effective max_tokens."""
        return check_prompt(ids, params, self.vocab_size, self.max_model_len, self.structured)

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        prompt_text: str | None = None,
    ) -> str:
        """Queue a prompt (text or token ids); returns its request id. Raises on bad input,
        leaving nothing queued. `prompt_text` names the text of a pre-tokenized prompt."""
        params = params or SamplingParams()
        text, ids = self.tokenize_prompt(prompt)
        text = text if text is not None else prompt_text
        max_tokens = self.validate(ids, params)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.processor:
            raise InvalidArgumentError(f"request id {request_id!r} is already in use")
        self.processor.add_request(request_id, text, ids, params, max_tokens, priority)
        return request_id

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its blocks; unknown ids are ignored."""
        self.processor.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._in_flight)

    def token_text(self, token_id: int) -> str:
        return self.processor.token_text(token_id)

    # ---- stepping -----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; return outputs of the requests that progressed."""
        if self.core.executor.max_in_flight > 1:
            return self._step_pipelined()
        t0 = time.perf_counter()
        scheduled = self.scheduler.schedule()
        if not scheduled.requests and not scheduled.finished_request_ids:
            return []
        if self.structured.active:
            self.structured.fill(scheduled, deferred=self.core.executor.in_process)
        clock = self.core.timings
        t1 = time.perf_counter()
        clock.schedule += t1 - t0
        result, culprits = self.core.execute(scheduled)
        t2 = time.perf_counter()
        clock.execute += t2 - t1
        speculator = self.scheduler.speculator
        if speculator is not None and not culprits:
            if scheduled.decode_only:
                rows = sum(len(r.token_ids) - r.num_draft + result.num_proposed.get(r.request_id, r.num_draft)
                           for r in scheduled.requests)  # a draft model may have proposed fewer
                speculator.observe(rows, t2 - t1 - result.draft_seconds)
            speculator.observe_draft(result.draft_passes, result.draft_pass_seconds)
        outputs = self.processor.process(scheduled, result, culprits)
        clock.postprocess += time.perf_counter() - t2
        clock.steps += 1
        return outputs

    def _step_pipelined(self) -> list[RequestOutput]:
        """One call of the engine loop with steps in flight: submit a step while the pipeline has
        room and the scheduler has work (it never schedules a request whose step is not back),
        else collect the oldest step and return its outputs."""
        clock = self.core.timings
        if len(self._in_flight) < self.core.executor.max_in_flight:
            t0 = time.perf_counter()
            scheduled = self.scheduler.schedule()
            if scheduled.requests or scheduled.finished_request_ids:
                if self.structured.active:
                    self.structured.fill(scheduled, deferred=self.core.executor.in_process)
                t1 = time.perf_counter()
                clock.schedule += t1 - t0
                self._in_flight.append((scheduled, self.core.executor.submit(scheduled)))
                clock.execute += time.perf_counter() - t1
                if scheduled.requests and len(self._in_flight) < self.core.executor.max_in_flight:
                    return []  # room for another step: the caller comes back at once
        if not self._in_flight:
            return []
        scheduled, handle = self._in_flight.popleft()
        t1 = time.perf_counter()
        result = self.core.executor.collect(handle)
        t2 = time.perf_counter()
        clock.execute += t2 - t1
        outputs = self.processor.process(scheduled, result, [])
        clock.postprocess += time.perf_counter() - t2
        clock.steps += 1
        return outputs

    # ---- warm-up ------------------------------------------------------------------------

    def warm_up(self, prefill_lengths: tuple[int, ...] = (4, 16, 128, 512)) -> WarmupReport:
        """Run every decode batch bucket and some prefill shapes once, then forget them.

        The first call of a shape pays for kernel selection, allocator growth and (where the
        runner compiles) compilation; doing it here keeps that off the first users' latency.
        Must run before the engine serves: it drives step() itself and resets the counters.
        A prefill of 4 tokens is there because steps of at most 8 rows take the packed
        quantized kernels, a graph of their own under --compile.
        """
        if self.has_unfinished_requests():
            raise RuntimeError("warm_up() must run on an idle engine")
        start = time.perf_counter()
        greedy = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        seeds = itertools.count(1)

        def prompt(n: int) -> list[int]:  # distinct prompts, so no prefix-cache hit shortens one
            first = next(seeds) * 7919
            return [(first + i) % self.vocab_size for i in range(n)]

        limit = min(self.max_model_len - 2, self.scheduler.max_num_batched_tokens,
                    self.capacity_tokens - self.block_size)
        prefills = sorted({min(n, limit) for n in prefill_lengths if n > 0})
        for n in prefills:
            self._run_to_end([prompt(n)], greedy)
        # decode buckets: as many one-token prompts as the bucket (one block each, while the cache
        # holds them), so the step after their prefill decodes exactly that batch size
        buckets = [b for b in decode_buckets(self.scheduler.max_num_seqs) if b <= self.scheduler.pool.num_blocks]
        for b in buckets:
            self._run_to_end([prompt(1) for _ in range(b)], greedy)
        self.scheduler.pool.reset_prefix_cache()
        self.scheduler.stats = SchedulerStats()
        self.scheduler.kv.stats = PrefixCacheStats()
        self.core.finish_warmup()
        return WarmupReport(prefills, buckets, time.perf_counter() - start)

    def _run_to_end(self, prompts: list[list[int]], params: SamplingParams) -> None:
        ids = [self.add_request(p, params, request_id=f"warmup-{next(self._ids)}") for p in prompts]
        try:
            while self.has_unfinished_requests():
                self.step()
        except BaseException:
            for request_id in ids:
                self.abort_request(request_id)
            raise

    # ---- observability ------------------------------------------------------------------

    def stats(self) -> EngineStats:
        s, kv = self.scheduler, self.scheduler.kv
        return EngineStats(
            num_running=len(s.running),
            num_waiting=len(s.waiting),
            kv_blocks_used=kv.pool.num_used,
            kv_blocks_total=kv.pool.num_blocks,
            kv_cache_usage=kv.usage(),
            prefix_cache_queries=kv.stats.queries,
            prefix_cache_hits=kv.stats.hits,
            prefix_cache_hit_rate=kv.stats.hit_rate,
            num_preemptions=s.stats.num_preemptions,
            prompt_tokens=s.stats.num_prompt_tokens,
            computed_prompt_tokens=s.stats.num_computed_prompt_tokens,
            generation_tokens=s.stats.num_generated_tokens,
            num_compiles=self.core.num_compiles,
            **self._spec_stats(),
        )

    def _spec_stats(self) -> dict:
        spec = self.scheduler.speculator
        if spec is None:
            return {}
        return dict(spec_method=spec.method, spec_drafts=spec.stats.num_drafts,
                    spec_draft_tokens=spec.stats.num_draft_tokens,
                    spec_accepted_tokens=spec.stats.num_accepted_tokens)

    def timings(self) -> StepTimings:
        """Where the steps since the last reset spent their time, the workers' parts included."""
        return self.core.worker_timings()

    def reset_timings(self) -> None:
        self.core.reset_timings()

    def memory_bytes(self) -> int:
        """The model's measured footprint: weights and KV cache."""
        return self.model_info.memory_bytes

    def check_health(self) -> None:
        """Raises EngineDeadError when the workers cannot serve any more."""
        self.core.executor.check_health()

    def on_failure(self, callback) -> None:  # type: ignore[no-untyped-def]
        """`callback(error)` once the executor loses a worker (from another thread)."""
        self.core.executor.on_failure(callback)

    def shutdown(self) -> None:
        """Stop the workers (a worker process exits); the engine serves no more."""
        self.core.shutdown()

    def is_idle_clean(self) -> bool:
        """Self-check: with nothing running, every KV block is free or evictable."""
        return not self.has_unfinished_requests() and not len(self.processor) and self.scheduler.all_blocks_free()
