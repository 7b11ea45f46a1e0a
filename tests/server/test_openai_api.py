"""The server through the official `openai` client and raw HTTP: completions, chat, streaming,
n, stop, seeds, logprobs, usage; 32 concurrent streams equal offline generation."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI

from surge import SamplingParams
from tests.server.conftest import API_KEY, MODEL_NAME


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def tokenize(server, **body) -> list[int]:
    r = httpx.post(f"{server.url}/tokenize", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]


def test_completion(client, server):
    r = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert "Paris" in r.choices[0].text and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tokenize(server, prompt="The capital of France is"))
    assert r.usage.completion_tokens == 8 and r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_completion_stream_equals_non_stream(client):
    kwargs = dict(model=MODEL_NAME, prompt="Once upon a time", max_tokens=20, temperature=0)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_chat(client, server):
    messages = [{"role": "user", "content": "What is the capital of Germany?"}]
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=30, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert "Berlin" in choice.message.content and choice.finish_reason == "stop"
    assert r.usage.prompt_tokens == len(tokenize(server, messages=messages))
    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    streamed, first = chunks[-1].usage.model_dump(), r.usage.model_dump()
    # the second run of the prompt finds its full blocks in the prefix cache, and says so
    cached = streamed.pop("prompt_tokens_details")["cached_tokens"]
    assert 0 < cached < r.usage.prompt_tokens
    assert first.pop("prompt_tokens_details")["cached_tokens"] <= cached
    assert streamed == first


def test_stop_sequences(client):
    base = client.completions.create(model=MODEL_NAME, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0)
    text = base.choices[0].text
    stop = text[4:7]
    r = client.completions.create(model=MODEL_NAME, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == text[: text.find(stop)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL_NAME, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0, stop=[stop], stream=True))
    assert streamed == r.choices[0].text


def test_n_and_seed(client):
    kwargs = dict(model=MODEL_NAME, prompt="My favourite animal is", max_tokens=12, temperature=1.0, seed=42,
                  extra_body={"ignore_eos": True, "top_k": 50})
    a = client.completions.create(n=2, **kwargs)
    b = client.completions.create(n=2, **kwargs)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text != a.choices[1].text
    assert a.usage.completion_tokens == 24
    chat = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi!"}],
                                          n=2, max_tokens=10, temperature=1.0, seed=7)
    assert sorted(c.index for c in chat.choices) == [0, 1]


def test_logprobs(client):
    r = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=5,
                                  temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5 == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and len(top) == 2 and max(top.values()) == pytest.approx(value)  # greedy: the top one
    echo = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=2,
                                     temperature=0, logprobs=1, echo=True)
    assert echo.choices[0].text.startswith("The capital of France is")
    assert echo.choices[0].logprobs.token_logprobs[0] is None
    chat = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob == pytest.approx(c.logprob) for c in content)


def test_prompt_forms(client, server):
    ids = tokenize(server, prompt="The capital of France is")
    by_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=6, temperature=0)
    by_text = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=6,
                                        temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    many = client.completions.create(model=MODEL_NAME, prompt=["Hello", "The capital of France is"],
                                     max_tokens=6, temperature=0)
    assert [c.index for c in many.choices] == [0, 1] and many.choices[1].text == by_text.choices[0].text
    batch_ids = client.completions.create(model=MODEL_NAME, prompt=[ids, ids], max_tokens=6, temperature=0)
    assert [c.text for c in batch_ids.choices] == [by_text.choices[0].text] * 2


def test_tokenize_detokenize(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    ids = tokenize(server, prompt="Hello world")
    r = httpx.post(f"{server.url}/detokenize", json={"tokens": ids}, headers=headers)
    assert r.status_code == 200 and r.json()["prompt"] == "Hello world"


def test_32_concurrent_streams_equal_offline(server, default_llm):
    prompts = [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(16)] + [
        f"Write one sentence about the number {i}." for i in range(16)]

    async def run() -> list[str]:
        client = AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)

        async def one(prompt: str) -> str:
            stream = await client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=24,
                                                     temperature=0, stream=True)
            return "".join([c.choices[0].text async for c in stream if c.choices])

        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await client.close()

    texts = asyncio.run(run())
    offline = default_llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0))
    assert texts == [o.outputs[0].text for o in offline]


def test_bench_serve_against_live_server(server):
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "surge.entrypoints.cli", "bench", "serve", "--url", server.url, "--api-key", API_KEY,
         "--model", MODEL_NAME, "--concurrency", "4", "--num-prompts", "6", "--prompt-words", "5-20",
         "--output-len", "8", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    result = json.loads(proc.stdout)
    assert result["completed"] == 6 and result["errors"] == 0
    assert result["output_tok_s"] > 0 and result["ttft_s"]["p99"] >= result["ttft_s"]["p50"] > 0
