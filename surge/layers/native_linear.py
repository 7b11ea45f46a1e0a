"""Weight layouts of surge's AVX-512 BF16 linear kernels (csrc/linear.cpp).

Output channels in blocks of 64, the reduction dimension in pairs, so that one 64-byte load
feeds the dot-product instruction for 16 channels (bf16) or 64 channels (int4 nibbles).
`pack_*` build the layouts from plain weights once, at load; `unpack_int4` inverts the int4
one (tests). Block-quantized weights (int4 groups, GGUF's K-quants and Q5) share one layout of
codes and their scales (`PackedQuant`, see csrc/linear.cpp), run by `linear_quant`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from surge.layers.quantization.formats import Int4Weight, Int8GroupWeight, split_rows
from surge.layers.quantization.gguf_blocks import BlockCodes, GgufBlockWeight, decode_blocks

BLOCK = 64  # output channels per block


def fits(out_features: int, in_features: int, group_size: int = 2) -> bool:
    """Shapes the kernels take: whole blocks of output channels, whole groups of pairs."""
    return (out_features % BLOCK == 0 and group_size > 0 and group_size % 2 == 0
            and in_features % group_size == 0)


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N/64, K/2, 128] bf16: w[b, p, 2c + j] = W[64b + c, 2p + j]."""
    n, k = weight.shape
    w = weight.to(torch.bfloat16).reshape(n // BLOCK, BLOCK, k // 2, 2)
    return w.permute(0, 2, 1, 3).reshape(n // BLOCK, k // 2, 2 * BLOCK).contiguous()


def _nibble_sources() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each byte of a (block, pair) record: the channels of its low and high nibble and
    the position in the pair. The kernel splits the 64 bytes into low and high nibbles and
    widens each with AVX-512's unpacklo/unpackhi (per 128-bit lane), which yields the four
    16-channel vectors in this order."""
    byte = torch.arange(64)
    lane, j = byte // 16, byte % 16
    parity, i = j // 8, j % 8  # unpackhi takes bytes 8..15 of each lane
    word = lane * 8 + i  # the word of the widened vector: channel word // 2, pair element word % 2
    channel = word // 2
    return 16 * parity + channel, 32 + 16 * parity + channel, word % 2


def _by_byte(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> the values of the low and of the high nibble of each byte, [64 bytes, N/64, K/2]."""
    n, k = values.shape
    v = values.reshape(n // BLOCK, BLOCK, k // 2, 2)
    lo_ch, hi_ch, elem = _nibble_sources()
    return v[:, lo_ch, :, elem], v[:, hi_ch, :, elem]


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """codes [N, K] (their low 4 bits) -> uint8 [N/64, K/2, 64]."""
    lo, hi = _by_byte(q.to(torch.uint8) & 0xF)
    return (lo | (hi << 4)).permute(1, 2, 0).contiguous()


def _group_scales(scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """[N, K/G] each -> fp16 [N/64, K/G, 2, 64]."""
    n, groups = scale.shape
    s = torch.stack([scale, minimum]).to(torch.float16)  # [2, N, K/G]
    return s.reshape(2, n // BLOCK, BLOCK, groups).permute(1, 3, 0, 2).contiguous()


def pack_int4(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W[n, k] = scale[n, g] * q[n, k] + minimum[n, g] (q in 0..15, g = k // G) ->
    nibbles uint8 [N/64, K/2, 64] and fp16 [N/64, K/G, 2, 64] (scale, minimum)."""
    return _pack_nibbles(q), _group_scales(scale, minimum)


KIND_CODES = {"int4": 0, "q5": 1, "q4_k": 2, "q5_k": 3, "q6_k": 4, "q8": 5}  # csrc/linear.cpp's Kind


@dataclass
class PackedQuant:
    """A block-quantized weight in linear_quant's layout: codes' low nibbles q, their high bits
    qh (empty for 4-bit codes), scales s, `kind` (KIND_CODES), group size of s (int4, q5)."""

    q: torch.Tensor
    qh: torch.Tensor
    s: torch.Tensor
    kind: str
    group_size: int


def _pack_high_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The bits above the nibble of codes [N, K] -> uint8 [N/64, K/2/R, 64]: 5-bit codes, R = 4
    pairs a byte (bit 2j: low nibble's value of pair j, 2j + 1: high nibble's); 6-bit, R = 2
    (bits 4j..4j+1 and 4j+2..4j+3)."""
    lo, hi = _by_byte(codes.to(torch.uint8) >> 4)  # [64, N/64, K/2]
    per = 4 if bits == 5 else 2
    width = 8 // per  # bits per pair in a byte
    lo = lo.reshape(*lo.shape[:2], -1, per).to(torch.int32)
    hi = hi.reshape(*hi.shape[:2], -1, per).to(torch.int32)
    shift = width * torch.arange(per, dtype=torch.int32)
    packed = ((lo << shift) | (hi << (shift + width // 2))).sum(-1)
    return packed.to(torch.uint8).permute(1, 2, 0).contiguous()


def _k_records(c: BlockCodes) -> torch.Tensor:
    """The scales of Q4_K / Q5_K / Q6_K per (block of 64 channels, 256 of K), uint8 [N/64, K/256, bytes]:
    fp16 d[64], (fp16 -dmin[64]), sc[groups][64], (m[groups][64])."""
    n, supers = c.d.shape

    def channels_last(t: torch.Tensor) -> torch.Tensor:  # [N, S * per] -> [N/64, S, per * 64 bytes]
        per = t.shape[1] // supers
        t = t.reshape(n // BLOCK, BLOCK, supers, per).permute(0, 2, 3, 1).contiguous()
        return t.view(torch.uint8).reshape(n // BLOCK, supers, -1)

    assert c.sc is not None
    parts = [c.d, -c.dmin, c.sc, c.m] if c.kind != "q6_k" else [c.d, c.sc]
    return torch.cat([channels_last(p) for p in parts], dim=-1).contiguous()  # type: ignore[arg-type]


def _slice_rows(rows: int, cols: int, values_per_slice: int) -> list[int]:
    """Row counts of the slices a weight is packed in: whole blocks of 64, about values_per_slice values each."""
    step = max(BLOCK, values_per_slice // cols // BLOCK * BLOCK)
    return [min(step, rows - r) for r in range(0, rows, step)]


def _assemble(slices: Iterator[tuple[torch.Tensor, ...]], blocks: int, planes: int = 1) -> list[torch.Tensor]:
    """Tensors packed a slice of rows at a time ([planes * slice blocks, ...] each) written into
    one tensor each ([planes * blocks, ...]: plane 0's blocks for every row, then plane 1's),
    so the whole weight is held once, beside one slice's intermediates."""
    out: list[torch.Tensor] = []
    at = 0
    for parts in slices:
        if not out:
            out = [torch.empty((planes * blocks, *t.shape[1:]), dtype=t.dtype) if t.numel() else t for t in parts]
        size = parts[0].shape[0] // planes
        for whole, t in zip(out, parts):
            if t.numel():
                for plane in range(planes):
                    whole[plane * blocks + at:plane * blocks + at + size] = t[plane * size:(plane + 1) * size]
        at += size
    return out


def pack_groups(weight: Int4Weight | Int8GroupWeight, values_per_slice: int = 1 << 22) -> PackedQuant:
    """int4 groups, or int8 groups (GGUF's Q8_0: code = q + 128, its low nibbles in q and its
    high ones in qh, one fp16 scale a group: W = d (code - 128)), in linear_quant's layout,
    packed a slice of rows at a time."""
    if isinstance(weight, Int8GroupWeight):
        def int8_slices() -> Iterator[tuple[torch.Tensor, ...]]:
            for part in split_rows(weight, _slice_rows(*weight.q.shape, values_per_slice)):
                assert isinstance(part, Int8GroupWeight)
                codes = part.q.to(torch.int32) + 128
                yield _pack_nibbles(codes & 0xF), _pack_nibbles(codes >> 4), _group_scale(part.scale)

        q, qh, s = _assemble(int8_slices(), weight.q.shape[0] // BLOCK)
        return PackedQuant(q, qh, s, "q8", weight.group_size)

    def slices() -> Iterator[tuple[torch.Tensor, ...]]:
        for part in split_rows(weight, _slice_rows(*weight.q.shape, values_per_slice)):
            assert isinstance(part, Int4Weight)
            yield pack_int4(part.q, part.scale, part.zero - 8 * part.scale)  # W = scale q + (zero - 8 scale)

    q, s = _assemble(slices(), weight.q.shape[0] // BLOCK)
    return PackedQuant(q, torch.empty(0, dtype=torch.uint8), s, "int4", weight.group_size)


def _group_scale(scale: torch.Tensor) -> torch.Tensor:
    """[N, K/G] -> fp16 [N/64, K/G, 64] (int8 groups' scales)."""
    n, groups = scale.shape
    return scale.to(torch.float16).reshape(n // BLOCK, BLOCK, groups).permute(0, 2, 1).contiguous()


def pack_blocks(weight: GgufBlockWeight, values_per_slice: int = 1 << 22) -> PackedQuant:
    """A GGUF matrix's blocks in linear_quant's layout, decoded and packed a slice of rows at a
    time (blocks of 64 channels are independent): decoding takes several bytes per weight for a
    moment, and a 150k-row embedding table decoded whole would need gigabytes at load."""
    bounds = [0]
    for rows in _slice_rows(weight.rows, weight.cols, values_per_slice):
        bounds.append(bounds[-1] + rows)
    kind, group_size = "", 0

    def slices() -> Iterator[tuple[torch.Tensor, ...]]:
        nonlocal kind, group_size
        for a, b in zip(bounds, bounds[1:]):
            packed = pack_codes(decode_blocks(weight.take_rows(slice(a, b))))
            kind, group_size = packed.kind, packed.group_size
            yield packed.q, packed.qh, packed.s

    q, qh, s = _assemble(slices(), weight.rows // BLOCK)
    return PackedQuant(q, qh, s, kind, group_size)


def pack_codes(c: BlockCodes) -> PackedQuant:
    """Decoded GGUF blocks (surge.layers.quantization.gguf_blocks) in linear_quant's layout."""
    bits = 6 if c.kind == "q6_k" else 5 if c.kind in ("q5", "q5_k") else 4
    qh = _pack_high_bits(c.codes, bits) if bits > 4 else torch.empty(0, dtype=torch.uint8)
    if c.kind == "q5":
        assert c.minimum is not None
        return PackedQuant(_pack_nibbles(c.codes), qh, _group_scales(c.d, c.minimum), "q5", 32)
    return PackedQuant(_pack_nibbles(c.codes), qh, _k_records(c), c.kind, 256)


def unpack_int4(nibbles: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The float32 [N, K] weight of pack_int4's output."""
    nb, pairs, _ = nibbles.shape
    lo_ch, hi_ch, elem = _nibble_sources()
    q4 = torch.empty(nb, BLOCK, pairs, 2, dtype=torch.uint8)
    q4[:, lo_ch, :, elem] = (nibbles & 0xF).permute(2, 0, 1)
    q4[:, hi_ch, :, elem] = (nibbles >> 4).permute(2, 0, 1)
    q = q4.reshape(nb * BLOCK, 2 * pairs).float()
    groups = s.shape[1]
    scale, minimum = s.float().permute(2, 0, 3, 1).reshape(2, nb * BLOCK, groups)
    g = q.shape[1] // groups
    return q * scale.repeat_interleave(g, 1) + minimum.repeat_interleave(g, 1)


def fits_w8a8(out_features: int, in_features: int) -> bool:
    """Shapes the W8A8 kernel takes: whole blocks of output channels, K in quads."""
    return out_features % BLOCK == 0 and in_features % 4 == 0


def pack_w8a8(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] -> [N/64, K/4, 256] int8: w[b, p, 4c + j] = q[64b + c, 4p + j]."""
    n, k = q.shape
    w = q.to(torch.int8).reshape(n // BLOCK, BLOCK, k // 4, 4)
    return w.permute(0, 2, 1, 3).reshape(n // BLOCK, k // 4, 4 * BLOCK).contiguous()
