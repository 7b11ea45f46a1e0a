"""`surge serve --speculative-config`: through the openai client, streamed and whole, the
answers plain decoding gives; its counters in /metrics; a bad config refused at start."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI

from surge import SamplingParams
from tests.server.conftest import MODEL_NAME, metric, start_server

SPEC = json.dumps({"method": "ngram", "num_speculative_tokens": 4})
PROMPTS = ["1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2,",
           "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
           "red blue green red blue green red blue",
           "Tell me about the sea."]


@pytest.fixture(scope="module")
def spec_server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("spec"), "--speculative-config", SPEC)
    yield srv
    srv.stop()


@pytest.mark.slow
def test_answers_equal_plain_decoding_streamed_and_whole(spec_server, default_llm):
    client = OpenAI(base_url=f"{spec_server.url}/v1", api_key="none")
    expected = [o.outputs[0].text for o in default_llm.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0))]
    for prompt, text in zip(PROMPTS, expected):
        whole = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=24, temperature=0)
        assert whole.choices[0].text == text
        chunks = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=24, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == text

    async def concurrent() -> list[str]:
        aclient = AsyncOpenAI(base_url=f"{spec_server.url}/v1", api_key="none")

        async def one(prompt: str) -> str:
            stream = await aclient.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=24,
                                                      temperature=0, stream=True)
            return "".join([c.choices[0].text async for c in stream if c.choices])

        return await asyncio.gather(*(one(p) for p in PROMPTS))

    assert asyncio.run(concurrent()) == expected
    text = httpx.get(f"{spec_server.url}/metrics").text
    proposed = metric(text, "surge_spec_decode_num_draft_tokens_total", model=MODEL_NAME, method="ngram")
    accepted = metric(text, "surge_spec_decode_num_accepted_tokens_total", model=MODEL_NAME, method="ngram")
    assert proposed and accepted and 0 < accepted <= proposed


def test_a_bad_config_stops_the_start_with_one_line():
    exe = shutil.which("surge")
    cmd = ([exe] if exe else [sys.executable, "-m", "surge.entrypoints.cli"]) + [
        "serve", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": -1}']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "num_speculative_tokens must be a positive integer" in proc.stderr
