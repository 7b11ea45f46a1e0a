"""Weight layouts of surge's AVX-512 BF16 linear kernels (csrc/linear.cpp).

Output channels in blocks of 64, the reduction dimension in pairs, so that one 64-byte load
feeds the dot-product instruction for 16 channels (bf16) or 64 channels (int4 nibbles).
`pack_*` build the layouts from plain weights once, at load; `unpack_int4` inverts it (tests,
dequantize).
"""

from __future__ import annotations

import torch

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


def pack_int4(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W[n, k] = scale[n, g] * q[n, k] + minimum[n, g] (q in 0..15, g = k // G) ->
    nibbles uint8 [N/64, K/2, 64] and fp16 [N/64, K/G, 2, 64] (scale, minimum)."""
    n, k = q.shape
    groups = scale.shape[1]
    q4 = q.to(torch.uint8).reshape(n // BLOCK, BLOCK, k // 2, 2)
    lo_ch, hi_ch, elem = _nibble_sources()
    lo = q4[:, lo_ch, :, elem]  # [64 bytes, N/64, K/2]
    hi = q4[:, hi_ch, :, elem]
    nibbles = (lo | (hi << 4)).permute(1, 2, 0).contiguous()
    s = torch.stack([scale, minimum]).to(torch.float16)  # [2, N, K/G]
    s = s.reshape(2, n // BLOCK, BLOCK, groups).permute(1, 3, 0, 2).contiguous()
    return nibbles, s


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
