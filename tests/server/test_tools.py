"""Tool calling end to end with the openai client: Qwen2.5-Coder-0.5B-Instruct (its template takes
tools, hermes format) and the default model (its template takes none: surge describes them).

"required" and a named function always end in calls whose arguments validate against the
function's parameters, with unique ids; streamed deltas reassembled by index equal the
non-streamed calls; "none" never calls; a second turn (the assistant's calls and the tool's
answer) renders exactly as transformers' apply_chat_template(messages, tools=...); bad tool
requests are 400s and the server goes on."""

from __future__ import annotations

import json
import os

import httpx
import jsonschema
import pytest
from openai import OpenAI

from surge.loader import zoo
from tests.server.conftest import API_KEY, MODEL_NAME, launch

QWEN = "qwen2.5-coder-0.5b-instruct"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"], "additionalProperties": False}}}
SEARCH = {"type": "function", "function": {
    "name": "search_flights", "description": "Find flights between two airports on a date",
    "parameters": {"type": "object", "properties": {
        "origin": {"type": "string", "pattern": "^[A-Z]{3}$"}, "destination": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "date": {"type": "string", "format": "date"}, "passengers": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["origin", "destination", "date", "passengers"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD, SEARCH]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASKS = ["What's the weather like in Paris today?", "What is 17 plus 25?",
        "Find me a flight from JFK to LHR on 2025-03-14 for two people.", "Is it raining in Tokyo?"]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    if not zoo.is_installed(QWEN):
        pytest.skip(f"{QWEN} is not installed: {zoo.ZOO[QWEN].pip}")
    srv = launch(tmp_path_factory.mktemp("qwen"), "-m", zoo.assemble(QWEN), "--served-model-name", "qwen",
                 "--kv-cache-memory", str(256 << 20), "--api-key", API_KEY)
    yield srv
    srv.stop()


def client_of(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)


def check_calls(message, choice_name: str | None = None) -> list[tuple[str, dict]]:
    calls = message.tool_calls
    assert calls, message
    assert len({c.id for c in calls}) == len(calls) and all(c.id.startswith("call_") for c in calls)
    out = []
    for call in calls:
        assert call.type == "function"
        if choice_name:
            assert call.function.name == choice_name
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, PARAMETERS[call.function.name],
                            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
        out.append((call.function.name, args))
    return out


def stream_calls(client: OpenAI, **kwargs) -> tuple[str, str | None, list[tuple[str, dict]]]:
    content, reason, calls = "", None, {}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or ():
                entry = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                if d.id:
                    assert entry["id"] is None  # the id comes once, in the first delta of a call
                    entry["id"] = d.id
                if d.function and d.function.name:
                    entry["name"] += d.function.name
                if d.function and d.function.arguments:
                    entry["arguments"] += d.function.arguments
            reason = choice.finish_reason or reason
    ordered = [calls[i] for i in sorted(calls)]
    assert all(c["id"] for c in ordered)
    return content, reason, [(c["name"], json.loads(c["arguments"])) for c in ordered]


@pytest.mark.parametrize("seed", [None, 3])
def test_required_and_named_always_call_with_valid_arguments(qwen, seed):
    client = client_of(qwen)
    choices = ["required", *({"type": "function", "function": {"name": t["function"]["name"]}} for t in TOOLS)]
    for ask in ASKS:
        for choice in choices:
            kwargs = dict(model="qwen", messages=[{"role": "user", "content": ask}], tools=TOOLS, tool_choice=choice,
                          parallel_tool_calls=False, max_tokens=160, temperature=0 if seed is None else 0.8,
                          seed=seed)
            r = client.chat.completions.create(**kwargs)
            choice_out = r.choices[0]
            named = choice["function"]["name"] if isinstance(choice, dict) else None
            assert choice_out.finish_reason == "tool_calls", (ask, choice, choice_out)
            assert choice_out.message.content is None
            calls = check_calls(choice_out.message, named)
            assert len(calls) == 1  # parallel_tool_calls false, and a named function is called once
            content, reason, streamed = stream_calls(client, **kwargs)
            assert (content, reason, streamed) == ("", "tool_calls", calls)


def test_parallel_required_calls_are_each_valid(qwen):
    client = client_of(qwen)
    kwargs = dict(model="qwen", tools=TOOLS, tool_choice="required", max_tokens=400, temperature=0,
                  messages=[{"role": "user", "content": "What's the weather in Paris and in Rome?"}])
    r = client.chat.completions.create(**kwargs)
    message = r.choices[0].message
    calls = check_calls(message)
    assert r.choices[0].finish_reason in ("tool_calls", "length")  # a small model may go on calling
    assert message.content is None  # an unfinished last call (cut by max_tokens) is dropped, never content
    assert stream_calls(client, **kwargs)[2] == calls


def test_auto_parses_calls_and_none_never_calls(qwen):
    client = client_of(qwen)
    messages = [{"role": "user", "content": "What's the weather like in Paris today?"}]
    r = client.chat.completions.create(model="qwen", messages=messages, tools=TOOLS, max_tokens=120, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert check_calls(choice.message)[0][0] == "get_weather"
    content, reason, streamed = stream_calls(client, model="qwen", messages=messages, tools=TOOLS, max_tokens=120,
                                             temperature=0)
    assert content == "" and reason == "tool_calls" and streamed == check_calls(choice.message)
    for seed in (None, 1, 2):
        r = client.chat.completions.create(model="qwen", messages=messages, tools=TOOLS, tool_choice="none",
                                           max_tokens=60, temperature=0 if seed is None else 1.0, seed=seed)
        assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
        assert "<tool_call>" not in r.choices[0].message.content


def test_second_turn_renders_as_transformers(qwen):
    """The assistant's calls (as the client sends them back) and the tool's answer, through the
    template: the prompt equals transformers' apply_chat_template(messages, tools=...)."""
    import transformers

    client = client_of(qwen)
    first = [{"role": "system", "content": "You are a helpful assistant."},
             {"role": "user", "content": "What's the weather like in Paris today?"}]
    r = client.chat.completions.create(model="qwen", messages=first, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=120, temperature=0)
    call = r.choices[0].message.tool_calls[0]
    messages = first + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}]
    second = client.chat.completions.create(model="qwen", messages=messages, tools=TOOLS, max_tokens=40,
                                            temperature=0)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    path = zoo.assemble(QWEN)
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    # transformers takes a call's arguments as an object, as its documentation asks
    ref_messages = first + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                         "arguments": json.loads(call.function.arguments)}}]},
        messages[-1]]
    want = ref.apply_chat_template(ref_messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    got = second.usage.prompt_tokens
    assert got == len(ref(want, add_special_tokens=False)["input_ids"])
    r = httpx.post(f"{qwen.url}/tokenize", headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"messages": messages, "tools": TOOLS})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == ref(want, add_special_tokens=False)["input_ids"]


def test_default_model_template_without_tools(server):
    """The default model's template takes no tools: they are described in the system message and
    "required" still yields valid calls in that format."""
    client = client_of(server)
    r = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Add 2 and 3."}],
                                       tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                                       max_tokens=120, temperature=0)
    assert r.choices[0].finish_reason == "tool_calls"
    check_calls(r.choices[0].message)
    tokens = httpx.post(f"{server.url}/tokenize", headers={"Authorization": f"Bearer {API_KEY}"},
                        json={"messages": [{"role": "user", "content": "Add 2 and 3."}], "tools": TOOLS}).json()
    assert tokens["count"] == r.usage.prompt_tokens


@pytest.mark.parametrize("extra, param, needle", [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name", "required"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name", "pattern"),
    ({"tools": [WEATHER, WEATHER]}, None, "unique"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, None, "nope"),
    ({"tool_choice": "required"}, None, "needs tools"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "tool_choice must be"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
      "tool_choice": "required"}, "tools", "invalid JSON schema"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, None, "cannot be combined"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                         "function": {"name": "f", "arguments": "{oops"}}]}]},
     None, "not JSON"),
    ({"messages": [{"role": "user", "tool_calls": [{"id": "c1", "type": "function",
                                                    "function": {"name": "f", "arguments": "{}"}}]}]},
     None, "only assistant"),
    ({"chat_template_kwargs": {"messages": []}}, None, "chat_template_kwargs"),
])
def test_bad_tool_requests_are_400s(server, extra, param, needle):
    body = {"model": MODEL_NAME, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], **extra}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                   timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert needle in error["message"], error
    if param is not None:
        assert error["param"] == param, error
    ok = client_of(server).chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=3)
    assert ok.choices[0].finish_reason in ("stop", "length")
