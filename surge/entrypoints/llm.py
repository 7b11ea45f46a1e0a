"""Offline API: `LLM(model).generate(prompts, SamplingParams)` and `.chat(messages)`, as in vLLM."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from surge.engine.args import EngineArgs
from surge.engine.engine_core import ReserveHook
from surge.engine.llm_engine import LLMEngine
from surge.errors import InvalidArgumentError
from surge.outputs import RequestOutput
from surge.sampling_params import RequestOutputKind, SamplingParams

Prompt = str | list[int]


class LLM:
    """A model loaded for offline generation; prompts given together are batched continuously.

    model: a .gguf file, a Hugging Face directory, a hub id, or None for the embedded default.
    Every other keyword is an engine setting of EngineArgs (surge/engine/args.py; the CLI flags
    with underscores), for example dtype ("auto", "float32", "bfloat16", "float16"),
    quantization ("auto", "none", "int8", "int4"), kv_cache_memory, max_num_seqs,
    max_model_len, compile, distributed_executor_backend ("uni" or "mp"). An unknown keyword
    is an error naming the known ones.
    reserve: called with the memory the load will take, before any weight is read (a model
    repository checks its budget there).
    """

    def __init__(self, model: str | None = None, reserve: ReserveHook | None = None, **kwargs: Any):
        self.engine = LLMEngine.from_engine_args(EngineArgs.from_kwargs({"model": model, **kwargs}), reserve)
        self.tokenizer = self.engine.tokenizer

    @classmethod
    def from_engine_args(cls, args: EngineArgs, reserve: ReserveHook | None = None) -> "LLM":
        return cls(reserve=reserve, **{f.name: getattr(args, f.name) for f in dataclasses.fields(args)})

    def shutdown(self) -> None:
        """Stop the engine's workers now (a worker process exits) rather than when the LLM is collected."""
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

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

    def embed(self, prompts: Prompt | Sequence[Prompt], pooling: str = "last") -> list[list[float]]:
        """One L2-normalised embedding per prompt (text or token ids), in order: the model's final
        hidden states pooled over the prompt ("mean") or taken at its last token ("last").
        The prompts are batched with each other (and with any generation) like prefills."""
        outs = self.generate(prompts, SamplingParams(pooling=pooling))
        return [out.embedding for out in outs]  # type: ignore[misc]

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
