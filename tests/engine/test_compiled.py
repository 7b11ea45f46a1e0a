"""The forward under torch.compile: same tokens and logits as eager on a tiny model, a fixed set
of graphs after warm-up (no recompiles for new batch sizes or context lengths)."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from surge import LLM, SamplingParams
from tests.conftest import build_tiny_model

PROMPTS = ["Hello, world. How are you", "The quick brown fox", "def main(argv):", "Numbers 12345 and 3.14159"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer_dir):
    return build_tiny_model("llama", tmp_path_factory.mktemp("compiled"), tiny_tokenizer_dir)


@pytest.mark.slow
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_compiled_forward_equals_eager_without_recompiles(tiny_dir, caplog, kv_cache_dtype):
    kwargs = dict(dtype="float32", quantization="none", kv_cache_memory=8 << 20, max_num_seqs=8,
                  kv_cache_dtype=kv_cache_dtype)
    eager = LLM(str(tiny_dir), **kwargs)
    compiled = LLM(str(tiny_dir), compile=True, **kwargs)
    with caplog.at_level(logging.INFO, logger="surge.worker.compiled"):
        report = compiled.engine.warm_up()
    warm_graphs = compiled.engine.stats().num_compiles
    assert report.decode_batch_sizes == [1, 2, 4, 8] and 1 <= warm_graphs <= 8
    assert "compiling the forward" in caplog.text

    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=3)
    # Inductor's fused kernels round K/V a little differently from eager; in an int8 cache a
    # value that close to a step boundary lands on the other step (~4e-4 in a logprob seen)
    tolerance = 1e-4 if kv_cache_dtype == "auto" else 2e-3
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="surge.worker.compiled"):
        for batch in (PROMPTS[:1], PROMPTS, PROMPTS[:3] * 2):  # batch sizes 1, 4, 6 and new context lengths
            want = eager.generate(batch, params)
            got = compiled.generate(batch, params)
            for w, g in zip(want, got):
                assert g.outputs[0].token_ids == w.outputs[0].token_ids
                for wl, gl in zip(w.outputs[0].logprobs, g.outputs[0].logprobs):
                    for tid, lp in wl.items():
                        assert gl[tid].logprob == pytest.approx(lp.logprob, abs=tolerance)
    assert compiled.engine.stats().num_compiles == warm_graphs  # nothing recompiled while "serving"
    assert "while serving" not in caplog.text
    assert compiled.engine.is_idle_clean()
    torch._dynamo.reset()



@pytest.mark.slow
def test_three_compiled_models_in_one_process(tiny_dir):
    """Dynamo keeps the graphs of every CompiledModel in one cache (one code object), with the
    guards on the model's modules skipped: a float, an int4 and an int8 model of the same shapes, one
    after the other in one process (versions of a model, compare.py), must each get graphs
    that compute their own model, and together they pass Dynamo's default limit of 8 graphs,
    a hard error under fullgraph before the limit was raised."""
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    for quantization in ("none", "int4", "int8"):
        kwargs = dict(dtype="float32", quantization=quantization, kv_cache_memory=8 << 20, max_num_seqs=8)
        eager = LLM(str(tiny_dir), **kwargs)
        compiled = LLM(str(tiny_dir), compile=True, **kwargs)
        compiled.engine.warm_up()
        assert compiled.engine.stats().num_compiles >= 1  # its own graphs, not the previous model's
        for batch in (PROMPTS[:1], PROMPTS):
            for w, g in zip(eager.generate(batch, params), compiled.generate(batch, params)):
                assert g.outputs[0].token_ids == w.outputs[0].token_ids
                for wl, gl in zip(w.outputs[0].logprobs, g.outputs[0].logprobs):
                    for tid, lp in wl.items():
                        assert gl[tid].logprob == pytest.approx(lp.logprob, abs=1e-4)
    torch._dynamo.reset()



def test_inductor_cache_is_kept_per_version_of_the_native_kernels(monkeypatch, tmp_path):
    """Inductor's cache key does not cover a custom op's schema: graphs compiled against one
    version of the native kernels must not be found by another."""
    from surge.layers import native
    from surge.worker.compiled import _configure_inductor

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    ours = os.path.join("surge", "inductor", native.sources_version())
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    _configure_inductor()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"].endswith(ours)
    # importing torch._dynamo writes Inductor's default there: not the user's choice, replaced
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    _configure_inductor()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"].endswith(ours)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's: kept
    _configure_inductor()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    source = tmp_path / "kernel.cpp"
    source.write_text("// one version\n")
    monkeypatch.setattr(native, "_SOURCES", [source])
    before = native.sources_version()
    source.write_text("// another\n")
    assert native.sources_version() != before
