"""Reasoning models' thinking as `reasoning_content` (surge/server/reasoning.py): the split of a
reply, the streamed split equal to the whole one however the text is cut, with tool calls after
the thinking; and live, a tiny Qwen3 with a thinking chat template behind `surge serve`: a reply
that opens `<think>`, a prompt that leaves one open (DeepSeek-R1's way), `enable_thinking: false`,
a grammar-held reply, and thinking echoed back in a later turn."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai import OpenAI

from surge.outputs import CompletionOutput, RequestOutput
from surge.server.reasoning import (ReasoningStreamer, opens_in_reasoning, reasoning_enabled,
                                    split_reasoning)
from surge.server.routes.chat import ChatFormat
from surge.server.tools import ToolPlan
from surge.server.tools.parsers import HermesParser
from tests.server.conftest import API_KEY, launch


@pytest.mark.parametrize("text, opened, reasoning, content", [
    ("<think>\nLet me add.\n</think>\n\n4", False, "Let me add.", "4"),  # Qwen3
    ("\n<think>a</think>b", False, "a", "b"),
    ("The answer is 4.", False, "", "The answer is 4."),  # no thinking: the reply untouched
    ("  4 <think>x</think>", False, "", "  4 <think>x</think>"),  # tags later on are content
    ("<think>\nstill thinking", False, "still thinking", ""),  # cut by max_tokens
    ("Let me add.\n</think>\n\n4", True, "Let me add.", "4"),  # DeepSeek-R1: the prompt opened it
    ("no end tag", True, "no end tag", ""),
    ("</think>4", True, "", "4"),
    ("<th", False, "", "<th"),
    ("", False, "", ""),
])
def test_split(text, opened, reasoning, content):
    assert split_reasoning(text, opened) == (reasoning, content)


def test_where_a_reply_starts_and_which_templates_think():
    assert opens_in_reasoning("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert not opens_in_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # enable_thinking false
    assert not opens_in_reasoning("<|im_start|>assistant\n<think>\nold\n</think>\n\nx<|im_end|>\n<|im_start|>assistant\n")
    assert not opens_in_reasoning("<|im_start|>assistant\n")
    thinking = "{{ '<think>' }}...{{ '</think>' }}"
    assert reasoning_enabled("auto", thinking) and reasoning_enabled(None, thinking)
    assert not reasoning_enabled("auto", "{{ messages }}") and not reasoning_enabled("auto", None)
    assert reasoning_enabled("think", None) and reasoning_enabled("qwen3", None)
    assert not reasoning_enabled("none", thinking)


PIECES = ["<think>", "</think>", "<th", "</th", "ink>", "<", "/", "\n", " ", "a", "bc", "4."]


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.sampled_from(PIECES), max_size=12), opened=st.booleans(),
       cuts=st.lists(st.integers(0, 60), max_size=8))
def test_streamed_split_equals_the_whole(pieces, opened, cuts):
    text = "".join(pieces)
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    streamer = ReasoningStreamer(opened)
    parts = [streamer.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])] + [streamer.finish()]
    assert ("".join(r for r, _ in parts), "".join(c for _, c in parts)) == split_reasoning(text, opened)


def _plan() -> ToolPlan:
    return ToolPlan(HermesParser(frozenset({"add"})), [], True, None, True)


REPLY = '<think>\nI should add.\n</think>\n\n<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'


def test_tool_calls_after_thinking_streamed_and_whole():
    done = CompletionOutput(0, REPLY, [1], "stop")
    message, reason = ChatFormat(1, None, None, _plan(), opened=False)._message(done)  # type: ignore[arg-type]
    assert reason == "tool_calls" and message["reasoning_content"] == "I should add."
    assert message["content"] is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == [
        ("add", {"a": 1})]

    fmt = ChatFormat(1, None, None, _plan(), opened=False)  # type: ignore[arg-type]
    chunks = []
    for k, ch in enumerate(REPLY):  # one character per token
        last = k == len(REPLY) - 1
        out = RequestOutput("r", None, [], [CompletionOutput(0, ch, [k], "stop" if last else None)])
        chunks += asyncio.run(fmt.chunks(0, out))
    reasoning = "".join(c["delta"].get("reasoning_content", "") for c in chunks)
    content = "".join(c["delta"].get("content") or "" for c in chunks)
    calls = [d for c in chunks for d in c["delta"].get("tool_calls", [])]
    assert reasoning == "I should add." and content == ""
    assert calls[0]["function"]["name"] == "add" and json.loads(calls[1]["function"]["arguments"]) == {"a": 1}
    assert chunks[-1]["finish_reason"] == "tool_calls"


# ---- live: a tiny Qwen3 with a thinking template ------------------------------------------------

# Qwen3's behaviour in a few lines: an assistant turn's reasoning_content written back in <think>,
# enable_thinking false writes an empty block; think_first opens one (DeepSeek-R1's way)
THINKING_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}"
    "{% if m.role == 'assistant' and m.reasoning_content %}{{ '<think>\\n' + m.reasoning_content + '\\n</think>\\n\\n' }}"
    "{% endif %}{{ m.content + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% elif think_first %}{{ '<think>\\n' }}{% endif %}{% endif %}"
)
ASK = [{"role": "user", "content": "What is two plus two?"}]


@pytest.fixture(scope="module")
def thinker(tmp_path_factory, tiny_tokenizer_dir):
    from tests.conftest import build_tiny_model

    path = build_tiny_model("qwen3", tmp_path_factory.mktemp("thinker"), tiny_tokenizer_dir, head_dim=32)
    (path / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    srv = launch(tmp_path_factory.mktemp("thinker-server"), "-m", str(path), "--served-model-name", "thinker",
                 "--dtype", "float32", "--quantization", "none", "--kv-cache-memory", str(32 << 20),
                 "--api-key", API_KEY)
    yield srv
    srv.stop()


def _client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _both(client: OpenAI, **kwargs) -> tuple[str | None, str | None, str]:
    """(reasoning_content, content, finish_reason) of a request, checked equal streamed and not."""
    whole = client.chat.completions.create(model="thinker", **kwargs).choices[0]
    reasoning, content, reason = "", "", None
    for chunk in client.chat.completions.create(model="thinker", stream=True, **kwargs):
        for choice in chunk.choices:
            delta = choice.delta.model_dump()
            reasoning += delta.get("reasoning_content") or ""
            content += delta.get("content") or ""
            reason = choice.finish_reason or reason
    message = whole.message.model_dump()
    assert (reasoning, content, reason) == (message["reasoning_content"] or "", message["content"] or "",
                                            whole.finish_reason)
    return message["reasoning_content"], message["content"], whole.finish_reason


def _raw(server, messages: list[dict], max_tokens: int, **template_kwargs) -> str:
    """The unsplit greedy reply: the chat prompt's tokens through /v1/completions."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    ids = httpx.post(f"{server.url}/tokenize", headers=headers, json={
        "model": "thinker", "messages": messages, "chat_template_kwargs": template_kwargs}).json()["tokens"]
    return _client(server).completions.create(model="thinker", prompt=ids, max_tokens=max_tokens,
                                              temperature=0).choices[0].text


def test_a_reply_that_opens_think_is_split(thinker):
    forced = {"structured_outputs": {"regex": r"<think>\n[a-z]{2,12}( [a-z]{2,12}){0,3}\n</think>\n\n[a-z]{1,12}"}}
    for seed in (None, 1, 2):
        reasoning, content, reason = _both(_client(thinker), messages=ASK, max_tokens=60, seed=seed,
                                           temperature=0 if seed is None else 1.0, extra_body=forced)
        assert reason == "stop" and reasoning and content and content.isalpha()
        assert all(word.isalpha() for word in reasoning.split(" "))


def test_a_prompt_that_opens_think_starts_the_reply_inside_it(thinker):
    kwargs = {"chat_template_kwargs": {"think_first": True}}
    reasoning, content, reason = _both(_client(thinker), messages=ASK, max_tokens=24, temperature=0,
                                       extra_body=kwargs)
    raw = _raw(thinker, ASK, 24, think_first=True)
    assert reason == "length"
    # the random model writes no </think>: all of its reply is the thinking
    if "</think>" not in raw:
        assert (reasoning, content) == (raw.strip() or None, None)
    else:
        assert (reasoning or "", content or "") == split_reasoning(raw, True)


def test_thinking_off_and_grammar_held_replies_are_content(thinker):
    client = _client(thinker)
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    reasoning, content, _ = _both(client, messages=ASK, max_tokens=16, temperature=0, extra_body=off)
    assert reasoning is None and content == _raw(thinker, ASK, 16, enable_thinking=False)
    # a grammar holds the reply from its first token, even where the prompt opened a thinking block
    held = {"chat_template_kwargs": {"think_first": True}, "structured_outputs": {"choice": ["yes", "no"]}}
    reasoning, content, reason = _both(client, messages=ASK, max_tokens=8, temperature=0, extra_body=held)
    assert (reasoning, content in ("yes", "no"), reason) == (None, True, "stop")


def test_thinking_sent_back_reaches_the_template(thinker):
    messages = ASK + [{"role": "assistant", "content": "4", "reasoning_content": "two and two"},
                      {"role": "user", "content": "And three?"}]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    ids = httpx.post(f"{thinker.url}/tokenize", headers=headers,
                     json={"model": "thinker", "messages": messages}).json()["tokens"]
    text = httpx.post(f"{thinker.url}/detokenize", headers=headers, json={"model": "thinker", "tokens": ids}).json()
    assert "<|im_start|>assistant\n<think>\ntwo and two\n</think>\n\n4<|im_end|>" in text["prompt"]
