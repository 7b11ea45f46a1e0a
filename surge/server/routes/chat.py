"""POST /v1/chat/completions: OpenAI's chat (messages through the model's chat template), with
tool calls (surge/server/tools/) and reasoning models' thinking split out (surge/server/reasoning.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from surge.engine.llm_engine import LLMEngine
from surge.outputs import CompletionOutput, RequestOutput
from surge.server.errors import bad_request
from surge.server.formatting import chat_logprobs
from surge.server.generation import Generation, Prompt, prepare_prompts, render_chat, requested_replica, sampling
from surge.server.openapi import request_body
from surge.server.plumbing import read_body
from surge.server.protocol import ChatCompletionRequest
from surge.server.reasoning import ReasoningStreamer, opens_in_reasoning, reasoning_enabled, split_reasoning
from surge.server.state import ServerState
from surge.server.tools import ToolCall, ToolPlan, chat_prompt
from surge.server.tools.parsers import ToolStreamer


class ChatFormat:
    """The role first, then content deltas (reasoning and tool-call deltas too), then each
    choice's finish reason in a chunk of its own."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, n: int, engine: LLMEngine, top_n: int | None, tools: ToolPlan | None = None,
                 opened: bool | None = None):
        """`opened`: None when the reply is not split into reasoning and content, else whether
        it starts inside the thinking (reasoning.py)."""
        self.n, self.engine, self.top_n, self.tools, self.opened = n, engine, top_n, tools, opened
        self._streamers: dict[int, ToolStreamer] = {}
        self._reasoners: dict[int, ReasoningStreamer] = {}

    def _logprobs(self, c: CompletionOutput) -> dict | None:
        return chat_logprobs(self.engine, c.token_ids, c.logprobs or [], self.top_n) if self.top_n is not None else None

    def _calls(self, calls: list[ToolCall]) -> list[ToolCall]:
        assert self.tools is not None
        return calls if self.tools.parallel else calls[:1]

    def prelude(self) -> list[dict]:  # the role comes first, as OpenAI sends it
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(self.n)]

    @staticmethod
    def _delta(index: int, reasoning: str, content: str, lps: dict | None = None) -> dict:
        delta = {"reasoning_content": reasoning} if reasoning else {}
        if content or not reasoning:
            delta["content"] = content
        return {"index": index, "delta": delta, "logprobs": lps, "finish_reason": None}

    async def chunks(self, i: int, out: RequestOutput) -> list[dict]:
        choices = []
        for c in out.outputs:
            reasoning, text = "", c.text
            if self.opened is not None:
                reasoner = self._reasoners.setdefault(c.index, ReasoningStreamer(self.opened))
                reasoning, text = reasoner.feed(c.text)
            streamer = None
            if self.tools is not None:
                streamer = self._streamers.setdefault(c.index, self.tools.parser.streamer())
                text = streamer.feed(text)
            if c.text or c.token_ids:
                lps = self._logprobs(c)
                if text or reasoning or lps:
                    choices.append(self._delta(c.index, reasoning, text, lps))
            if c.finish_reason is None:
                continue
            reason = c.finish_reason
            reasoning, text = reasoner.finish() if self.opened is not None else ("", "")
            if streamer is not None:
                text = streamer.feed(text)
                rest, calls = streamer.finish(truncated=reason == "length")
                text += rest
            if reasoning or text:
                choices.append(self._delta(c.index, reasoning, text))
            if streamer is not None:
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
        message: dict[str, Any] = {"role": "assistant", "content": c.text}
        reason = c.finish_reason
        if self.opened is not None:
            reasoning, text = split_reasoning(c.text, self.opened)
            message.update(content=text if text or not reasoning else None, reasoning_content=reasoning or None)
        if self.tools is not None:
            content, calls = self.tools.parser.extract(message["content"] or "", truncated=reason == "length")
            calls = self._calls(calls)
            if calls:
                message.update(content=content, tool_calls=[call.as_openai() for call in calls])
                # cut by max_tokens stays "length" (its finished calls are given)
                reason = "tool_calls" if reason == "stop" else reason
        return message, reason

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
        plans: list[tuple[ToolPlan | None, bool | None]] = []

        def prepare(engine: LLMEngine) -> list[Prompt]:
            plan, messages, kwargs = chat_prompt(body, engine, state.settings.tool_call_parser)
            if plan is not None:
                params.structured_outputs = plan.constraint  # "required" / named: calls by grammar
            text = render_chat(engine, messages, body.add_generation_prompt, kwargs)
            opened = None
            if reasoning_enabled(state.settings.reasoning_parser, engine.tokenizer.chat_template):
                # a reply held by a grammar starts where its grammar does, not inside a thinking block
                opened = opens_in_reasoning(text) and params.structured_outputs is None
            plans.append((plan, opened))
            ids = engine.tokenizer.encode(text, add_special_tokens=False)
            return [(None, prepare_prompts(engine, [ids], params, body.constraint_param or "tools")[0][1])]

        gen = await Generation.start(state, body.model, body.n, prepare, params, "chatcmpl", body.priority,
                                     include_usage, replica=requested_replica(request, body.data_parallel_rank))
        return await gen.respond(request, ChatFormat(body.n, gen.engine, top_n, *plans[0]), body.streaming)

    return api
