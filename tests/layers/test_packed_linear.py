"""Packed dense linears: oneDNN-prepacked ones give the same numbers as F.linear, in eager and
compiled graphs (shapes of 96 output channels: surge's own kernels take whole blocks of 64,
tests/layers/test_native_linear.py); every model ends up with packed linears; the plain path
where packing is off."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from surge.layers import linear
from surge.layers.linear import PackedLinear, can_pack, dense_linear
from surge.layers.native import linear_ops
from tests.conftest import build_tiny_model

pytestmark = pytest.mark.skipif(not can_pack(torch.bfloat16), reason="oneDNN bf16 not supported on this CPU")


def _wb(n=96, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * 0.1).bfloat16(), torch.randn(n, generator=g).bfloat16()


@pytest.mark.parametrize("rows", [1, 5, 64, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_equals_f_linear_bit_for_bit(rows, with_bias):
    w, b = _wb()
    b = b if with_bias else None
    x = torch.randn(rows, 64).bfloat16()
    layer = PackedLinear(w, b)
    assert torch.equal(layer(x), F.linear(x, w, b))
    assert torch.equal(layer(x.view(1, rows, 64)), F.linear(x, w, b).view(1, rows, 96))  # leading dims kept


def test_packed_in_a_compiled_graph_reads_each_layers_own_weight():
    """Two layers of one shape share the compiled graph; each must still use its own weight."""
    (w1, _), (w2, _) = _wb(seed=1), _wb(seed=2)
    a, b = PackedLinear(w1, None), PackedLinear(w2, None)
    fn = torch.compile(lambda layer, x: torch.relu(layer(x)), dynamic=True, fullgraph=True)
    for rows in (3, 17):
        x = torch.randn(rows, 64).bfloat16()
        assert torch.equal(fn(a, x), torch.relu(F.linear(x, w1)))
        assert torch.equal(fn(b, x), torch.relu(F.linear(x, w2)))
    torch._dynamo.reset()


def test_packed_weights_are_released_with_their_layer():
    before = len(linear._PACKED)
    layer = PackedLinear(*_wb())
    assert len(linear._PACKED) == before + 1
    del layer
    gc.collect()
    assert len(linear._PACKED) == before


def test_dense_linear_is_plain_where_packing_is_off(monkeypatch):
    w, b = _wb()
    assert isinstance(dense_linear(w, b), PackedLinear)
    assert type(dense_linear(w.float(), b.float())) is nn.Linear  # float32: F.linear as before
    monkeypatch.setenv("SURGE_PACKED_LINEAR", "0")
    plain = dense_linear(w, b)
    assert type(plain) is nn.Linear
    x = torch.randn(4, 64).bfloat16()
    assert torch.equal(plain(x), F.linear(x, w, b))


@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_bf16_models_use_packed_linears_with_unchanged_results(tmp_path, tiny_tokenizer_dir, monkeypatch, quantization):
    """A bf16 model ends with its float linears packed (the tied LM head too, the embedding
    table kept) and the dense copies of quantized ones packed where they keep one (not on surge's
    own kernels, which dequantize tiles for many rows); its tokens and logprobs are
    those of the same model with packing off (logprobs within bf16 rounding)."""
    from surge import LLM, SamplingParams
    from surge.layers.quantization.quant_linear import QuantLinear

    path = build_tiny_model("llama", tmp_path / "m", tiny_tokenizer_dir, tie_word_embeddings=True)
    kwargs = dict(dtype="bfloat16", quantization=quantization, kv_cache_memory=8 << 20)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=3)
    prompts = ["Hello, world. How are you", "The quick brown fox"] * 6  # 12 rows: the dense path
    packed = LLM(str(path), **kwargs)
    model = packed.engine.core.executor.worker.model
    assert not any(type(m) is nn.Linear for m in model.modules())
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if quantization == "none":
        assert not quantized and isinstance(model.lm_head, PackedLinear)
        assert isinstance(model.model.embed_tokens.weight, nn.Parameter)
    else:
        assert len(quantized) == 9  # 2 x 4 + head
        assert all(m.dense is None if m.native else isinstance(m.dense, PackedLinear) for m in quantized)
    # every shape of the tiny model fits surge's kernels where the CPU has AVX-512 BF16
    native = linear_ops() is not None
    assert all(m.native == native for m in model.modules() if isinstance(m, (PackedLinear, QuantLinear)))
    got = packed.generate(prompts, params)
    monkeypatch.setenv("SURGE_PACKED_LINEAR", "0")
    want = LLM(str(path), **kwargs).generate(prompts, params)
    for w, g in zip(want, got):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for gp, wp in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):  # other summation orders
            assert gp.keys() == wp.keys()
            assert all(gp[t].logprob == pytest.approx(wp[t].logprob, abs=2e-2) for t in gp)
