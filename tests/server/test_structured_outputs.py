"""Structured outputs through the official openai client against `surge serve` (the default
model): every output of the test schemas parses and validates, greedy and sampled with several
seeds, streamed and not, and the streamed text equals the non-streamed one; regex, choice and a
GBNF grammar likewise; a bad constraint is a 400 in OpenAI's error shape and the server goes on."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import pytest
from openai import AsyncOpenAI, BadRequestError, OpenAI

from tests.server.conftest import API_KEY, MODEL_NAME
from tests.structured.schemas import SCHEMAS

# every test schema but the recursive one, whose nesting the small model repeats until max_tokens
# (its grammar is tested token by token in tests/structured/test_grammar_state.py)
E2E = sorted(set(SCHEMAS) - {"recursive_tree"})
SEEDS = (None, 1, 2)  # None: greedy
MAX_TOKENS = 300


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)


def messages(name: str) -> list[dict]:
    schema = json.dumps(SCHEMAS[name])
    return [{"role": "system", "content": "You reply with JSON only."},
            {"role": "user", "content": f"Give an example of {name.replace('_', ' ')} as JSON matching this "
                                        f"schema: {schema}"}]


def response_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


async def _one(client: AsyncOpenAI, name: str, seed: int | None, stream: bool) -> tuple[str, str | None]:
    kwargs = dict(model=MODEL_NAME, messages=messages(name), response_format=response_format(name),
                  max_tokens=MAX_TOKENS, temperature=0 if seed is None else 0.8, seed=seed)
    if not stream:
        r = await client.chat.completions.create(**kwargs)
        return r.choices[0].message.content, r.choices[0].finish_reason
    text, reason = [], None
    async for chunk in await client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            reason = choice.finish_reason or reason
    return "".join(text), reason


def test_every_schema_output_validates_streamed_and_not(server):
    async def run() -> list[tuple[str, str | None]]:
        async with AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=600) as c:
            # non-streamed first (their prompts then come from the prefix cache for both kinds)
            jobs = [(n, s, False) for n in E2E for s in SEEDS] + [(n, s, True) for n in E2E for s in SEEDS]
            results = await asyncio.gather(*(_one(c, n, s, st) for n, s, st in jobs))
            return list(zip(jobs, results))

    results = asyncio.run(run())
    assert len(E2E) >= 50
    failures = []
    by_key = {}
    for (name, seed, stream), (text, reason) in results:
        by_key[(name, seed, stream)] = text
        try:
            jsonschema.validate(json.loads(text), SCHEMAS[name],
                                format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
            assert reason == "stop"
        except (ValueError, AssertionError, jsonschema.ValidationError) as exc:
            failures.append(f"{name} seed={seed} stream={stream} finish={reason}: {text[:120]!r} ({exc})"[:300])
    assert not failures, f"{len(failures)} of {len(results)} outputs invalid:\n" + "\n".join(failures)
    differ = [(n, s) for n in E2E for s in SEEDS if by_key[(n, s, True)] != by_key[(n, s, False)]]
    assert not differ, f"streamed text differs from non-streamed for {differ}"


@pytest.mark.parametrize("extra, check", [
    ({"structured_outputs": {"regex": "^[A-Z][a-z]{1,12} [0-9]{2}$"}},
     lambda t: re.fullmatch(r"[A-Z][a-z]{1,12} [0-9]{2}", t)),
    ({"structured_outputs": {"choice": ["Paris", "London", "Berlin"]}}, lambda t: t in ("Paris", "London", "Berlin")),
    ({"structured_outputs": {"grammar": 'root ::= city ", " country\ncity ::= [A-Z] [a-z]{1,12}\ncountry ::= [A-Z] [a-z]{1,12}'}},
     lambda t: re.fullmatch(r"[A-Z][a-z]+, [A-Z][a-z]+", t)),
    ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
    ({"response_format": {"type": "json_object"}}, lambda t: isinstance(json.loads(t), dict)),
])
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_regex_choice_grammar_on_both_endpoints(client, extra, check, endpoint):
    # any JSON object is tested greedy only: sampled, the small model's keys run on to max_tokens
    for seed in (None,) if "response_format" in extra else (None, 5, 6):
        kwargs = dict(model=MODEL_NAME, max_tokens=60, temperature=0 if seed is None else 0.7, seed=seed,
                      extra_body={k: v for k, v in extra.items() if k != "response_format"},
                      **({"response_format": extra["response_format"]} if "response_format" in extra else {}))
        if "response_format" in extra and endpoint == "completions":
            kwargs["extra_body"]["response_format"] = kwargs.pop("response_format")
        if endpoint == "chat":
            msgs = [{"role": "user", "content": "Name a European capital city and its country."}]
            whole = client.chat.completions.create(messages=msgs, **kwargs)
            text, reason = whole.choices[0].message.content, whole.choices[0].finish_reason
            streamed = "".join(c.choices[0].delta.content or "" for c in
                               client.chat.completions.create(messages=msgs, stream=True, **kwargs) if c.choices)
        else:
            prompt = "Q: Name a European capital city.\nA:"
            whole = client.completions.create(prompt=prompt, **kwargs)
            text, reason = whole.choices[0].text, whole.choices[0].finish_reason
            streamed = "".join(c.choices[0].text for c in
                               client.completions.create(prompt=prompt, stream=True, **kwargs) if c.choices)
        assert reason == "stop" and check(text), (extra, seed, text)
        assert streamed == text


def test_n_and_logprobs_with_a_schema(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages("color_enum"),
                                       response_format=response_format("color_enum"), n=3, temperature=1.0,
                                       seed=9, logprobs=True, top_logprobs=2, max_tokens=40)
    assert len(r.choices) == 3
    for choice in r.choices:
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS["color_enum"])
        # the tokens of the content, and the end of sequence where the grammar ended with one
        assert "".join(t.token for t in choice.logprobs.content).startswith(choice.message.content)
        for t in choice.logprobs.content:  # the alternatives are tokens the schema allows: all finite
            assert t.logprob > -1e9 and all(alt.logprob > -1e9 for alt in t.top_logprobs)


@pytest.mark.parametrize("body, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format", "invalid JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"not": {"type": "null"}}}}}}}, "response_format", "not"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "items": {"type": "string"}, "uniqueItems": True}}}}, "response_format", "uniqueItems"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format.json_schema.name",
     "required"),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs", "regex"),
    ({"structured_outputs": {"grammar": "root ::= ("}}, "structured_outputs", "grammar"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", "choice"),
    ({"structured_outputs": {"json": {"type": "string"}, "regex": "a"}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"yaml": "a: b"}}, "structured_outputs.yaml", "unrecognized request argument"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, None, "one output constraint"),
    ({"guided_json": {"$ref": "#/$defs/nowhere"}}, "guided_json", "nowhere"),
])
@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
def test_bad_constraints_are_400s(server, client, body, param, message, endpoint):
    payload = {"model": MODEL_NAME, "max_tokens": 5, **body}
    payload.update({"messages": [{"role": "user", "content": "hi"}]} if endpoint == "chat/completions"
                   else {"prompt": "hi"})
    r = httpx.post(f"{server.url}/v1/{endpoint}", json=payload, headers={"Authorization": f"Bearer {API_KEY}"},
                   timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and message in error["message"], error
    if param is not None:
        assert error["param"] == param, error
    ok = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=3, temperature=0)
    assert ok.choices[0].text


def test_openai_client_parse_helper(client):
    """The client's own structured-output helper (pydantic model in, parsed object out)."""
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        country: str
        population_millions: int

    r = client.chat.completions.parse(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format=City, max_tokens=200, temperature=0)
    city = r.choices[0].message.parsed
    assert isinstance(city, City) and r.choices[0].finish_reason == "stop"
    with pytest.raises(BadRequestError):  # and a refusal still is OpenAI's error through the client
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "b", "schema": {"type": 5}}})
