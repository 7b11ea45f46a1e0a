"""Tensor parallelism: the ranks' model gives the single-process engine's tokens and logprobs."""

from __future__ import annotations

import os
import random
import re
import signal
import time

import pytest

from surge import LLM, SamplingParams
from surge.errors import EngineDeadError, InvalidArgumentError, ModelFormatError
from tests.conftest import TINY_VOCAB, build_tiny_model
from tests.executor.test_multiproc import _stream_until_killed as stream_until_killed
from tests.executor.test_multiproc import wait_until
from tests.helpers import process_alive


def prompts(count: int, low: int, high: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, TINY_VOCAB) for _ in range(rng.randint(low, high))] for _ in range(count)]


@pytest.fixture(scope="module", params=[2, 1], ids=["4-heads-2-kv", "4-heads-1-kv"])
def tiny_path(request, tmp_path_factory, tiny_tokenizer_dir):
    return build_tiny_model("llama", tmp_path_factory.mktemp("tp") / f"kv{request.param}", tiny_tokenizer_dir,
                            num_key_value_heads=request.param, attention_bias=True)


def _run(path, **settings):
    shared = prompts(1, 40, 40, seed=1)[0]
    batch = [shared + p for p in prompts(6, 5, 80, seed=2)] + prompts(6, 20, 120, seed=3)
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=3,
                             prompt_logprobs=2 if i % 4 == 3 else None) for i in range(len(batch))]
    with LLM(str(path), dtype="float32", max_num_batched_tokens=24, **settings) as llm:
        outs = llm.generate(batch, params)
        stats = llm.engine.stats()
        return outs, stats, rank0(llm)


def rank0(llm: LLM):
    """Rank 0's weights and cache (the engine's model_info counts every rank's)."""
    return getattr(llm.engine.core.executor, "rank_infos", [llm.engine.model_info])[0]


def _block_bytes(path, **settings) -> int:
    with LLM(str(path), dtype="float32", kv_cache_memory=1 << 20, **settings) as llm:
        return rank0(llm).kv_cache_bytes // llm.engine.scheduler.pool.num_blocks


def _logprob_values(outs) -> list[dict[int, float]]:
    rows = []
    for o in outs:
        rows += [{t: lp.logprob for t, lp in d.items()} for d in o.prompt_logprobs or [] if d]
        rows += [{t: lp.logprob for t, lp in d.items()} for d in o.outputs[0].logprobs]
    return rows


def test_tp2_equals_one_process(tiny_path):
    """Greedy tokens equal, logprobs (sampled and prompt) within 1e-4 of their scale, with prefix
    caching, chunked prefill (24 tokens a step) and preemption (a cache of 20 blocks, per rank);
    a rank's cache block holds its own KV heads (half of 2, or the one replicated)."""
    per_block, tp_block = _block_bytes(tiny_path), _block_bytes(tiny_path, tensor_parallel_size=2)
    kv_heads = int(tiny_path.name.removeprefix("kv"))
    assert tp_block == per_block // 2 if kv_heads == 2 else tp_block == per_block
    ref, _, _ = _run(tiny_path, kv_cache_memory=20 * per_block)
    got, stats, _ = _run(tiny_path, kv_cache_memory=20 * tp_block, tensor_parallel_size=2)
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
    want, have = _logprob_values(ref), _logprob_values(got)
    scale = max(abs(v) for row in want for v in row.values())
    assert len(want) == len(have) > 100
    for w, h in zip(want, have):
        assert w.keys() == h.keys()
        assert all(abs(w[t] - h[t]) <= 1e-4 * scale for t in w), (w, h)


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def moe_path(request, tmp_path_factory, tiny_tokenizer_dir):
    return build_tiny_model(request.param, tmp_path_factory.mktemp("tp-moe") / request.param, tiny_tokenizer_dir)


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["experts-split", "expert-parallel"])
def test_moe_tp2_and_ep2_equal_one_process(moe_path, expert_parallel):
    """Each expert split in two (and Qwen2-MoE's shared expert), or half the experts whole on
    each rank: the single-process tokens and logprobs, with prefix caching, chunked prefill and
    preemption; expert parallelism holds half the experts' weights on each rank."""
    per_block = _block_bytes(moe_path)
    ref, _, ref_info = _run(moe_path, kv_cache_memory=20 * per_block)
    got, stats, info = _run(moe_path, kv_cache_memory=10 * per_block, tensor_parallel_size=2,
                            enable_expert_parallel=expert_parallel)
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert info.weight_bytes < 0.6 * ref_info.weight_bytes
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
    want, have = _logprob_values(ref), _logprob_values(got)
    scale = max(abs(v) for row in want for v in row.values())
    for w, h in zip(want, have):
        assert w.keys() == h.keys() and all(abs(w[t] - h[t]) <= 1e-4 * scale for t in w), (w, h)


@pytest.mark.slow
def test_tp3_and_pp2_on_the_default_models_4bit_gguf():
    """9 heads / 3 KV heads over 3 ranks, the GGUF's Q4_1 blocks cut between blocks (o_proj: 576
    columns, 192 a rank); and 30 layers in two stages of 15: the single-process engine's greedy
    tokens, logprobs within 1e-4 of their scale; a TP rank holds about a third of the weights, the
    first stage under three quarters (its 15 layers, and the embedding and LM head)."""
    texts = ["The capital of France is", "def fibonacci(n):"]
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=3)
    with LLM(dtype="float32", kv_cache_memory=32 << 20) as llm:
        ref, ref_info = llm.generate(texts, params), rank0(llm)
    for settings, share in ((dict(tensor_parallel_size=3), 0.4), (dict(pipeline_parallel_size=2), 0.75)):
        with LLM(dtype="float32", kv_cache_memory=32 << 20, **settings) as llm:
            got, info, total = llm.generate(texts, params), rank0(llm), llm.engine.model_info
        assert total.weight_bytes > info.weight_bytes and total.kv_cache_bytes > info.kv_cache_bytes
        assert "int4" in info.quantization, settings
        assert info.weight_bytes < share * ref_info.weight_bytes, settings
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref], settings
        want, have = _logprob_values(ref), _logprob_values(got)
        scale = max(abs(v) for row in want for v in row.values())
        for w, h in zip(want, have):
            assert all(abs(w[t] - h[t]) <= 1e-4 * scale for t in w.keys() & h.keys()), settings


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory, tiny_tokenizer_dir):
    return build_tiny_model("llama", tmp_path_factory.mktemp("tp-faults") / "m", tiny_tokenizer_dir)


TINY = dict(dtype="float32", kv_cache_memory=16 << 20, tensor_parallel_size=2)


@pytest.mark.parametrize("sig, cause, settings", [
    (signal.SIGKILL, "killed by signal 9", {}),
    (signal.SIGSTOP, "stopped responding", {}),
    (signal.SIGKILL, "killed by signal 9", dict(tensor_parallel_size=1, pipeline_parallel_size=2)),
], ids=["tp2-kill", "tp2-stop", "pp2-kill"])
def test_a_rank_killed_or_hung_mid_stream_ends_the_stream_with_an_error(llama_path, sig, cause, settings):
    llm = LLM(str(llama_path), **{**TINY, **settings})
    pid = llm.engine.core.executor.pids[0]
    tokens, error, took = stream_until_killed(llm, pid, sig)
    print(f"{signal.Signals(sig).name}: stream ended {took:.2f}s after the signal")
    assert 3 <= len(tokens) < 900
    assert isinstance(error, EngineDeadError) and cause in str(error) and str(pid) in str(error)
    assert took < 10
    llm.shutdown()
    assert not process_alive(pid)


def test_shutdown_and_collection_leave_no_rank_process(llama_path, tmp_path, tiny_tokenizer_dir):
    six = build_tiny_model("llama", tmp_path / "six", tiny_tokenizer_dir, hidden_size=96, num_attention_heads=6,
                           num_key_value_heads=3, intermediate_size=96)
    llm = LLM(str(six), **{**TINY, "tensor_parallel_size": 3})
    pids = llm.engine.core.executor.pids
    assert len(pids) == 2 and all(process_alive(p) for p in pids)
    assert llm.generate("hello", SamplingParams(max_tokens=4, ignore_eos=True))[0].outputs[0].token_ids
    llm.shutdown()
    assert not any(process_alive(p) for p in pids)
    with pytest.raises(EngineDeadError, match="shut down"):
        llm.generate("hello", SamplingParams(max_tokens=2))
    import gc

    pids = LLM(str(llama_path), **TINY).engine.core.executor.pids
    gc.collect()
    wait_until(lambda: not any(process_alive(p) for p in pids), 10)


def test_a_bad_request_fails_alone_and_the_ranks_stay_in_step(llama_path):
    """Bad input fails the same way on every rank: that request ends with its error, the group
    goes on serving."""
    with LLM(str(llama_path), **TINY) as llm:
        good = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        want = llm.generate([[5, 6, 7]], good)[0].outputs[0].token_ids
        with pytest.raises(Exception):
            llm.generate([[5, TINY_VOCAB + 50]], good)
        assert llm.generate([[5, 6, 7]], good)[0].outputs[0].token_ids == want


def test_ranks_that_cannot_load_report_the_loaders_error(llama_path, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(llama_path, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = set(_children())
    start = time.monotonic()
    with pytest.raises(ModelFormatError, match="model.safetensors"):
        LLM(str(bad), **TINY)
    assert time.monotonic() - start < 30
    wait_until(lambda: not set(_children()) - before, 10)


def _children() -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True)]


@pytest.mark.parametrize("settings, message", [
    (dict(tensor_parallel_size=3), "tensor_parallel_size 3 does not divide the model's 4 attention heads"),
    (dict(tensor_parallel_size=64), "does not divide"),
    (dict(tensor_parallel_size=0), "tensor_parallel_size"),
    (dict(tensor_parallel_size=2, compile=True), "--compile with tensor or pipeline parallelism"),
    (dict(pipeline_parallel_size=3), "pipeline_parallel_size 3 is above the model's 2 layers"),
    (dict(tensor_parallel_size=2, enable_expert_parallel=True), "the LlamaForCausalLM model has no experts"),
    (dict(enable_expert_parallel=True), "it needs tensor_parallel_size above 1"),
])
def test_sizes_that_cannot_work_are_refused_at_start(llama_path, settings, message):
    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        LLM(str(llama_path), dtype="float32", **settings)


def test_more_ranks_than_the_model_splits_or_the_machine_holds(tmp_path, tiny_tokenizer_dir):
    wide = build_tiny_model("llama", tmp_path / "wide", tiny_tokenizer_dir, num_attention_heads=16,
                            num_key_value_heads=16, hidden_size=64, intermediate_size=128)
    cores = os.cpu_count() or 1
    size = next(n for n in (4, 8, 16) if n > 2 * cores)
    with pytest.raises(InvalidArgumentError, match=f"tensor_parallel_size {size} is above twice"):
        LLM(str(wide), dtype="float32", tensor_parallel_size=size)
    uneven = build_tiny_model("llama", tmp_path / "uneven", tiny_tokenizer_dir, num_key_value_heads=4,
                              num_attention_heads=4, intermediate_size=101)
    with pytest.raises(InvalidArgumentError, match="does not divide the model's MLP width 101"):
        LLM(str(uneven), dtype="float32", tensor_parallel_size=2)


def test_a_split_that_cuts_a_quantized_block_is_refused_with_the_numbers(llama_path):
    """int4 groups of 64 on o_proj's 64 input columns split 2 ways (32 a rank) would cut a group; a
    GGUF's Q8_0 blocks of 32 on 64 columns split 4 ways (16 a rank) too."""
    with pytest.raises(InvalidArgumentError, match=r"o_proj's 64 input columns give 32 a rank, which int4 groups "
                                                   r"of 64 would cut"):
        LLM(str(llama_path), dtype="float32", quantization="int4", group_size=64, tensor_parallel_size=2)
    from gguf import GGMLQuantizationType as T

    from tests.gguf_builder import write_gguf_from_hf

    gguf_path = write_gguf_from_hf(llama_path, llama_path.parent / "q8.gguf",
                                   {f"blk.{i}.attn_output.weight": T.Q8_0 for i in range(2)})
    with pytest.raises(InvalidArgumentError, match=r"tensor_parallel_size 4: model.layers.0.self_attn.o_proj.weight "
                                                   r"has 64 input columns in blocks of 32 \(int8 groups, Q8_0\); "
                                                   r"4 shares of 16 would cut a block"):
        LLM(str(gguf_path), dtype="float32", tensor_parallel_size=4)


@pytest.mark.parametrize("tp, pp", [(1, 2), (2, 2)], ids=["pp2", "tp2-pp2"])
def test_pipeline_stages_equal_one_process(tiny_path, tp, pp):
    """Two stages of one layer each (and, with TP=2, 4 processes: 2 stages of 2 ranks): the
    single-process tokens and logprobs with prefix caching, chunked prefill and preemption; each
    stage's cache holds its layer only."""
    if tp > 1 and tiny_path.name != "kv2":
        pytest.skip("one of the two checkpoints is enough for the 4-process grid")
    per_block = _block_bytes(tiny_path)
    ref, _, ref_info = _run(tiny_path, kv_cache_memory=20 * per_block)
    stage_block = per_block // 2 // tp
    got, stats, info = _run(tiny_path, kv_cache_memory=20 * stage_block, tensor_parallel_size=tp,
                            pipeline_parallel_size=pp)
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert info.kv_cache_bytes == 20 * stage_block
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
    want, have = _logprob_values(ref), _logprob_values(got)
    scale = max(abs(v) for row in want for v in row.values())
    for w, h in zip(want, have):
        assert w.keys() == h.keys() and all(abs(w[t] - h[t]) <= 1e-4 * scale for t in w), (w, h)


@pytest.mark.parametrize("kind", ["qwen3", "gemma3"])
def test_other_families_split_equal_one_process(kind, tmp_path, tiny_tokenizer_dir):
    """Per-head q/k norms (Qwen3); Gemma 3's sliding-window layers, (1 + w) norms around attention
    and MLP and scaled embeddings: TP=2 and PP=2 give the single-process greedy tokens."""
    path = build_tiny_model(kind, tmp_path / kind, tiny_tokenizer_dir)
    batch = prompts(6, 5, 60, seed=4)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    with LLM(str(path), dtype="float32", kv_cache_memory=4 << 20) as llm:
        want = [o.outputs[0].token_ids for o in llm.generate(batch, params)]
    for settings in (dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)):
        with LLM(str(path), dtype="float32", kv_cache_memory=4 << 20, **settings) as llm:
            assert [o.outputs[0].token_ids for o in llm.generate(batch, params)] == want, settings


def test_rank_0_gives_the_callers_torch_threads_back(llama_path):
    """Rank 0 runs in the caller's process with its share of the threads (a process-wide torch
    setting): shutting the engine down, or dropping it, gives the caller's count back."""
    import gc

    import torch

    before = torch.get_num_threads()
    with LLM(str(llama_path), **{**TINY, "threads": before + 1}):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    LLM(str(llama_path), **{**TINY, "threads": before + 1})
    gc.collect()
    assert torch.get_num_threads() == before
