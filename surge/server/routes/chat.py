"""POST /v1/chat/completions: OpenAI's chat (messages through the model's chat template), with
tool calls (surge/server/tools/)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from surge.engine.llm_engine import LLMEngine
from surge.outputs import CompletionOutput, RequestOutput
from surge.server.errors import bad_request
from surge.server.formatting import chat_logprobs
from surge.server.generation import Generation, Prompt, encode_chat, prepare_prompts, sampling
from surge.server.openapi import request_body
from surge.server.plumbing import read_body
from surge.server.protocol import ChatCompletionRequest
from surge.server.state import ServerState
from surge.server.tools import ToolCall, ToolPlan, chat_prompt
from surge.server.tools.parsers import ToolStreamer


class ChatFormat:
    """The role first, then content deltas (and tool-call deltas), then each choice's finish
    reason in a chunk of its own."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, n: int, engine: LLMEngine, top_n: int | None, tools: ToolPlan | None = None):
        self.n, self.engine, self.top_n, self.tools = n, engine, top_n, tools
        self._streamers: dict[int, ToolStreamer] = {}

    def _logprobs(self, c: CompletionOutput) -> dict | None:
        return chat_logprobs(self.engine, c.token_ids, c.logprobs or [], self.top_n) if self.top_n is not None else None

    def _calls(self, calls: list[ToolCall]) -> list[ToolCall]:
        assert self.tools is not None
        return calls if self.tools.parallel else calls[:1]

    def prelude(self) -> list[dict]:  # the role comes first, as OpenAI sends it
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(self.n)]

    async def chunks(self, i: int, out: RequestOutput) -> list[dict]:
        choices = []
        for c in out.outputs:
            text = c.text
            streamer = None
            if self.tools is not None:
                streamer = self._streamers.setdefault(c.index, self.tools.parser.streamer())
                text = streamer.feed(c.text)
            if c.text or c.token_ids:
                lps = self._logprobs(c)
                if text or lps:
                    choices.append({"index": c.index, "delta": {"content": text}, "logprobs": lps,
                                    "finish_reason": None})
            if c.finish_reason is None:
                continue
            reason = c.finish_reason
            if streamer is not None:
                rest, calls = streamer.finish(truncated=reason == "length")
                if rest:
                    choices.append({"index": c.index, "delta": {"content": rest}, "logprobs": None,
                                    "finish_reason": None})
                for k, call in enumerate(self._calls(calls)):
                    head = {"index": k, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
                    choices.append({"index": c.index, "delta": {"tool_calls": [head]}, "logprobs": None,
                                    "finish_reason": None})
                    choices.append({"index": c.index, "delta": {"tool_calls": [
                        {"index": k, "function": {"arguments": call.arguments}}]}, "logprobs": None,
                        "finish_reason": None})
                reason = "tool_calls" if calls and reason == "stop" else reason
            choices.append({"index": c.index, "delta": {}, "logprobs": None, "finish_reason": reason})
        return choices

    def _message(self, c: CompletionOutput) -> tuple[dict[str, Any], str | None]:
        if self.tools is None:
            return {"role": "assistant", "content": c.text}, c.finish_reason
        content, calls = self.tools.parser.extract(c.text, truncated=c.finish_reason == "length")
        calls = self._calls(calls)
        if not calls:
            return {"role": "assistant", "content": c.text}, c.finish_reason
        message = {"role": "assistant", "content": content, "tool_calls": [call.as_openai() for call in calls]}
        # cut by max_tokens stays "length" (its finished calls are given)
        return message, ("tool_calls" if c.finish_reason == "stop" else c.finish_reason)

    async def choices(self, finals: dict[int, RequestOutput]) -> list[dict]:
        choices = []
        for c in sorted(finals[0].outputs, key=lambda c: c.index):
            message, reason = self._message(c)
            choices.append({"index": c.index, "message": message, "logprobs": self._logprobs(c),
                            "finish_reason": reason})
        return choices


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
        plans: list[ToolPlan | None] = []

        def prepare(engine: LLMEngine) -> list[Prompt]:
            plan, messages, kwargs = chat_prompt(body, engine, state.settings.tool_call_parser)
            plans.append(plan)
            if plan is not None:
                params.structured_outputs = plan.constraint  # "required" / named: calls by grammar
            ids = encode_chat(engine, messages, body.add_generation_prompt, kwargs)
            return [(None, prepare_prompts(engine, [ids], params, body.constraint_param or "tools")[0][1])]

        gen = await Generation.start(state, body.model, body.n, prepare, params, "chatcmpl", body.priority,
                                     include_usage)
        return await gen.respond(request, ChatFormat(body.n, gen.engine, top_n, plans[0]), body.streaming)

    return api
