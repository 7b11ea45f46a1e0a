"""Tool calling for /v1/chat/completions: how the tools reach the prompt, which constraint the
reply is held to, and how the reply is read (parsers.py).

- The tools go through the model's own chat template (`tools=`), as transformers passes them.
  A template that takes no tools (the default model's) gets them described in its system
  message instead, in the hermes format, which is then how its calls are read and enforced.
- `tool_choice` "auto" (the default with tools): the model chooses; its reply is parsed for calls.
  "required" and a named function: the reply is held by a grammar to calls (of any tool, or of
  that one) in the parser's format, their arguments to each function's `parameters` schema.
  "none": the tools are left out of the prompt and nothing is parsed.
- `parallel_tool_calls` false: at most one call (the grammar allows one; "auto" keeps the first).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from surge.engine.llm_engine import LLMEngine
from surge.errors import StructuredOutputError
from surge.sampling_params import StructuredOutputsParams
from surge.server.errors import bad_request
from surge.server.protocol import ChatCompletionRequest, NamedToolChoice, TokenizeRequest
from surge.server.tools.parsers import PARSERS, HermesParser, ToolCall, ToolParser, TokenOf, parser_for_template
from surge.structured.schema import prepare_schema

__all__ = ["ToolPlan", "ToolCall", "chat_prompt", "plan_tools"]
RESERVED_TEMPLATE_VARIABLES = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"})


@dataclass
class ToolPlan:
    parser: ToolParser
    tools: list[dict[str, Any]]  # as the client sent them (OpenAI's shape)
    in_template: bool  # the chat template takes `tools`; else they are described in the system message
    constraint: StructuredOutputsParams | None  # "required" / a named function
    parallel: bool

    @property
    def template_kwargs(self) -> dict[str, Any]:
        return {"tools": self.tools} if self.in_template else {}

    def messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The template's messages; for a template without tools, the tools in the system message
        and earlier calls and results written out in the hermes format."""
        if self.in_template:
            return messages
        tools = "\n".join(json.dumps(t, ensure_ascii=False) for t in self.tools)
        preamble = (
            "# Tools\n\nYou can call functions to answer the user. They are described in JSON Schema "
            f"between <tools> and </tools>:\n<tools>\n{tools}\n</tools>\n\nTo call a function, reply with "
            "one JSON object per call holding its name and arguments, each between <tool_call> and "
            '</tool_call>:\n<tool_call>\n{"name": "the function", "arguments": {"arg": "value"}}\n</tool_call>')
        out = [dict(m) for m in messages]
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{preamble}"
        else:
            out.insert(0, {"role": "system", "content": preamble})
        for m in out:
            calls = m.pop("tool_calls", None)
            if calls:
                bodies = [json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                     ensure_ascii=False) for c in calls]
                blocks = "\n".join(f"<tool_call>\n{body}\n</tool_call>" for body in bodies)
                m["content"] = f"{m['content']}\n{blocks}" if m.get("content") else blocks
            if m["role"] == "tool":
                m["role"], m["content"] = "user", f"<tool_response>\n{m['content']}\n</tool_response>"
                m.pop("tool_call_id", None)
        return out


def plan_tools(body: ChatCompletionRequest | TokenizeRequest, chat_template: str | None, parser_name: str | None,
               token_of: TokenOf = lambda text: None) -> ToolPlan | None:
    """How this request uses its tools (None: it has none, or tool_choice "none"); a
    StructuredOutputError (400) for a function whose parameters are not a usable JSON schema."""
    if not body.tools_active:
        return None
    assert body.tools is not None
    takes_tools = chat_template is not None and "tools" in chat_template
    cls = PARSERS[parser_name] if parser_name else (parser_for_template(chat_template) if takes_tools
                                                    else HermesParser)
    parser = cls(frozenset(t.function.name for t in body.tools))
    tools = [t.model_dump(by_alias=True, exclude_unset=True) for t in body.tools]
    parallel = body.parallel_tool_calls is not False
    constraint = None
    choice = body.tool_choice
    if choice == "required" or isinstance(choice, NamedToolChoice):
        wanted = [t for t in body.tools if not isinstance(choice, NamedToolChoice) or t.function.name == choice.function.name]
        schemas = []
        for tool in wanted:
            try:
                parameters, _ = prepare_schema(tool.function.parameters or {"type": "object"})
            except StructuredOutputError as exc:
                raise StructuredOutputError(f"tools: function {tool.function.name!r}: {exc}") from None
            schemas.append({"type": "object", "properties": {"name": {"const": tool.function.name},
                                                             "arguments": parameters},
                            "required": ["name", "arguments"], "additionalProperties": False})
        one_call = isinstance(choice, NamedToolChoice) or not parallel
        constraint = StructuredOutputsParams(lark=parser.grammar(schemas, not one_call, token_of))
        parallel = not one_call
    return ToolPlan(parser, tools, takes_tools, constraint, parallel)


def chat_prompt(body: ChatCompletionRequest | TokenizeRequest, engine: LLMEngine, parser_name: str | None
                ) -> tuple[ToolPlan | None, list[dict[str, Any]], dict[str, Any]]:
    """(the tool plan, the template's messages, its extra variables) of a chat request: what
    /v1/chat/completions runs and /tokenize counts. 400s for bad tools or template variables."""
    assert body.messages is not None
    clash = RESERVED_TEMPLATE_VARIABLES & set(body.chat_template_kwargs or {})
    if clash:
        raise bad_request(f"chat_template_kwargs may not set {', '.join(sorted(clash))} (the request's own fields)",
                          "chat_template_kwargs")
    tokenizer = engine.tokenizer
    try:
        plan = plan_tools(body, tokenizer.chat_template, parser_name, tokenizer.added_token_id)
    except StructuredOutputError as exc:
        raise bad_request(str(exc), "tools") from exc
    messages = [m.as_template_dict() for m in body.messages]
    kwargs = dict(body.chat_template_kwargs or {})
    if plan is not None:
        messages = plan.messages(messages)
        kwargs.update(plan.template_kwargs)
    return plan, messages, kwargs
