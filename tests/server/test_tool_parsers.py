"""Tool-call parsers on recorded model outputs (single, parallel, malformed, fenced, cut off), the
streamer against the whole-reply parse (fed a character at a time: no markup reaches content),
and the format chosen from a chat template."""

from __future__ import annotations

import json

import pytest

from surge.server.tools.parsers import (
    HermesParser,
    JsonParser,
    Llama3JsonParser,
    MistralParser,
    parser_for_template,
)

NAMES = frozenset({"get_weather", "add"})
W = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
A = '{"name": "add", "arguments": {"a": 1, "b": 2}}'

# (parser, reply, truncated, content, [(name, arguments)])
CASES = [
    (HermesParser, f"<tool_call>\n{W}\n</tool_call>", False, None, [("get_weather", {"city": "Paris", "unit": "celsius"})]),
    (HermesParser, f"Let me check.\n<tool_call>\n{W}\n</tool_call>", False, "Let me check.\n",
     [("get_weather", {"city": "Paris", "unit": "celsius"})]),
    (HermesParser, f"<tool_call>\n{W}\n</tool_call>\n<tool_call>\n{A}\n</tool_call>", False, None,
     [("get_weather", {"city": "Paris", "unit": "celsius"}), ("add", {"a": 1, "b": 2})]),
    (HermesParser, "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": </tool_call>", False,
     "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": </tool_call>", []),  # malformed: text
    (HermesParser, '<tool_call>\n{"name": "launch_missiles", "arguments": {}}\n</tool_call>', False,
     '<tool_call>\n{"name": "launch_missiles", "arguments": {}}\n</tool_call>', []),  # not offered: text
    (HermesParser, W, False, None, [("get_weather", {"city": "Paris", "unit": "celsius"})]),  # tags dropped
    (HermesParser, f"```json\n{A}\n```", False, None, [("add", {"a": 1, "b": 2})]),  # fenced
    (HermesParser, "The answer is 3.", False, "The answer is 3.", []),
    (HermesParser, '{"a": 1}', False, '{"a": 1}', []),  # JSON, but no call
    (HermesParser, f"<tool_call>\n{W}\n</tool_call>\n<tool_call>\n{{\"name\": \"add\", \"argu", True, None,
     [("get_weather", {"city": "Paris", "unit": "celsius"})]),  # cut by max_tokens: the unfinished call dropped
    (HermesParser, '<tool_call>\n{"name": "add", "argu', False, '<tool_call>\n{"name": "add", "argu', []),
    (HermesParser, '<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}\n</tool_call>', False,
     None, [("add", {"a": 1, "b": 2})]),  # arguments written as a JSON string
    (Llama3JsonParser, '{"name": "add", "parameters": {"a": 1, "b": 2}}', False, None, [("add", {"a": 1, "b": 2})]),
    (Llama3JsonParser, '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; '
                       '{"name": "get_weather", "parameters": {"city": "Oslo; Norway", "unit": "celsius"}}', False,
     None, [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Oslo; Norway", "unit": "celsius"})]),
    (Llama3JsonParser, "Sure! 1 + 2 = 3", False, "Sure! 1 + 2 = 3", []),
    (Llama3JsonParser, '{"name": "add", "parameters": {"a": 1', False, '{"name": "add", "parameters": {"a": 1', []),
    (MistralParser, f"[TOOL_CALLS][{A}, {W}]", False, None,
     [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Paris", "unit": "celsius"})]),
    (MistralParser, f"[{A}]", False, None, [("add", {"a": 1, "b": 2})]),  # the marker skipped as special
    (MistralParser, "No tools needed.", False, "No tools needed.", []),
    (JsonParser, A, False, None, [("add", {"a": 1, "b": 2})]),
    (JsonParser, f"[{A}, {A}]", False, None, [("add", {"a": 1, "b": 2}), ("add", {"a": 1, "b": 2})]),
    (JsonParser, '[{"name": "add"}, 5]', False, '[{"name": "add"}, 5]', []),
]


@pytest.mark.parametrize("parser, reply, truncated, content, calls", CASES)
def test_recorded_outputs(parser, reply, truncated, content, calls):
    got_content, got_calls = parser(NAMES).extract(reply, truncated)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
    assert len({c.id for c in got_calls}) == len(got_calls)


@pytest.mark.parametrize("parser, reply, truncated, content, calls", CASES)
def test_streaming_equals_whole_reply(parser, reply, truncated, content, calls):
    streamer = parser(NAMES).streamer()
    sent = "".join(streamer.feed(ch) for ch in reply)
    rest, got_calls = streamer.finish(truncated)
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
    assert sent + rest == (content or "")
    for marker in ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>"):
        if calls:
            assert marker not in sent + rest


def test_format_from_template():
    assert parser_for_template("{% if tools %}<tool_call>{% endif %}") is HermesParser
    assert parser_for_template("{{ '[TOOL_CALLS]' }}{{ tools }}") is MistralParser
    assert parser_for_template("{{- '<|python_tag|>' }}{% for t in tools %}{% endfor %}") is Llama3JsonParser
    assert parser_for_template("{% for m in messages %}{{ m.content }}{% endfor %}") is HermesParser  # no tools
    assert parser_for_template(None) is HermesParser


@pytest.mark.parametrize("parser", [HermesParser, Llama3JsonParser, MistralParser, JsonParser])
def test_grammars_compile_and_match_their_parser(parser, default_llm):
    """Each format's grammar compiles (llguidance) and what it allows is what its parser reads."""
    from surge import SamplingParams
    from surge.sampling_params import StructuredOutputsParams

    schema = {"type": "object", "properties": {"name": {"const": "add"}, "arguments": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"],
        "additionalProperties": False}}, "required": ["name", "arguments"], "additionalProperties": False}
    lark = parser().grammar([schema], parallel=True, token_of=lambda text: None)
    outs = default_llm.generate(["Call add:"], SamplingParams(max_tokens=80, temperature=0,
                                                              structured_outputs=StructuredOutputsParams(lark=lark)))
    text = outs[0].outputs[0].text
    content, calls = parser(frozenset({"add"})).extract(text, outs[0].outputs[0].finish_reason == "length")
    assert calls and all(c.name == "add" and 0 <= json.loads(c.arguments)["a"] <= 9 for c in calls), text
