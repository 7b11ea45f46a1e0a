"""LLMEngine: add_request / step / abort over the scheduler (core/) and the model runner (worker/)."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import torch

from surge.config import CacheConfig
from surge.core.request import FinishReason, Request
from surge.core.scheduler import Scheduler
from surge.engine.detokenizer import RequestDetokenizer
from surge.errors import InvalidArgumentError
from surge.layers.sampler import Sampler
from surge.loader import LoadedModel
from surge.outputs import CompletionOutput, RequestOutput
from surge.sampling_params import SamplingParams
from surge.worker.kv_cache import allocate_kv_caches, num_kv_blocks
from surge.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


@dataclass
class _RequestState:
    """Engine-side state of a request that core/ does not need: text, generator, prompt text."""

    request: Request
    params: SamplingParams
    prompt: str | None
    detok: RequestDetokenizer
    generator: torch.Generator | None


class LLMEngine:
    def __init__(
        self,
        loaded: LoadedModel,
        cache: CacheConfig | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        device: str = "cpu",
    ):
        self.loaded = loaded
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.max_model_len = loaded.config.max_position_embeddings
        cache = cache or CacheConfig()
        num_blocks = num_kv_blocks(loaded.config, cache, loaded.dtype, device)
        kv_caches = allocate_kv_caches(loaded.config, num_blocks, cache.block_size, loaded.dtype, device)
        self.capacity_tokens = num_blocks * cache.block_size
        logger.info("KV cache: %d blocks of %d tokens = %d tokens", num_blocks, cache.block_size, self.capacity_tokens)
        self.runner = ModelRunner(loaded.model, kv_caches, cache.block_size, device)
        self.scheduler = Scheduler(num_blocks, cache.block_size, max_num_seqs, max_num_batched_tokens)
        self.sampler = Sampler()
        self.eos_ids = frozenset(loaded.config.eos_token_ids) | frozenset(self.tokenizer.eos_token_ids)
        self.vocab_size = loaded.config.vocab_size
        self._states: dict[str, _RequestState] = {}
        self._ids = itertools.count()

    # ---- requests -----------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a prompt (text or token ids); returns its request id."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
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
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._states:
            raise InvalidArgumentError(f"request id {request_id!r} is already in use")
        request = Request(request_id, ids, max_tokens, params, time.monotonic())
        self.scheduler.add_request(request)
        generator = None
        if params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed)
        detok = RequestDetokenizer(self.tokenizer, ids, params)
        self._states[request_id] = _RequestState(request, params, text, detok, generator)
        return request_id

    def abort_request(self, request_id: str) -> None:
        state = self._states.pop(request_id, None)
        if state is not None:
            self.scheduler.finish(state.request, FinishReason.ABORT)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- stepping -----------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; return outputs of the requests that got a token."""
        scheduled = self.scheduler.schedule()
        sampling = [r for r in scheduled.requests if r.sample]
        if not sampling:
            return []
        logits = self.runner.execute(scheduled)
        states = [self._states[r.request_id] for r in sampling]
        self._mask_min_tokens(logits, states)
        tokens = self.sampler(logits, [s.params for s in states], [s.generator for s in states])
        sampled = {r.request_id: t for r, t in zip(sampling, tokens)}
        outputs = []
        for request in self.scheduler.update(scheduled, sampled):
            state = self._states[request.request_id]
            self._check_stop(state, sampled[request.request_id])
            outputs.append(self._output(state))
            if request.is_finished:
                del self._states[request.request_id]
        return outputs

    def _mask_min_tokens(self, logits: torch.Tensor, states: list[_RequestState]) -> None:
        """Below min_tokens, EOS and stop tokens cannot be sampled."""
        for row, state in enumerate(states):
            if len(state.request.output_token_ids) < state.params.min_tokens:
                banned = set(state.params.stop_token_ids)
                if not state.params.ignore_eos:
                    banned |= self.eos_ids
                if banned:
                    logits[row, sorted(t for t in banned if t < logits.shape[1])] = float("-inf")

    def _check_stop(self, state: _RequestState, token: int) -> None:
        request, params = state.request, state.params
        stop_string = state.detok.add(token)
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
            self.scheduler.finish(request, reason)

    def _output(self, state: _RequestState) -> RequestOutput:
        request = state.request
        finish = request.finish_reason.value if request.finish_reason else None
        completion = CompletionOutput(
            index=0,
            text=state.detok.text,
            token_ids=list(request.output_token_ids),
            finish_reason=finish,
            stop_reason=request.stop_reason,
        )
        return RequestOutput(
            request.request_id, state.prompt, request.prompt_token_ids, [completion], request.is_finished
        )

    def is_idle_clean(self) -> bool:
        """Self-check: with nothing running, every KV block is back in the pool."""
        return not self.has_unfinished_requests() and self.scheduler.all_blocks_free()
