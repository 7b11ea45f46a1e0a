"""POST /v1/completions: OpenAI's legacy completions (several prompts, n, echo, logprobs)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from surge.engine.llm_engine import LLMEngine
from surge.outputs import RequestOutput
from surge.server.formatting import completion_logprobs
from surge.server.generation import (Generation, Prompt, check_prompt_count, prepare_prompts, requested_replica,
                                     sampling)
from surge.server.openapi import request_body
from surge.server.plumbing import off_loop, off_loop_if_long, read_body
from surge.server.protocol import CompletionRequest
from surge.server.state import ServerState


class CompletionFormat:
    """Choice i * n + j is prompt i's j-th sequence; echo prefixes the prompt (and its logprobs)."""

    object = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, body: CompletionRequest, engine: LLMEngine, prompts: list[Prompt]):
        self.body, self.engine, self.prompts = body, engine, prompts
        self.echoed: set[int] = set()
        self.offsets: dict[int, int] = {}

    def prompt_text(self, i: int) -> str:
        text, ids = self.prompts[i]
        return text if text is not None else self.engine.tokenizer.decode(ids, skip_special_tokens=False)

    def _with_prompt(self, i: int, out: RequestOutput, ids: list[int], positions: list) -> tuple[list[int], list]:
        prompt_ids = self.prompts[i][1]
        return prompt_ids + ids, list(out.prompt_logprobs or [None] * len(prompt_ids)) + positions

    def prelude(self) -> list[dict]:
        return []

    async def chunks(self, i: int, out: RequestOutput) -> list[dict]:
        body = self.body
        choices = []
        for c in out.outputs:
            index = i * body.n + c.index
            text, lps = c.text, None
            ids, positions = list(c.token_ids), list(c.logprobs or [])
            if body.echo and index not in self.echoed:
                self.echoed.add(index)
                text = self.prompt_text(i) + text
                if body.logprobs is not None:
                    ids, positions = self._with_prompt(i, out, ids, positions)
            if body.logprobs is not None:
                offset = self.offsets.get(index, 0)
                lps = await off_loop_if_long(len(ids), completion_logprobs, self.engine, ids, positions,
                                             body.logprobs, offset)
                self.offsets[index] = offset + sum(len(t) for t in lps["tokens"])
            choices.append({"index": index, "text": text, "logprobs": lps, "finish_reason": c.finish_reason})
        return choices

    async def choices(self, finals: dict[int, RequestOutput]) -> list[dict]:
        body = self.body

        def build() -> list[dict]:  # logprobs of an 8k-token echo take a while: off the event loop
            choices = []
            for i in range(len(self.prompts)):
                out = finals[i]
                for c in sorted(out.outputs, key=lambda c: c.index):
                    text, lps = c.text, None
                    if body.logprobs is not None:
                        ids, positions = c.token_ids, list(c.logprobs or [])
                        if body.echo:
                            ids, positions = self._with_prompt(i, out, list(ids), positions)
                        lps = completion_logprobs(self.engine, ids, positions, body.logprobs, 0)
                    if body.echo:
                        text = self.prompt_text(i) + text
                    choices.append({"index": i * body.n + c.index, "text": text, "logprobs": lps,
                                    "finish_reason": c.finish_reason})
            return choices

        return await off_loop(build) if body.logprobs is not None or body.echo else build()


def router(state: ServerState) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/completions", openapi_extra=request_body(CompletionRequest))
    async def completions(request: Request) -> Response:
        body = await read_body(request, CompletionRequest)
        raw_prompts = body.prompts()
        check_prompt_count(state, len(raw_prompts))
        want_prompt_lps = bool(body.echo) and body.logprobs is not None
        params = sampling(lambda: body.sampling_params(body.effective_max_tokens(), body.logprobs,
                                                       body.logprobs if want_prompt_lps else None),
                          body.constraint_param)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def prepare(engine: LLMEngine) -> list[Any]:
            return prepare_prompts(engine, raw_prompts, params, body.constraint_param)

        gen = await Generation.start(state, body.model, body.n * len(raw_prompts), prepare, params, "cmpl",
                                     body.priority, include_usage, numbered=True,
                                     replica=requested_replica(request, body.data_parallel_rank))
        return await gen.respond(request, CompletionFormat(body, gen.engine, gen.prompts), body.streaming)

    return api
