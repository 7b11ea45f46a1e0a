"""Offline API: `LLM(model).generate(prompts, SamplingParams)` and `.chat(messages)`, as in vLLM."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from surge.config import CacheConfig
from surge.engine.llm_engine import LLMEngine
from surge.errors import InvalidArgumentError
from surge.loader import ReserveHook, load_model
from surge.outputs import RequestOutput
from surge.sampling_params import RequestOutputKind, SamplingParams

Prompt = str | list[int]


class LLM:
    """A model loaded for offline generation; prompts given together are batched continuously.

    model: a .gguf file, a Hugging Face directory, a hub id, or None for the embedded default.
    dtype: "auto" (bf16 where the hardware runs it natively), "float32", "bfloat16", "float16".
    quantization: "auto" (a GGUF's Q4/Q8 weights stay 4/8-bit), "none", "int8", "int4".
    reserve: called with the estimated weight bytes before the weights are loaded (a model
    repository checks its memory budget there).
    compile: run the forward under torch.compile (Inductor); the first steps of each shape
    class compile (minutes on a small CPU, cached on disk for the next start).
    """

    def __init__(
        self,
        model: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        kv_cache_memory: int | None = None,
        block_size: int = 16,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        enable_prefix_caching: bool = True,
        enable_chunked_prefill: bool = True,
        long_prefill_token_threshold: int = 256,
        scheduling_policy: str = "fcfs",
        kv_cache_memory_fraction: float = 0.5,
        quantization: str = "auto",
        quantization_group_size: int = 32,
        threads: int | None = None,
        reserve: ReserveHook | None = None,
        compile: bool = False,
        kv_cache_dtype: str = "auto",
    ):
        cache = CacheConfig(block_size=block_size, kv_cache_memory=kv_cache_memory,
                            memory_fraction=kv_cache_memory_fraction, cache_dtype=kv_cache_dtype)
        if threads is not None:
            if threads < 1:
                raise InvalidArgumentError(f"threads must be at least 1, got {threads}")
            torch.set_num_threads(threads)
        self.loaded = load_model(model, dtype, device, quantization, quantization_group_size, reserve)
        device = str(next(self.loaded.model.parameters()).device)
        self.engine = LLMEngine(
            self.loaded,
            cache,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            device=device,
            enable_prefix_caching=enable_prefix_caching,
            enable_chunked_prefill=enable_chunked_prefill,
            long_prefill_token_threshold=long_prefill_token_threshold,
            scheduling_policy=scheduling_policy,
            compile=compile,
        )
        self.tokenizer = self.loaded.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        on_output: Callable[[RequestOutput], None] | None = None,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; returns one finished RequestOutput per prompt, in order.

        All prompts are queued at once and batched continuously. `on_output`, if given, sees
        every cumulative output as it grows (for streaming to a terminal); otherwise outputs
        are assembled only when a request finishes.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise InvalidArgumentError(
                    f"got {len(prompts)} prompts but {len(params)} sampling params; pass one or one each"
                )
        kind = RequestOutputKind.CUMULATIVE if on_output is not None else RequestOutputKind.FINAL_ONLY
        params = [dataclasses.replace(p, output_kind=kind) for p in params]
        priorities = list(priority) if priority is not None else [0] * len(prompts)
        ids: list[str] = []
        try:
            for prompt, p, prio in zip(prompts, params, priorities):
                ids.append(self.engine.add_request(prompt, p, priority=prio))
            results: dict[str, RequestOutput] = {}
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if on_output is not None:
                        on_output(out)
                    if out.finished:
                        results[out.request_id] = out
        except BaseException:
            for request_id in ids:  # never leave requests (and their blocks) behind
                self.engine.abort_request(request_id)
            raise
        return [results[i] for i in ids]

    def chat(
        self,
        messages: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]],
        sampling_params: SamplingParams | None = None,
        add_generation_prompt: bool = True,
        on_output: Callable[[RequestOutput], None] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of messages) or to several."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.tokenizer.encode_chat(list(c), add_generation_prompt) for c in conversations]
        return self.generate(prompts, sampling_params, on_output)
