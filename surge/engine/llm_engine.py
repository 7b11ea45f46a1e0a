"""LLMEngine: add_request / step / abort over the scheduler (core/) and the model runner (worker/).

A user request with n > 1 becomes n scheduler requests (its children) over the same prompt;
prefix caching makes them share the prompt's KV blocks. Outputs are assembled per user
request, cumulative, as deltas for streaming, or once at the end.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass, field

import torch

from surge.config import CacheConfig
from surge.core.kv_cache_manager import PrefixCacheStats
from surge.core.request import FinishReason, Request
from surge.core.scheduler import Scheduler, SchedulerStats, SchedulingPolicy
from surge.core.scheduler_output import SchedulerOutput
from surge.engine.detokenizer import RequestDetokenizer
from surge.errors import InvalidArgumentError
from surge.layers.sampler import TokenLogprobs
from surge.loader import LoadedModel
from surge.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from surge.sampling_params import RequestOutputKind, SamplingParams
from surge.tokenizer import Tokenizer
from surge.worker.kv_cache import allocate_kv_caches, cache_dtype, num_kv_blocks
from surge.worker.model_runner import ModelRunner, ModelRunnerOutput, StepTimings

logger = logging.getLogger(__name__)

# What a failing request can raise: any Exception, and the panics of Rust extensions (the
# tokenizer's pyo3 PanicException derives from BaseException); never KeyboardInterrupt or SystemExit.
_FATAL = (KeyboardInterrupt, SystemExit, GeneratorExit)


def _check_recoverable(exc: BaseException) -> None:
    if isinstance(exc, _FATAL):
        raise exc


MAX_FAILED_STEPS = 8  # single-request steps failing in a row before the engine calls itself broken


class EngineBrokenError(RuntimeError):
    """A step failed for reasons no request explains (the model, the device): the engine stops."""


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


@dataclass
class _Child:
    """Engine-side state of one completion (one scheduler request)."""

    request: Request
    index: int
    detok: RequestDetokenizer | None
    logprobs: list[PositionLogprobs] | None
    cumulative_logprob: float | None
    sent_text: int = 0
    sent_tokens: int = 0
    sent_finished: bool = False


@dataclass
class _Parent:
    """One user request: its prompt, settings and n children."""

    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    children: list[_Child] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    prompt_logprobs_sent: bool = False

    @property
    def finished(self) -> bool:
        return all(c.request.is_finished for c in self.children)


class LLMEngine:
    def __init__(
        self,
        loaded: LoadedModel,
        cache: CacheConfig | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        device: str = "cpu",
        enable_prefix_caching: bool = True,
        enable_chunked_prefill: bool = True,
        scheduling_policy: SchedulingPolicy | str = "fcfs",
        long_prefill_token_threshold: int = 256,
        compile: bool = False,
    ):
        self.loaded = loaded
        self.config = loaded.config
        self.tokenizer: Tokenizer = loaded.tokenizer
        self.max_model_len = loaded.config.max_position_embeddings
        cache = cache or CacheConfig()
        kv_dtype = cache_dtype(cache, loaded.dtype)
        num_blocks = num_kv_blocks(loaded.config, cache, kv_dtype, device)
        kv_caches = allocate_kv_caches(loaded.config, num_blocks, cache.block_size, kv_dtype, device)
        self.block_size = cache.block_size
        self.capacity_tokens = num_blocks * cache.block_size
        logger.info(
            "KV cache: %d blocks of %d tokens = %d tokens (%s)",
            num_blocks, cache.block_size, self.capacity_tokens, str(kv_dtype).removeprefix("torch."),
        )
        self.eos_ids = frozenset(loaded.config.eos_token_ids) | frozenset(self.tokenizer.eos_token_ids)
        model = loaded.model
        if compile:
            from surge.worker.compiled import CompiledModel

            model = CompiledModel(loaded.model, self.max_model_len)  # type: ignore[assignment]
        self.compiled = model if compile else None
        self.runner = ModelRunner(model, kv_caches, cache.block_size, device, self.eos_ids)
        self.scheduler = Scheduler(
            num_blocks, cache.block_size, max_num_seqs, max_num_batched_tokens,
            enable_chunked_prefill=enable_chunked_prefill, enable_prefix_caching=enable_prefix_caching,
            policy=scheduling_policy, long_prefill_token_threshold=long_prefill_token_threshold,
            attention_parity_tokens=loaded.config.attention_parity_tokens,
        )
        self.vocab_size = loaded.config.vocab_size
        self._parents: dict[str, _Parent] = {}
        self._child_parent: dict[str, tuple[_Parent, _Child]] = {}
        self._ids = itertools.count()
        self._token_texts: dict[int, str] = {}
        self._failed_steps = 0  # consecutive steps whose every request failed

    # ---- requests -----------------------------------------------------------------------

    def tokenize_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        return None, [int(t) for t in prompt]

    def validate(self, ids: list[int], params: SamplingParams) -> int:
        """Check a prompt against the vocabulary and context; return its effective max_tokens."""
        if not ids:
            raise InvalidArgumentError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidArgumentError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        room = self.max_model_len - len(ids)
        if room <= 0:
            raise InvalidArgumentError(
                f"the prompt has {len(ids)} tokens; the model's context is {self.max_model_len} tokens"
            )
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if max_tokens > room:
            raise InvalidArgumentError(
                f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's context "
                f"of {self.max_model_len} tokens"
            )
        bad_bias = [t for t in (params.logit_bias or {}) if not 0 <= t < self.vocab_size]
        if bad_bias:
            raise InvalidArgumentError(f"logit_bias token id {bad_bias[0]} is outside the vocabulary")
        return max_tokens

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
        if request_id in self._parents:
            raise InvalidArgumentError(f"request id {request_id!r} is already in use")
        parent = _Parent(request_id, text, ids, params)
        if params.prompt_logprobs is not None:
            parent.prompt_logprobs = [None]
        now = time.monotonic()
        children = []
        for i in range(params.n):
            child_params = params
            if params.n > 1 and params.seed is not None:
                seed = params.seed + i  # wraps inside 64 bits: 2^64 - 1 + 1 -> 0
                child_params = dataclasses.replace(params, seed=seed - 2**64 if seed >= 2**64 else seed)
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            request = Request(
                child_id, ids, max_tokens, child_params, now, priority,
                skip_prefix_cache=(i == 0 and params.prompt_logprobs is not None),
            )
            if i > 0:
                request.sampling_params = dataclasses.replace(child_params, prompt_logprobs=None)
            needs_text = bool(params.stop) or params.output_kind is not RequestOutputKind.FINAL_ONLY
            detok = RequestDetokenizer(self.tokenizer, ids, params) if needs_text else None
            want_lp = params.logprobs is not None
            children.append(_Child(request, i, detok, [] if want_lp else None, 0.0 if want_lp else None))
        added: list[Request] = []
        try:
            for child in children:
                self.scheduler.add_request(child.request)
                added.append(child.request)
        except BaseException:
            for request in added:
                self.scheduler.finish(request, FinishReason.ABORT)
            raise
        parent.children = children
        self._parents[request_id] = parent
        for child in children:
            self._child_parent[child.request.request_id] = (parent, child)
        return request_id

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its blocks; unknown ids are ignored."""
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return
        for child in parent.children:
            self.scheduler.finish(child.request, FinishReason.ABORT)
            self._child_parent.pop(child.request.request_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- stepping -----------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; return outputs of the requests that progressed."""
        t0 = time.perf_counter()
        scheduled = self.scheduler.schedule()
        if not scheduled.requests and not scheduled.finished_request_ids:
            return []
        clock = self.runner.timings
        t1 = time.perf_counter()
        clock.schedule += t1 - t0
        outputs: list[RequestOutput] = []
        result = self._execute(scheduled, outputs)
        t2 = time.perf_counter()
        touched: dict[str, _Parent] = {}
        for request_id, scores in result.prompt_logprobs.items():
            parent, _ = self._child_parent[request_id]
            assert parent.prompt_logprobs is not None
            try:
                parent.prompt_logprobs.extend(self._position_logprobs(s) for s in scores)
            except BaseException as exc:  # this request fails alone
                _check_recoverable(exc)
                outputs.append(self._fail(parent, exc))
        now = time.monotonic()
        for request in self.scheduler.update(scheduled, result.sampled):
            if request.first_token_time is None:
                request.first_token_time = now
            parent, child = self._child_parent[request.request_id]
            try:
                token = request.output_token_ids[-1]
                lp = result.logprobs.get(request.request_id)
                if lp is not None and child.logprobs is not None:
                    child.logprobs.append(self._position_logprobs(lp))
                    child.cumulative_logprob = (child.cumulative_logprob or 0.0) + lp.logprob
                self._check_stop(child, token)
                touched[parent.request_id] = parent
            except BaseException as exc:
                _check_recoverable(exc)
                touched.pop(parent.request_id, None)
                outputs.append(self._fail(parent, exc))
        for parent in touched.values():
            if parent.request_id not in self._parents:  # failed meanwhile (a sibling's error)
                continue
            try:
                out = self._make_output(parent)
            except BaseException as exc:
                _check_recoverable(exc)
                outputs.append(self._fail(parent, exc))
                continue
            if out is not None:
                outputs.append(out)
            if parent.finished:
                self._forget(parent)
        clock.postprocess += time.perf_counter() - t2
        clock.steps += 1
        return outputs

    # ---- failure isolation --------------------------------------------------------------

    def _execute(self, scheduled: SchedulerOutput, outputs: list[RequestOutput]) -> ModelRunnerOutput:
        """Run the step; if it raises, run each request alone, fail those that still raise and
        keep the rest, so one bad request never takes the batch (or the engine) with it.

        Raises EngineBrokenError when the failure is not any request's: several requests
        scheduled and every one fails alone, or single-request steps keep failing.
        """
        try:
            result = self.runner.execute(scheduled)
            self._failed_steps = 0
            return result
        except BaseException as exc:  # isolated below
            _check_recoverable(exc)
            first_error = exc
        # blocks cached for this step may hold garbage now
        self.scheduler.pool.reset_prefix_cache()
        logger.warning("a step of %d requests failed (%s: %s); running each alone",
                       len(scheduled.requests), type(first_error).__name__, first_error)
        result = ModelRunnerOutput()
        culprits: list[tuple[str, BaseException]] = []
        for request in scheduled.requests:
            try:
                part = self.runner.execute(SchedulerOutput(requests=[request]))
            except BaseException as exc:
                _check_recoverable(exc)
                culprits.append((request.request_id, exc))
                continue
            result.sampled.update(part.sampled)
            result.logprobs.update(part.logprobs)
            result.prompt_logprobs.update(part.prompt_logprobs)
        everyone = len(culprits) == len(scheduled.requests)
        self._failed_steps = self._failed_steps + 1 if everyone else 0
        if everyone and (len(culprits) > 1 or self._failed_steps >= MAX_FAILED_STEPS):
            self._failed_steps = 0
            raise EngineBrokenError(f"every request of the step fails: {type(first_error).__name__}: "
                                    f"{first_error}") from first_error
        for request_id, exc in culprits:
            logger.error("request %s failed in the engine and was ended: %s: %s",
                         request_id, type(exc).__name__, exc, exc_info=exc)
            entry = self._child_parent.get(request_id)
            if entry is not None and entry[0].request_id in self._parents:
                outputs.append(self._fail(entry[0], exc))
        return result

    def _fail(self, parent: _Parent, exc: BaseException) -> RequestOutput:
        """End a user request (all its children) with finish_reason "error" and say why."""
        message = f"the engine failed on this request: {type(exc).__name__}: {exc}"
        for child in parent.children:
            self.scheduler.finish(child.request, FinishReason.ERROR)
        self._forget(parent)
        completions = [CompletionOutput(c.index, "", [], FinishReason.ERROR.value) for c in parent.children]
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_ids, completions, True,
                             error=message)

    def _forget(self, parent: _Parent) -> None:
        self._parents.pop(parent.request_id, None)
        for child in parent.children:
            self._child_parent.pop(child.request.request_id, None)

    def token_text(self, token_id: int) -> str:
        """One token's text (special tokens included), decoded once per id: an 8k-token echo with
        20 alternatives asks for 170k of them."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def _position_logprobs(self, lp: TokenLogprobs) -> PositionLogprobs:
        text = self.token_text
        out = {lp.token_id: Logprob(lp.logprob, lp.rank, text(lp.token_id))}
        for rank, (tid, value) in enumerate(zip(lp.top_ids, lp.top_logprobs), start=1):
            if tid not in out:
                out[tid] = Logprob(value, rank, text(tid))
        return out

    def _check_stop(self, child: _Child, token: int) -> None:
        request, params = child.request, child.request.sampling_params
        stop_string = child.detok.add(token) if child.detok is not None else None
        count = len(request.output_token_ids)
        reason: FinishReason | None = None
        if stop_string is not None:
            reason, request.stop_reason = FinishReason.STOP, stop_string
        elif count >= params.min_tokens and token in params.stop_token_ids:
            reason, request.stop_reason = FinishReason.STOP, token
        elif count >= params.min_tokens and not params.ignore_eos and token in self.eos_ids:
            reason = FinishReason.STOP
        elif count >= request.max_tokens:
            reason = FinishReason.LENGTH
        if reason is not None:
            if stop_string is None and child.detok is not None:
                child.detok.finish()
            self.scheduler.finish(request, reason)

    def _final_text(self, parent: _Parent, child: _Child) -> str:
        if child.detok is not None:
            return child.detok.text
        # decode with a little prompt context, as streaming would, so a leading space survives
        skip = parent.params.skip_special_tokens
        context = parent.prompt_ids[-6:]
        head = self.tokenizer.decode(context, skip)
        return self.tokenizer.decode(context + child.request.output_token_ids, skip)[len(head):]

    def _make_output(self, parent: _Parent) -> RequestOutput | None:
        kind = parent.params.output_kind
        finished = parent.finished
        if kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        completions = []
        for child in parent.children:
            req = child.request
            done = req.is_finished
            reason = req.finish_reason.value if req.finish_reason else None
            if kind is RequestOutputKind.FINAL_ONLY:
                text, tokens, lps = self._final_text(parent, child), list(req.output_token_ids), child.logprobs
            else:
                assert child.detok is not None
                full = child.detok.emittable(done)
                if kind is RequestOutputKind.CUMULATIVE:
                    text, tokens, lps = full, list(req.output_token_ids), child.logprobs
                else:
                    if len(full) == child.sent_text and len(req.output_token_ids) == child.sent_tokens \
                            and (not done or child.sent_finished):
                        continue
                    text = full[child.sent_text:]
                    tokens = req.output_token_ids[child.sent_tokens:]
                    lps = child.logprobs[child.sent_tokens:] if child.logprobs is not None else None
                    child.sent_text, child.sent_tokens, child.sent_finished = len(full), len(req.output_token_ids), done
            completions.append(CompletionOutput(
                child.index, text, list(tokens), reason, req.stop_reason,
                list(lps) if lps is not None else None, child.cumulative_logprob,
            ))
        if not completions:
            return None
        prompt_lps = parent.prompt_logprobs
        if kind is RequestOutputKind.DELTA and prompt_lps is not None:
            complete = len(prompt_lps) >= len(parent.prompt_ids)
            prompt_lps = prompt_lps if complete and not parent.prompt_logprobs_sent else None
            parent.prompt_logprobs_sent |= complete
        firsts = [c.request.first_token_time for c in parent.children if c.request.first_token_time is not None]
        return RequestOutput(
            parent.request_id, parent.prompt, parent.prompt_ids, completions, finished,
            prompt_lps, parent.children[0].request.num_cached_tokens, min(firsts, default=None),
        )

    # ---- warm-up ------------------------------------------------------------------------

    @torch.inference_mode()
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
        self.runner.timings = StepTimings()
        if self.compiled is not None:
            self.compiled.serving = True  # type: ignore[attr-defined]
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
            num_compiles=self.compiled.num_compiles if self.compiled is not None else 0,  # type: ignore[attr-defined]
        )

    def is_idle_clean(self) -> bool:
        """Self-check: with nothing running, every KV block is free or evictable."""
        return not self.has_unfinished_requests() and not self._parents and self.scheduler.all_blocks_free()
