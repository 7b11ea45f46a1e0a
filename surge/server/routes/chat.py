"""POST /v1/chat/completions: OpenAI's chat (messages through the model's chat template)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from surge.engine.llm_engine import LLMEngine
from surge.outputs import RequestOutput
from surge.server.errors import bad_request
from surge.server.formatting import chat_logprobs
from surge.server.generation import Generation, Prompt, encode_chat, prepare_prompts, sampling
from surge.server.openapi import request_body
from surge.server.plumbing import read_body
from surge.server.protocol import ChatCompletionRequest
from surge.server.state import ServerState


class ChatFormat:
    """The role first, then content deltas, then each choice's finish reason in a chunk of its own."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, n: int, engine: LLMEngine, top_n: int | None):
        self.n, self.engine, self.top_n = n, engine, top_n

    def _logprobs(self, c) -> dict | None:  # type: ignore[no-untyped-def]
        return chat_logprobs(self.engine, c.token_ids, c.logprobs or [], self.top_n) if self.top_n is not None else None

    def prelude(self) -> list[dict]:  # the role comes first, as OpenAI sends it
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(self.n)]

    async def chunks(self, i: int, out: RequestOutput) -> list[dict]:
        choices = []
        for c in out.outputs:
            if c.text or c.token_ids:
                lps = self._logprobs(c)
                if c.text or lps:
                    choices.append({"index": c.index, "delta": {"content": c.text}, "logprobs": lps,
                                    "finish_reason": None})
            if c.finish_reason is not None:
                choices.append({"index": c.index, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason})
        return choices

    async def choices(self, finals: dict[int, RequestOutput]) -> list[dict]:
        return [{"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": self._logprobs(c),
                 "finish_reason": c.finish_reason}
                for c in sorted(finals[0].outputs, key=lambda c: c.index)]


def router(state: ServerState) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/chat/completions", openapi_extra=request_body(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        body = await read_body(request, ChatCompletionRequest)
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request("'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
        top_n = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling(lambda: body.sampling_params(
            body.effective_max_tokens(state.settings.max_tokens_default), top_n, None), body.constraint_param)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def prepare(engine: LLMEngine) -> list[Prompt]:
            ids = encode_chat(engine, body.messages, body.add_generation_prompt)
            return [(None, prepare_prompts(engine, [ids], params, body.constraint_param)[0][1])]

        gen = await Generation.start(state, body.model, body.n, prepare, params, "chatcmpl", body.priority,
                                     include_usage)
        return await gen.respond(request, ChatFormat(body.n, gen.engine, top_n), body.streaming)

    return api
