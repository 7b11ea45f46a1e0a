"""GGUF's K-quants (Q4_K, Q5_K, Q6_K) and Q5_0 / Q5_1 run from their blocks: decoding equals
gguf-py's dequantization exactly, the packed layout gives the same weight back exactly, and
linear_quant equals that weight times the input at 1, 5, 33 and 512 rows on both of its paths
(codes for few rows, bf16 tiles for many), including weights longer than one tile."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from surge.layers import native_linear
from surge.layers.native import linear_ops
from surge.layers.quantization.gguf_blocks import GgufBlockWeight, decode_blocks, dequantize_codes
from surge.layers.quantization.quant_embedding import QuantEmbedding
from surge.layers.quantization.quant_linear import TILE_MIN_ROWS, QuantLinear

T = gguf.GGMLQuantizationType
TYPES = [T.Q4_K, T.Q5_K, T.Q6_K, T.Q5_0, T.Q5_1]
# byte offsets of each block's fp16 scales: random bytes there could be inf / nan
HALF_FIELDS = {T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208], T.Q5_0: [0], T.Q5_1: [0, 2]}
native = pytest.mark.skipif(linear_ops() is None, reason="no AVX-512 BF16 on this CPU")


def random_blocks(qtype: T, rows: int, cols: int, seed: int = 0) -> GgufBlockWeight:
    """Blocks of random codes and sub-scales with fp16 scales of a trained model's size."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for offset in HALF_FIELDS[qtype]:
        d = rng.uniform(1e-4, 3e-3, (rows, cols // block)).astype(np.float16)
        raw[..., offset:offset + 2] = d.view(np.uint8).reshape(rows, cols // block, 2)
    return GgufBlockWeight(torch.from_numpy(raw.reshape(rows, -1)), int(qtype), cols)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_decoded_codes_and_scales_equal_gguf_py(qtype):
    w = random_blocks(qtype, 8, 512)
    want = torch.from_numpy(gguf.quants.dequantize(w.raw.numpy(), qtype).astype(np.float32)).reshape(8, 512)
    assert torch.equal(dequantize_codes(decode_blocks(w)), want)
    assert torch.equal(w.dequantize(), want)


@native
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_packed_layout_gives_the_weight_back_exactly(qtype):
    w = random_blocks(qtype, 192, 768)
    layer = QuantLinear(w, None, torch.bfloat16)
    assert layer.native and layer.dense is None
    assert torch.equal(layer.dequantize(), w.dequantize())
    ids = torch.tensor([191, 0, 64, 65, 127, 5, 5])
    assert torch.equal(layer.rows(ids), w.dequantize()[ids])


@pytest.mark.parametrize("qtype", [T.Q6_K, T.Q5_0], ids=lambda t: t.name)
def test_packing_a_slice_of_rows_at_a_time_equals_packing_whole(qtype):
    w = random_blocks(qtype, 320, 512)  # slices of 128 rows: 128, 128, 64
    whole = native_linear.pack_codes(decode_blocks(w))
    sliced = native_linear.pack_blocks(w, values_per_slice=128 * 512 + 100)
    for a, b in [(whole.q, sliced.q), (whole.qh, sliced.qh), (whole.s, sliced.s)]:
        assert torch.equal(a, b)
    assert (sliced.kind, sliced.group_size) == (whole.kind, whole.group_size)


def _bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.double().abs() @ w.double().abs().t()


@native
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 5, 33, 512])
@pytest.mark.parametrize("path", ["codes", "tiles"])
@pytest.mark.parametrize("n,k", [(192, 768), (64, 4608)], ids=["one-tile", "two-tiles"])
def test_linear_equals_the_blocks_weight_times_the_input(qtype, rows, path, n, k):
    """Codes: the exact weight times x in float32, rounded once to bf16 (tolerance: that
    rounding, 2^-8 relative, plus 2^-12 of sum |x||w| for float32 sums of 128 + code). Tiles:
    the same against the weight rounded to bf16, which is what a tile holds."""
    if rows == 512 and k > 1000:
        rows = 64
    w = random_blocks(qtype, n, k, seed=rows)
    packed = native_linear.pack_codes(decode_blocks(w))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(1)).bfloat16()
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(2)).bfloat16()
    weight = w.dequantize().double()
    if path == "tiles":
        weight = weight.bfloat16().double()
    tile_min_rows = 1 if path == "tiles" else 1 << 30
    got = torch.ops.surge_native.linear_quant(x, packed.q, packed.qh, packed.s, native_linear.KIND_CODES[packed.kind],
                                              packed.group_size, bias, 1, tile_min_rows)
    ref = x.double() @ weight.t() + bias.double()
    err = (got.double() - ref).abs()
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16
    assert (err <= 2**-8 * ref.abs() + 2**-12 * _bound(x, weight)).all(), (err / _bound(x, weight)).max().item()


@native
def test_quant_linear_picks_the_path_by_rows_and_keeps_no_dense_copy():
    w = random_blocks(T.Q4_K, 128, 512)
    layer = QuantLinear(w, None, torch.bfloat16)
    threshold = TILE_MIN_ROWS["q4_k"]
    x = torch.randn(threshold, 512).bfloat16()
    codes = torch.ops.surge_native.linear_quant(x, layer.packed, layer.high, layer.scales_zeros, layer.kind_code,
                                                layer.group_size, None, 1, 1 << 30)
    tiles = torch.ops.surge_native.linear_quant(x, layer.packed, layer.high, layer.scales_zeros, layer.kind_code,
                                                layer.group_size, None, 1, 1)
    assert torch.equal(layer(x), tiles) and torch.equal(layer(x[:-1]), codes[:-1])
    assert not torch.equal(codes, tiles)  # the paths differ (weights rounded to bf16 or not): the test can tell
    held = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert held <= 1.03 * w.raw.numel()  # 4.5 bits a weight in the file, 4.625 here


@native
def test_embedding_rows_come_from_the_blocks_rounded_once():
    w = random_blocks(T.Q6_K, 256, 512)
    table = QuantLinear(w, None, torch.bfloat16)
    embedding = QuantEmbedding(table, torch.bfloat16)
    ids = torch.tensor([[3, 255, 0], [64, 3, 128]])
    got = embedding(ids)
    assert got.shape == (2, 3, 512) and got.dtype == torch.bfloat16
    assert torch.equal(got, w.dequantize().bfloat16()[ids])
    with pytest.raises(RuntimeError, match="row 256 is out of range for 256 rows"):
        embedding(torch.tensor([256]))


@native
def test_kernel_rejects_mismatched_blocks():
    w = QuantLinear(random_blocks(T.Q5_K, 64, 256), None, torch.bfloat16)
    x = torch.randn(1, 256).bfloat16()
    with pytest.raises(RuntimeError, match="qh must be"):
        torch.ops.surge_native.linear_quant(x, w.packed, w.high[:, :1], w.scales_zeros, w.kind_code, 256, None, 1, 8)
    with pytest.raises(RuntimeError, match="s must be a contiguous uint8"):
        torch.ops.surge_native.linear_quant(x, w.packed, w.high, w.scales_zeros, 4, 256, None, 1, 8)  # as Q6_K
    with pytest.raises(RuntimeError, match="unknown weight kind 9"):
        torch.ops.surge_native.linear_quant(x, w.packed, w.high, w.scales_zeros, 9, 256, None, 1, 8)
    with pytest.raises(RuntimeError, match="planes must be 1"):
        torch.ops.surge_native.linear_quant(x, w.packed, w.high, w.scales_zeros, w.kind_code, 256, None, 2, 8)


@pytest.mark.parametrize("rows, dtype", [(96, torch.bfloat16), (128, torch.float32)], ids=["rows-not-64s", "float32"])
def test_blocks_the_kernels_cannot_take_run_dequantized(rows, dtype):
    """Output rows not in whole blocks of 64, or a float32 model: the blocks are dequantized
    into the float weight (the values gguf-py gives), not refused."""
    from torch import nn

    from surge.layers.quantization.apply import quantize_linears

    w = random_blocks(T.Q4_K, rows, 256)
    model = nn.Sequential(nn.Linear(256, rows, bias=False)).to(dtype)
    quantize_linears(model, {"0": {0: w}}, "auto", output_head="none")
    layer = model[0]
    assert not isinstance(layer, QuantLinear)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0)).to(dtype)
    ref = x.double() @ w.dequantize().to(dtype).double().t()
    err = (layer(x).double() - ref).abs()
    assert (err <= 2**-7 * ref.abs() + 1e-3 * _bound(x, w.dequantize())).all()


@native
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_a_rows_output_has_the_same_bits_beside_other_rows(qtype):
    """From the codes, a row's output is the same bits computed alone, in a pass of four or
    beside up to twenty others (a verified proposal must equal the token decoded alone)."""
    w = random_blocks(qtype, 128, 512)
    packed = native_linear.pack_codes(decode_blocks(w))
    x = torch.randn(21, 512, generator=torch.Generator().manual_seed(3)).bfloat16()

    def run(rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.surge_native.linear_quant(rows, packed.q, packed.qh, packed.s,
                                                   native_linear.KIND_CODES[packed.kind], packed.group_size, None, 1,
                                                   1 << 30)

    alone = torch.cat([run(x[i:i + 1]) for i in range(21)])
    for rows in (4, 5, 8, 21):
        assert torch.equal(run(x[:rows]), alone[:rows]), rows
