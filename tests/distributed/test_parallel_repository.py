"""One `surge serve` over a model repository whose models each run split their own way (their
surge.toml): the engines of one process, each with process groups of its own, answer through the
OpenAI client what a single process answers: a tiny Llama (4 heads, 2 KV heads) at TP=2, PP=2
and TP=2 x PP=2, one with 1 KV head at TP=2 (replicated), the default model's 4-bit GGUF at TP=3
and at PP=2, a tiny Mixtral and a tiny Qwen2-MoE each at TP=2 with their experts split and with
expert parallelism."""

from __future__ import annotations

import os
import re

import pytest
from openai import OpenAI

from surge import LLM, SamplingParams
from tests.conftest import build_tiny_model
from tests.helpers import process_alive
from tests.server.conftest import launch, put

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
SPLITS = {
    "llama-tp2": ("tensor_parallel_size = 2\n", "llama", {}),
    "llama-pp2": ("pipeline_parallel_size = 2\n", "llama", {}),
    "llama-tp2-pp2": ("tensor_parallel_size = 2\npipeline_parallel_size = 2\n", "llama", {}),
    "llama-kv1": ("tensor_parallel_size = 2\n", "llama", dict(num_key_value_heads=1)),
    "default-tp3": ("tensor_parallel_size = 3\n", None, {}),
    "default-pp2": ("pipeline_parallel_size = 2\n", None, {}),
    "mixtral-ep2": ("tensor_parallel_size = 2\nenable_expert_parallel = true\n", "mixtral", {}),
    "mixtral-tp2": ("tensor_parallel_size = 2\n", "mixtral", {}),
    "qwen-moe-tp2": ("tensor_parallel_size = 2\n", "qwen2_moe", {}),
    "qwen-moe-ep2": ("tensor_parallel_size = 2\nenable_expert_parallel = true\n", "qwen2_moe", {}),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_tokenizer_dir, default_gguf_path):
    root = tmp_path_factory.mktemp("parallel-repo")
    (root / "gguf").mkdir()
    os.symlink(default_gguf_path, root / "gguf" / os.path.basename(default_gguf_path))
    paths = {}  # name -> (the version's directory, what a single process loads)
    built: dict[str, object] = {}
    for name, (_, kind, overrides) in SPLITS.items():
        if kind is None:
            paths[name] = (root / "gguf", default_gguf_path)
            continue
        key = f"{kind}-{sorted(overrides.items())}"
        if key not in built:
            built[key] = build_tiny_model(kind, root / "tiny" / str(len(built)), tiny_tokenizer_dir, **overrides)
        paths[name] = (built[key], str(built[key]))
    return root, paths


def test_a_repository_of_split_models_serves_what_one_process_serves(sources):
    root, paths = sources
    repo = root / "repo"
    repo.mkdir()
    for name, (toml, _, _) in SPLITS.items():
        put(repo, name, 1, paths[name][0])
        (repo / name / "surge.toml").write_text(toml)
    srv = launch(root, "--model-repository", str(repo), "--dtype", "float32", "--kv-cache-memory", str(16 << 20),
                 "--no-warmup")
    try:
        log = srv.log()
        ranks = [int(p) for group in re.findall(r"ranks 1\.\.\d+ in processes ([\d, ]+),", log)
                 for p in group.split(",")]
        assert len(ranks) == 1 + 1 + 3 + 1 + 2 + 1 + 1 + 1 + 1 + 1, log
        client = OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=120)
        got = {name: [client.completions.create(model=name, prompt=p, max_tokens=12, temperature=0).choices[0].text
                      for p in PROMPTS] for name in SPLITS}
    finally:
        srv.stop()
    assert not any(process_alive(p) for p in ranks)
    greedy = SamplingParams(max_tokens=12, temperature=0)
    wants: dict[str, list[str]] = {}  # one single-process run per checkpoint
    for name in SPLITS:
        source = paths[name][1]
        if source not in wants:
            with LLM(source, dtype="float32", kv_cache_memory=16 << 20) as llm:
                wants[source] = [llm.generate(p, greedy)[0].outputs[0].text for p in PROMPTS]
        assert got[name] == wants[source], name
