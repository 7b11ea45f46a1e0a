"""Rotary position embedding (neox / rotate-half layout) with default, linear, llama3, yarn and longrope scaling.

cos/sin come from a float32 table indexed by each token's position, so a flat batch of tokens
from many sequences at different positions needs no padding.
"""

from __future__ import annotations

import math

import torch

from surge.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int, max_positions: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim/2] float32, attention scaling applied to cos/sin) for a rope config."""
    dim = int(head_dim * rope.partial_rotary_factor)
    base = rope.theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope.rope_type == "default":
        return inv_freq, 1.0
    if rope.rope_type == "linear":
        return inv_freq / rope.factor, 1.0
    original = rope.original_max_position_embeddings or max_positions
    if rope.rope_type == "llama3":
        low_wavelen = original / rope.low_freq_factor
        high_wavelen = original / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (original / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if rope.rope_type == "yarn":
        return _yarn(rope, dim, base, original)
    if rope.rope_type == "longrope":
        return _longrope(rope, dim, base, original, max_positions)
    raise ValueError(f"unknown rope type {rope.rope_type!r}")


def _yarn(rope: RopeConfig, dim: int, base: float, original: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, keep high ones, ramp between (arXiv 2309.00071)."""
    factor = rope.factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rope.attention_factor
    if attention is None:
        if rope.mscale and rope.mscale_all_dim:
            attention = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
        else:
            attention = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast or 32), correction_dim(rope.beta_slow or 1)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1.0 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention)


def _longrope(rope: RopeConfig, dim: int, base: float, original: int, max_positions: int) -> tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3): per-frequency divisors, the long ones for a model whose context is
    longer than the one it was pretrained on (as llama.cpp chooses by its context; transformers
    switches per forward by the longest sequence, which would rotate a cached prefix with
    other frequencies than its continuation); cos/sin scaled by sqrt(1 + ln s / ln original)
    for the extension s unless the config gives the factor."""
    factors = rope.long_factor if max_positions > original else rope.short_factor
    assert factors is not None and len(factors) == dim // 2
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (torch.tensor(factors, dtype=torch.float32) * base ** exponents)
    attention = rope.attention_factor
    if attention is None:
        attention = 1.0 if rope.factor <= 1.0 else math.sqrt(1 + math.log(rope.factor) / math.log(original))
    return inv_freq, float(attention)


class RotaryEmbedding:
    """cos/sin table over positions, grown on demand; applied to flat [tokens, heads, dim] tensors."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int):
        self.rope = rope
        self.head_dim = head_dim
        self.max_positions = max_positions
        with torch.device("cpu"):  # models are built on the meta device; this table must be real
            self.inv_freq, self.scaling = inverse_frequencies(rope, head_dim, max_positions)
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None
        self.frequency_factors: torch.Tensor | None = None  # kept so a saved checkpoint can carry them

    def set_frequency_factors(self, factors: torch.Tensor) -> None:
        """llama.cpp's `rope_freqs` tensor: per-frequency divisors (llama3 scaling baked in)."""
        self.frequency_factors = factors.float().flatten()[: self.inv_freq.numel()].clone()
        self.inv_freq = self.inv_freq / self.frequency_factors
        self._cos = self._sin = None

    def _table(self, needed: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos is None or self._cos.shape[0] < needed or self._cos.device != device or self._cos.dtype != dtype:
            size = max(needed, min(self.max_positions, 4096))
            positions = torch.arange(size, dtype=torch.float32, device=device)
            freqs = torch.outer(positions, self.inv_freq.to(device))
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cos = (emb.cos() * self.scaling).to(dtype)
            self._sin = (emb.sin() * self.scaling).to(dtype)
        return self._cos, self._sin

    def prepare(self, positions: int, device: torch.device, dtype: torch.dtype) -> None:
        """Build the table for `positions` now (a compiled forward only looks it up)."""
        self._table(positions, device, dtype)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [T, 1, rot] for `positions`; looked up once per step, shared by every layer."""
        if torch.compiler.is_compiling():  # no data-dependent growth in a graph: prepare() built it
            assert self._cos is not None and self._sin is not None
            cos_table, sin_table = self._cos, self._sin
            return cos_table[positions].unsqueeze(1), sin_table[positions].unsqueeze(1)
        needed = int(positions.max()) + 1 if positions.numel() else 1
        cos_table, sin_table = self._table(needed, positions.device, dtype)
        return cos_table[positions].unsqueeze(1), sin_table[positions].unsqueeze(1)

    def __call__(
        self, cos_sin: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k [T, Hk, D] rotated by the angles of `cos_sin` (from `cos_sin`)."""
        cos, sin = cos_sin
        rot = cos.shape[-1]
        if rot == q.shape[-1]:
            return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        q_rot, q_pass = q[..., :rot], q[..., rot:]
        k_rot, k_pass = k[..., :rot], k[..., rot:]
        q_rot = q_rot * cos + _rotate_half(q_rot) * sin
        k_rot = k_rot * cos + _rotate_half(k_rot) * sin
        return torch.cat((q_rot, q_pass), -1), torch.cat((k_rot, k_pass), -1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
