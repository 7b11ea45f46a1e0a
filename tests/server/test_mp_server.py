"""`surge serve --distributed-executor-backend mp`: the model in a worker process answers what
the in-process engine answers, and a worker killed mid-stream is reported to the client (an
error event), on /health (503 within 10 s) and by the exit code, leaving no process behind."""

from __future__ import annotations

import json
import os
import re
import time

import pytest
from openai import OpenAI

from surge import LLM, SamplingParams
from tests.conftest import build_tiny_model
from tests.helpers import process_alive
from tests.server.conftest import API_KEY, MODEL_NAME, kill_mid_stream, launch, put

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "The capital of France is a city"]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory, tiny_tokenizer_dir):
    return build_tiny_model("qwen2", tmp_path_factory.mktemp("mp-serve") / "m", tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def mp_server(tmp_path_factory, tiny_path, default_gguf_path):
    """Two models from a repository, each engine with its worker in a process of its own."""
    root = tmp_path_factory.mktemp("mp-repo")
    (root / "gguf").mkdir()
    os.symlink(default_gguf_path, root / "gguf" / os.path.basename(default_gguf_path))
    (root / "repo").mkdir()
    put(root / "repo", MODEL_NAME, 1, root / "gguf")
    put(root / "repo", "tiny", 1, tiny_path)
    srv = launch(root, "--model-repository", str(root / "repo"), "--distributed-executor-backend", "mp",
                 "--dtype", "float32", "--quantization", "none", "--kv-cache-memory", str(128 << 20),
                 "--max-num-batched-tokens", "64", "--api-key", API_KEY)
    yield srv
    srv.stop()


def worker_pids(log: str, model: str = "") -> list[int]:
    """The worker processes the server started (for the model directory named `model`)."""
    return [int(pid) for pid, path in re.findall(r"started worker process (\d+) for (\S+)", log)
            if not model or f"/{model}/" in path]


def completions(url: str, model: str) -> list[list[str]]:
    client = OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    got = []
    for prompt in PROMPTS:  # a shared prefix (the prefix cache), prompts over 64 tokens' chunks
        r = client.completions.create(model=model, prompt=prompt * 12, max_tokens=16, temperature=0, logprobs=2)
        stream = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0, stream=True)
        got.append([r.choices[0].text, json.dumps(r.choices[0].logprobs.top_logprobs),
                    "".join(c.choices[0].text for c in stream)])
    return got


def test_mp_serves_what_uni_serves(mp_server, server, tiny_path):
    assert len(worker_pids(mp_server.log())) == 2
    assert completions(mp_server.url, MODEL_NAME) == completions(server.url, MODEL_NAME)
    llm = LLM(str(tiny_path), dtype="float32", kv_cache_memory=16 << 20)
    want = [llm.generate(p * 12, SamplingParams(max_tokens=16, temperature=0))[0].outputs[0].text for p in PROMPTS]
    assert [row[0] for row in completions(mp_server.url, "tiny")] == want


def test_a_killed_worker_ends_the_stream_and_the_server(mp_server):
    """Runs last in the module: it kills the server's engine."""
    pids = worker_pids(mp_server.log())
    (victim,) = worker_pids(mp_server.log(), "tiny")
    seen = kill_mid_stream(mp_server, "tiny", victim, {"Authorization": f"Bearer {API_KEY}"})
    assert seen.errors and seen.errors[0]["error"]["code"] == "engine_dead", seen.events[-3:]
    assert f"worker process {victim}" in seen.errors[0]["error"]["message"]
    assert seen.events[-1] == "data: [DONE]"
    # /health answers 503 until the process is gone (exit code 3), which the watch makes quick
    print(f"worker killed: stream ended with an error event, /health {seen.health} after {seen.took:.2f}s, "
          f"exit code {seen.code}")
    assert seen.health in (503, "gone") and seen.took < 10
    assert seen.code == 3, mp_server.log()
    deadline = time.monotonic() + 10
    while any(process_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if process_alive(p)], "a worker process outlived its server"
