"""surge's AVX-512 BF16 linear kernels (csrc/linear.cpp): their layouts, their results against a
float64 reference at every row count that takes a different path (1..4-row passes, many
rows), eager and compiled, and the layers that use them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from surge.layers import native_linear
from surge.layers.linear import PackedLinear
from surge.layers.quantization.quant_linear import TILE_MIN_ROWS, QuantLinear
from surge.layers.native import linear_ops
from surge.layers.quantization.formats import quantize_int4, quantize_int8_groups

pytestmark = pytest.mark.skipif(linear_ops() is None, reason="no AVX-512 BF16 on this CPU")

ROWS = [1, 2, 3, 4, 5, 8, 9, 33]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_close_to(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Within bf16 rounding of the output (2^-8 relative) plus float32 accumulation."""
    err = (got.double() - ref).abs()
    assert (err <= 2**-8 * ref.abs() + 1e-4 * ref.abs().max()).all(), err.max().item()


@pytest.mark.parametrize("n,k", [(64, 32), (192, 96), (128, 576)])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_kernel_matches_float64(n, k, rows, with_bias):
    w = (torch.randn(n, k, generator=_gen(0)) * 0.1).bfloat16()
    b = torch.randn(n, generator=_gen(1)).bfloat16() if with_bias else None
    x = torch.randn(rows, k, generator=_gen(2)).bfloat16()
    got = torch.ops.surge_native.linear_bf16(x, native_linear.pack_bf16(w), b)
    ref = x.double() @ w.double().t() + (b.double() if b is not None else 0)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    _assert_close_to(got, ref)


def test_int4_layout_round_trips():
    q = torch.randint(0, 16, (192, 128), generator=_gen(0))
    scale, minimum = torch.rand(192, 4, generator=_gen(1)) * 0.02, -torch.rand(192, 4, generator=_gen(2)) * 0.1
    nibbles, s = native_linear.pack_int4(q, scale, minimum)
    assert nibbles.shape == (3, 64, 64) and nibbles.dtype == torch.uint8
    assert s.shape == (3, 4, 2, 64) and s.dtype == torch.float16
    want = q.float() * scale.half().float().repeat_interleave(32, 1) + minimum.half().float().repeat_interleave(32, 1)
    assert torch.equal(native_linear.unpack_int4(nibbles, s), want)


NO_TILES = 1 << 30  # linear_quant's tile_min_rows: always from the codes
EMPTY = torch.empty(0, dtype=torch.uint8)  # no high bits: 4-bit codes


def _int4(x, nibbles, s, group, bias, planes=1, tile_min_rows=NO_TILES):
    return torch.ops.surge_native.linear_quant(x, nibbles, EMPTY, s, 0, group, bias, planes, tile_min_rows)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("tiles", [False, True])
def test_int4_kernel_matches_float64(group, rows, tiles):
    n, k = 128, 256
    q = torch.randint(0, 16, (n, k), generator=_gen(0))
    scale = torch.rand(n, k // group, generator=_gen(1)) * 0.02 + 1e-3
    minimum = -8 * scale + torch.randn(n, k // group, generator=_gen(2)) * 0.01
    nibbles, s = native_linear.pack_int4(q, scale, minimum)
    b = torch.randn(n, generator=_gen(3)).bfloat16()
    x = torch.randn(rows, k, generator=_gen(4)).bfloat16()
    got = _int4(x, nibbles, s, group, b, tile_min_rows=1 if tiles else NO_TILES)
    weight = native_linear.unpack_int4(nibbles, s)
    weight = weight.bfloat16() if tiles else weight  # a tile holds the weight rounded to bf16
    ref = x.double() @ weight.double().t() + b.double()
    _assert_close_to(got, ref)


def test_kernels_reject_mismatched_inputs():
    w = native_linear.pack_bf16(torch.randn(64, 32).bfloat16())
    with pytest.raises(RuntimeError, match="x has 48 columns, the weight 32"):
        torch.ops.surge_native.linear_bf16(torch.randn(1, 48).bfloat16(), w, None)
    with pytest.raises(RuntimeError, match="2-d bf16"):
        torch.ops.surge_native.linear_bf16(torch.randn(1, 32), w, None)
    nibbles, s = native_linear.pack_int4(torch.zeros(64, 64, dtype=torch.int64), torch.ones(64, 2), torch.zeros(64, 2))
    with pytest.raises(RuntimeError, match="group size 48"):
        _int4(torch.randn(1, 64).bfloat16(), nibbles, s, 48, None)
    with pytest.raises(RuntimeError, match="planes must be 1, or 2"):
        _int4(torch.randn(1, 64).bfloat16(), nibbles, s, 32, None, planes=2)  # one block
    with pytest.raises(RuntimeError, match="bias must be"):
        _int4(torch.randn(1, 64).bfloat16(), nibbles, s, 32, torch.zeros(3).bfloat16())


def test_packed_linear_takes_the_native_kernel_where_the_shape_fits(monkeypatch):
    w, b = (torch.randn(128, 96, generator=_gen(0)) * 0.1).bfloat16(), torch.randn(128, generator=_gen(1)).bfloat16()
    layer = PackedLinear(w, b)
    assert layer.native and layer.packed.shape == (2, 48, 128)
    x = torch.randn(2, 7, 96, generator=_gen(2)).bfloat16()
    got = layer(x)
    assert got.shape == (2, 7, 128)  # leading dims kept
    _assert_close_to(got, F.linear(x.double(), w.double(), b.double()))
    assert not PackedLinear(w[:96], b[:96]).native  # 96 output channels: not whole blocks of 64, oneDNN
    monkeypatch.setenv("SURGE_NATIVE_LINEAR", "0")
    assert not PackedLinear(w, b).native


@pytest.mark.parametrize("rows", [1, 4, 17])
def test_packed_linear_compiled_equals_eager(rows):
    """Two layers of one shape through one compiled graph: each uses its own weight."""
    a = PackedLinear((torch.randn(128, 64, generator=_gen(1)) * 0.1).bfloat16(), None)
    b = PackedLinear((torch.randn(128, 64, generator=_gen(2)) * 0.1).bfloat16(), None)
    fn = torch.compile(lambda layer, x: torch.relu(layer(x)), dynamic=True, fullgraph=True)
    x = torch.randn(rows, 64, generator=_gen(3)).bfloat16()
    assert torch.equal(fn(a, x), torch.relu(a(x)))
    assert torch.equal(fn(b, x), torch.relu(b(x)))
    torch._dynamo.reset()


@pytest.mark.parametrize("make,kind", [(lambda w: quantize_int4(w, 64), "int4"), (quantize_int8_groups, "int8g")],
                         ids=["int4-g64", "int8-g32"])
def test_quant_linear_native_path_matches_its_dequantized_weight(make, kind):
    w = torch.randn(128, 256, generator=_gen(0)) * 0.05
    qw = make(w)
    layer = QuantLinear(qw, torch.randn(128, generator=_gen(1)) * 0.1, torch.bfloat16)
    assert layer.native
    # scales and mins kept in fp16: the weight it holds is the quantized one within fp16 rounding
    want = qw.dequantize()
    assert (layer.dequantize() - want).abs().max() <= 2**-10 * want.abs().max()
    assert layer.dense is None  # many rows dequantize tiles: no dense copy
    for rows in [1, 3, 8, TILE_MIN_ROWS[kind] - 1, TILE_MIN_ROWS[kind], 40]:
        x = torch.randn(rows, 256, generator=_gen(rows)).bfloat16()
        weight = layer.dequantize()
        weight = weight.bfloat16() if rows >= TILE_MIN_ROWS[kind] else weight  # tiles hold bf16
        ref = x.double() @ weight.double().t() + layer.bias.double()
        _assert_close_to(layer(x), ref)
    # below the tiles, a row's output has the same bits alone and beside others (a verified
    # proposal equals the token decoded alone); tests/layers/test_gguf_block_kernels.py: GGUF blocks
    x = torch.randn(TILE_MIN_ROWS[kind] - 1, 256, generator=_gen(7)).bfloat16()
    alone = torch.cat([layer(x[i:i + 1]) for i in range(x.shape[0])])
    for rows in (4, 5, 8, x.shape[0]):
        assert torch.equal(layer(x[:rows]), alone[:rows]), rows


@pytest.mark.parametrize("make", [lambda w: quantize_int4(w, 64), quantize_int8_groups], ids=["int4-g64", "int8-g32"])
def test_packing_a_slice_of_rows_at_a_time_equals_packing_whole(make):
    """The same layout whichever slices the rows were packed in."""
    qw = make(torch.randn(320, 256, generator=_gen(0)))
    whole = native_linear.pack_groups(qw, values_per_slice=1 << 30)  # one slice
    sliced = native_linear.pack_groups(qw, values_per_slice=128 * 256 + 5)  # 128, 128, 64 rows
    assert torch.equal(whole.q, sliced.q) and torch.equal(whole.qh, sliced.qh) and torch.equal(whole.s, sliced.s)
    assert whole.q.shape[0] == 320 // 64


def test_int8_groups_every_code_exactly():
    """GGUF's Q8_0 / int8 groups as 8-bit codes (two nibbles) and one fp16 scale a group: every
    code -128..127 in every nibble position comes back exactly, and the product of few rows
    (codes) and many (tiles) equals the float64 one within bf16 rounding."""
    from surge.layers.quantization.formats import Int8GroupWeight

    q = (torch.arange(128 * 256) % 256 - 128).reshape(128, 256)
    q = q[:, torch.randperm(256, generator=_gen(0))].to(torch.int8)  # each code in several channels and columns
    scale = (torch.rand(128, 256 // 32, generator=_gen(1)) * 0.01 + 1e-4).half().float()  # fp16-exact
    weight = Int8GroupWeight(q, scale)
    layer = QuantLinear(weight, None, torch.bfloat16)
    assert layer.native and layer.kind == "int8g" and layer.planes == 1
    assert torch.equal(layer.dequantize(), weight.dequantize())
    assert layer.packed.numel() + layer.high.numel() == q.numel() and layer.scales_zeros.numel() == scale.numel()
    for rows in [1, 5, TILE_MIN_ROWS["int8g"], 33]:
        x = torch.randn(rows, 256, generator=_gen(rows)).bfloat16()
        w = weight.dequantize()
        w = w.bfloat16() if rows >= TILE_MIN_ROWS["int8g"] else w
        _assert_close_to(layer(x), x.double() @ w.double().t())
