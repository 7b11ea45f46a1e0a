"""Quantized weight formats and their conversions (round-to-nearest and exact GGUF repacking).

int4 group-wise, the layout of PyTorch's `_weight_int4pack_mm_for_cpu` ("tinygemm"):

    w[n, k] = (q[n, k] - 8) * scale[k // G, n] + zero[k // G, n]      q in 0..15

GGUF's Q4_0 (w = d * (q - 8)) and Q4_1 (w = d * q + m) blocks of 32 map onto it exactly:
scale = d, zero = 0 for Q4_0 and zero = m + 8 d for Q4_1.

int8 per output channel, the layout of `_weight_int8pack_mm`:  w[n, k] = q[n, k] * scale[n].
int8 per group of 32 (GGUF's Q8_0): on surge's kernel as 8-bit codes with one fp16 scale a
group (native_linear.pack_groups); on ATen's as two int4 planes (see Int8GroupWeight).
W8A8 (W8A8Weight): int8 per output channel for the weight and a static int8 quantizer for the
inputs, so the product runs as an int8 GEMM.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch

from surge.errors import InvalidArgumentError, ModelFormatError
from surge.layers.quantization.gguf_blocks import GgufBlockWeight

T = gguf.GGMLQuantizationType
INT4_GROUP_SIZES = (32, 64, 128)


@dataclass
class Int4Weight:
    """Unpacked int4 group-wise weight: q [N, K] int32 in 0..15, scale/zero [N, K // group] float32."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int

    def dequantize(self) -> torch.Tensor:
        g = self.group_size
        return (self.q.float() - 8) * self.scale.repeat_interleave(g, 1) + self.zero.repeat_interleave(g, 1)

    @staticmethod
    def cat(parts: list["Int4Weight"]) -> "Int4Weight":
        """Stack along output rows (fusing q/k/v or gate/up)."""
        assert len({p.group_size for p in parts}) == 1
        return Int4Weight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                          torch.cat([p.zero for p in parts]), parts[0].group_size)


@dataclass
class Int8Weight:
    """int8 per-channel weight: q [N, K] int8, scale [N] float32."""

    q: torch.Tensor
    scale: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale.unsqueeze(1)

    @staticmethod
    def cat(parts: list["Int8Weight"]) -> "Int8Weight":
        return Int8Weight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]))


@dataclass
class Int8GroupWeight:
    r"""int8 with a scale per group of 32 (GGUF's Q8_0): q [N, K] int8, scale [N, K // 32] float32.

    surge's kernel (csrc/linear.cpp, kind q8) takes them as they are. ATen has no int8-group
    kernel, so there it runs as two int4 planes on the int4 kernel, exactly: q = 16 h + l with
    h in -8..7 and l in 0..15, so

        w = d q = [(h + 8) - 8] * 16 d  +  [(l - 8) * d + 8 d]
                  \___ plane "h": scale 16d, zero 0 __/  \___ plane "l": scale d, zero 8d _/
    """

    q: torch.Tensor
    scale: torch.Tensor
    group_size: int = 32

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale.repeat_interleave(self.group_size, 1)

    def planes(self) -> Int4Weight:
        """[high plane; low plane] stacked on the output rows (2N rows)."""
        q = self.q.to(torch.int32)
        high = torch.div(q, 16, rounding_mode="floor")
        low = q - 16 * high
        zeros = torch.zeros_like(self.scale)
        return Int4Weight(torch.cat([high + 8, low]), torch.cat([16 * self.scale, self.scale]),
                          torch.cat([zeros, 8 * self.scale]), self.group_size)

    @staticmethod
    def cat(parts: list["Int8GroupWeight"]) -> "Int8GroupWeight":
        return Int8GroupWeight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                               parts[0].group_size)


@dataclass
class W8A8Weight:
    r"""int8 weight per output channel for inputs that are quantized too (static W8A8):

        x_q[m, k] = clamp(round(x[m, k] * act_inv[k]), -127, 127)    act_inv = 1 / (input_scale smooth)
        y[m, n]   = input_scale * scale[n] * sum_k x_q[m, k] q[n, k]

    q / scale quantize W diag(smooth), so y ~ x W^T. smooth [K] (SmoothQuant, Xiao et al. 2022)
    divides each input column and multiplies the weight's: activation outliers, which live in a
    few input channels, move into the weights, where per-channel scales absorb them. Ones
    without smoothing. input_scale is the one per-tensor scale of the smoothed inputs,
    calibrated on a text (min-max, percentile or KL histogram).
    """

    q: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N] float32
    input_scale: torch.Tensor  # 0-d float32
    smooth: torch.Tensor  # [K] float32

    def act_inv(self) -> torch.Tensor:
        """[K] float32 multipliers that take inputs to their codes (before rounding)."""
        return (1.0 / (self.input_scale.double() * self.smooth.double())).float()

    def dequantize(self) -> torch.Tensor:
        """The float weight on the unsmoothed inputs (the weight-only view: no activation rounding)."""
        return self.q.float() * self.scale.unsqueeze(1) / self.smooth.unsqueeze(0)

    @staticmethod
    def cat(parts: list["W8A8Weight"]) -> "W8A8Weight":
        """Fused modules (q/k/v, gate/up) read one input, so their parts share its quantizer."""
        first = parts[0]
        if any(not torch.equal(p.input_scale, first.input_scale) or not torch.equal(p.smooth, first.smooth)
               for p in parts[1:]):
            raise ModelFormatError("w8a8 modules fused into one linear (q/k/v or gate/up) have different input "
                                   "scales or smoothing factors; they read the same input and must share them")
        return W8A8Weight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), first.input_scale,
                          first.smooth)


def split_rows(weight: QuantizedWeight | torch.Tensor, sizes: list[int]) -> list[QuantizedWeight | torch.Tensor]:
    """A fused module's weight (quantized or float) cut into its parts' rows."""
    if len(sizes) == 1:
        return [weight]
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    pieces = [slice(a, b) for a, b in zip(bounds, bounds[1:])]
    if isinstance(weight, torch.Tensor):
        return [weight[s] for s in pieces]
    if isinstance(weight, Int4Weight):
        return [Int4Weight(weight.q[s], weight.scale[s], weight.zero[s], weight.group_size) for s in pieces]
    if isinstance(weight, Int8GroupWeight):
        return [Int8GroupWeight(weight.q[s], weight.scale[s], weight.group_size) for s in pieces]
    if isinstance(weight, W8A8Weight):  # the parts read one input: they share its quantizer
        return [W8A8Weight(weight.q[s], weight.scale[s], weight.input_scale, weight.smooth) for s in pieces]
    if isinstance(weight, GgufBlockWeight):
        return [weight.take_rows(s) for s in pieces]
    return [Int8Weight(weight.q[s], weight.scale[s]) for s in pieces]


def block_values(weight: QuantizedWeight) -> int:
    """Input values that share a scale (a row can be cut only between such blocks)."""
    if isinstance(weight, GgufBlockWeight):
        return weight.block
    if isinstance(weight, (Int4Weight, Int8GroupWeight)):
        return weight.group_size
    return 1


def take_cols(weight: QuantizedWeight | torch.Tensor, start: int, end: int) -> QuantizedWeight | torch.Tensor:
    """Input columns start..end of a weight (quantized or float), on its block boundaries
    (block_values; InvalidArgumentError otherwise): a row-parallel rank's share."""
    if isinstance(weight, torch.Tensor):
        return weight[:, start:end]
    block = block_values(weight)
    if start % block or end % block:
        raise InvalidArgumentError(f"columns {start}..{end} cut a block of {block} values")
    if isinstance(weight, GgufBlockWeight):
        return weight.take_cols(start, end)
    cols = slice(start, end)
    if isinstance(weight, Int4Weight):
        groups = slice(start // block, end // block)
        return Int4Weight(weight.q[:, cols], weight.scale[:, groups], weight.zero[:, groups], weight.group_size)
    if isinstance(weight, Int8GroupWeight):
        return Int8GroupWeight(weight.q[:, cols], weight.scale[:, start // block:end // block], weight.group_size)
    if isinstance(weight, W8A8Weight):
        return W8A8Weight(weight.q[:, cols], weight.scale, weight.input_scale, weight.smooth[cols])
    return Int8Weight(weight.q[:, cols], weight.scale)


def rows_of(weight: QuantizedWeight) -> int:
    """Output rows of a quantized weight."""
    return weight.rows if isinstance(weight, GgufBlockWeight) else int(weight.q.shape[0])


def cols_of(weight: QuantizedWeight) -> int:
    """Input columns (values a row) of a quantized weight."""
    return weight.cols if isinstance(weight, GgufBlockWeight) else int(weight.q.shape[1])


def quantize_activations(x: torch.Tensor, act_inv: torch.Tensor) -> torch.Tensor:
    """The int8 codes of x [..., K] under a W8A8 quantizer (the reference the kernels match)."""
    return torch.round(x.float() * act_inv).clamp_(-127, 127).to(torch.int8)


QUANTIZED_TYPES = (Int4Weight, Int8Weight, Int8GroupWeight, W8A8Weight, GgufBlockWeight)
QuantizedWeight = Int4Weight | Int8Weight | Int8GroupWeight | W8A8Weight | GgufBlockWeight


def quantize_int8_groups(w: torch.Tensor, group_size: int = 32) -> Int8GroupWeight:
    """Symmetric int8 per group (Q8_0's scheme): scale = max|w| / 127 within each group."""
    n, k = w.shape
    check_group_size(group_size, k)
    groups = w.float().reshape(n, k // group_size, group_size)
    scale = (groups.abs().amax(-1) / 127).clamp(min=1e-8)
    q = torch.round(groups / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return Int8GroupWeight(q.reshape(n, k), scale, group_size)


def check_group_size(group_size: int, in_features: int, name: str = "weight") -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise InvalidArgumentError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if in_features % group_size:
        raise InvalidArgumentError(
            f"{name}: group size {group_size} does not divide its input dimension {in_features}")


def quantize_int4(w: torch.Tensor, group_size: int) -> Int4Weight:
    """Asymmetric min-max round-to-nearest per group."""
    n, k = w.shape
    check_group_size(group_size, k)
    groups = w.float().reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = torch.round((groups - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(0, 15).to(torch.int32)
    return Int4Weight(q.reshape(n, k), scale, lo + 8 * scale, group_size)


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    """Symmetric per output channel: scale = max|w| / 127."""
    w = w.float()
    scale = (w.abs().amax(1) / 127).clamp(min=1e-8)
    q = torch.round(w / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return Int8Weight(q, scale)


def _blocks(raw: np.ndarray, rows: int, block_bytes: int) -> np.ndarray:
    data = np.ascontiguousarray(raw).view(np.uint8).reshape(rows, -1)
    return data.reshape(rows, -1, block_bytes)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """GGUF packs element j in the low nibble of byte j and element j + 16 in the high nibble."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int32)


def gguf_to_int4(raw: np.ndarray, qtype: T, rows: int) -> Int4Weight:
    """Q4_0 / Q4_1 blocks -> the int4 layout, exactly (no float round trip of the weights)."""
    if qtype == T.Q4_0:
        b = _blocks(raw, rows, 18)
        d = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        q = _nibbles(b[..., 2:])
        zero = np.zeros_like(d)
    elif qtype == T.Q4_1:
        b = _blocks(raw, rows, 20)
        d = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        q = _nibbles(b[..., 4:])
        zero = m + 8 * d
    else:
        raise ValueError(f"{qtype.name} is not an int4 GGUF type")
    return Int4Weight(torch.from_numpy(q.reshape(rows, -1)), torch.from_numpy(d), torch.from_numpy(zero), 32)


def gguf_to_int8(raw: np.ndarray, qtype: T, rows: int) -> Int8GroupWeight:
    """Q8_0 blocks (int8 with a scale per 32) -> Int8GroupWeight, exactly."""
    if qtype != T.Q8_0:
        raise ValueError(f"{qtype.name} is not Q8_0")
    b = _blocks(raw, rows, 34)
    d = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = b[..., 2:].copy().view(np.int8)
    return Int8GroupWeight(torch.from_numpy(q.reshape(rows, -1)), torch.from_numpy(d), 32)
