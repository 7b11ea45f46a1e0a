"""The int8 KV cache: rows quantized per token and head with an fp16 scale, written by the
Python path and the native decode step to the same bytes, read back by the native kernel, the
gathered decode path and the SDPA prompt path with the same results as a float cache holding
the dequantized values; capacity and the flag's errors."""

from __future__ import annotations

import pytest
import torch

from surge.config import CacheConfig
from surge.errors import InvalidArgumentError
from surge.layers.attention import (
    AttentionMetadata,
    dequantize_kv,
    gathered_decode_attention,
    paged_attention,
    quantize_kv,
    write_kv,
)
from surge.worker.kv_cache import allocate_kv_caches, bytes_per_block, cache_dtype
from tests.layers.test_native_attention import BS, make, ops  # noqa: F401  (ops: the module's fixture)


def int8_cache(cache: torch.Tensor) -> torch.Tensor:
    """A float cache [2, N, BS, Hk, D] quantized row by row into the int8 layout."""
    return quantize_kv(cache)


def test_quantize_rows_round_trip():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, 64, generator=gen) * torch.logspace(-3, 2, 50)[:, None, None]
    x[7, 1] = 0  # an all-zero row: scale 0, values 0
    rows = quantize_kv(x)
    assert rows.dtype == torch.int8 and rows.shape == (50, 3, 66)
    scale = rows[..., 64:].contiguous().view(torch.float16).float()
    assert torch.equal(scale.squeeze(-1), (x.abs().amax(-1) / 127).half().float())
    back = dequantize_kv(rows)
    assert torch.equal(back[7, 1], torch.zeros(64))
    assert ((back - x).abs() <= scale / 2 * (1 + 1e-3) + 1e-12).all()  # half a step at most
    assert rows[..., :64].abs().max() <= 127


@pytest.mark.parametrize("kind", ["float32", "fused_views", "strided_head_dim"])
def test_native_decode_step_writes_the_python_bytes(ops, kind):  # noqa: F811
    from tests.layers.test_native_attention import _new_kv

    q, cache, tables, lens = make(3, 9, 3, 64, [1, 20, 33], torch.bfloat16, torch.bfloat16, seed=5)
    cache = int8_cache(cache)
    k_new, v_new = _new_kv(kind)
    last = lens - 1
    slots = tables[torch.arange(3), last // BS] * BS + last % BS
    expected = cache.clone()
    write_kv(expected, k_new, v_new, slots)
    out = ops.paged_decode_step(q, k_new, v_new, cache, slots, tables, lens, 0.125, -1)
    assert torch.equal(cache, expected)
    want = ops.paged_decode_attention(q, dequantize_kv(cache), tables, lens, 0.125, -1)
    torch.testing.assert_close(out, want, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("group, head_dim", [(3, 64), (4, 128), (4, 256), (2, 96), (2, 40), (12, 64)])  # fixed, vector and scalar paths
@pytest.mark.parametrize("window", [-1, 50])
def test_native_kernel_reads_int8_as_the_dequantized_floats(ops, group, head_dim, window):  # noqa: F811
    q, cache, tables, lens = make(4, 2 * group, 2, head_dim, [1, 37, 700, 3000], torch.float32, torch.float32)
    rows = int8_cache(cache)
    out = ops.paged_decode_attention(q, rows, tables, lens, head_dim**-0.5, window)
    want = ops.paged_decode_attention(q, dequantize_kv(rows), tables, lens, head_dim**-0.5, window)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_gathered_decode_and_prompt_paths_read_int8(monkeypatch):
    """Without the native kernel (other devices): the gathered decode batch and the SDPA prompt
    chunks on int8 rows equal the same paths on the dequantized float cache."""
    monkeypatch.setattr("surge.layers.attention.native_decode", lambda kv_cache: False)
    q, cache, tables, lens = make(2, 9, 3, 64, [40, 70], torch.float32, torch.float32, seed=3)
    rows = int8_cache(cache)
    floats = dequantize_kv(rows)
    got = gathered_decode_attention(q, rows, tables, lens, 80, 0.125)
    want = gathered_decode_attention(q, floats, tables, lens, 80, 0.125)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # a step with one decoding sequence (context 40) and a 5-token prompt chunk (context 70)
    meta = AttentionMetadata(torch.zeros(6, dtype=torch.int64), tables, [0, 1, 6], [40, 70], BS)
    meta.split_decode(native=False)
    qs = torch.randn(6, 9, 64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(paged_attention(qs, rows, meta, 0.125), paged_attention(qs, floats, meta, 0.125),
                               atol=1e-6, rtol=1e-6)


def test_capacity_and_layout():
    from surge.config import ModelConfig

    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3)
    int8 = cache_dtype(CacheConfig(cache_dtype="int8"), torch.bfloat16)
    assert int8 == torch.int8 and cache_dtype(CacheConfig(), torch.bfloat16) == torch.bfloat16
    ratio = bytes_per_block(config, 16, torch.bfloat16) / bytes_per_block(config, 16, int8)
    assert ratio == pytest.approx(128 / 66)  # >= 1.9x the tokens in the same memory
    (layer, *_) = allocate_kv_caches(config, 4, 16, int8, "cpu")
    assert layer.shape == (2, 4, 16, 3, 66) and layer.dtype == torch.int8


def test_unknown_kv_cache_dtype_is_refused():
    with pytest.raises(InvalidArgumentError, match="unknown KV cache dtype 'fp4': choose one of auto, int8"):
        CacheConfig(cache_dtype="fp4")


def test_engine_serves_the_default_model_from_an_int8_cache():
    """Same memory, ~1.94x the tokens; prompts prefilled and decoded through the int8 rows."""
    from surge import LLM, SamplingParams

    memory = 32 << 20
    bf16 = LLM(kv_cache_memory=memory, dtype="bfloat16")
    int8 = LLM(kv_cache_memory=memory, dtype="bfloat16", kv_cache_dtype="int8")
    assert int8.engine.core.executor.worker.kv_caches[0].dtype == torch.int8
    assert int8.engine.capacity_tokens >= 1.9 * bf16.engine.capacity_tokens
    params = SamplingParams(max_tokens=16, temperature=0)
    prompts = ["The capital of France is", "The capital of Germany is"]
    outs = [o.outputs[0].text for o in int8.generate(prompts, params)]
    assert "Paris" in outs[0] and "Berlin" in outs[1], outs
