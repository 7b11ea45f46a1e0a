"""`surge serve -tp 2` and `-tp 2 -pp 2`: the ranks answer what the single-process engine answers
through the OpenAI client (shared prefixes, prompts over 64 tokens' chunks, streamed and not), the
layout is logged, and a rank killed mid-stream ends the stream with an error event, /health with
503 and the server with exit code 3, leaving no process behind. (Every other split, served:
test_parallel_repository.py.)"""

from __future__ import annotations

import re

import pytest
from openai import OpenAI

from surge import LLM, SamplingParams
from tests.conftest import build_tiny_model
from tests.helpers import process_alive
from tests.server.conftest import kill_mid_stream, launch

PROMPTS = ["The capital of France is", "def fibonacci(n):", "The capital of France is a city"]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory, tiny_tokenizer_dir):
    return build_tiny_model("llama", tmp_path_factory.mktemp("tp-serve") / "m", tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def want(tiny_path):
    with LLM(str(tiny_path), dtype="float32", kv_cache_memory=16 << 20) as llm:
        greedy = SamplingParams(max_tokens=16, temperature=0)
        return [(llm.generate(p * 12, greedy)[0].outputs[0].text, llm.generate(p, greedy)[0].outputs[0].text)
                for p in PROMPTS]


@pytest.mark.parametrize("flags, layout", [
    (("-tp", "2"), "tensor parallel over 2 ranks: 2 of 4 attention heads, 1 KV heads"),
    (("-tp", "2", "-pp", "2"), "tensor parallel over 2 ranks: 2 of 4 attention heads, 1 KV heads, 64 of 128 MLP "
                               "rows and 192 of 384 vocabulary rows per rank; pipeline of 2 stages"),
], ids=["tp2", "tp2-pp2"])
def test_ranks_serve_what_one_process_serves_and_die_cleanly(tmp_path, tiny_path, want, flags, layout):
    srv = launch(tmp_path, "-m", str(tiny_path), *flags, "--dtype", "float32", "--kv-cache-memory",
                 str(8 << 20), "--max-num-batched-tokens", "64", "--served-model-name", "tiny")
    try:
        log = srv.log()
        assert layout in log, log
        assert re.search(r"a KV cache of \d+ tokens \(\d+ blocks", log)
        ranks = [int(p) for p in re.search(r"ranks 1\.\.\d+ in processes ([\d, ]+),", log).group(1).split(",")]
        rank1 = ranks[-1]
        client = OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=120)
        got = []
        for prompt in PROMPTS:  # a shared prefix (the prefix cache), prompts over 64 tokens' chunks
            r = client.completions.create(model="tiny", prompt=prompt * 12, max_tokens=16, temperature=0)
            stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, stream=True)
            got.append((r.choices[0].text, "".join(c.choices[0].text for c in stream)))
        assert got == want

        seen = kill_mid_stream(srv, "tiny", rank1)
        assert seen.errors and seen.errors[0]["error"]["code"] == "engine_dead", seen.events[-3:]
        assert str(rank1) in seen.errors[0]["error"]["message"]
        print(f"rank killed: stream ended with an error event, /health {seen.health} after {seen.took:.2f}s, "
              f"exit {seen.code}")
        assert seen.health in (503, "gone") and seen.took < 10 and seen.code == 3
        assert not any(process_alive(p) for p in ranks)
    finally:
        srv.stop()
