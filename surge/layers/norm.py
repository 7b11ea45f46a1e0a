"""RMSNorm computed in float32, as the reference does, with the residual add fused in (Llama
style, and Gemma's (1 + w) form); LayerNorm with a bias (GPT-2) on the same interface.

bf16 activations on a CPU with surge's kernels take the native decoder stack's own norm
(csrc/decoder.cpp, `surge_native::norm`, one op instead of five), so that a decode step through
the stack and one through these modules give the same bits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from surge.layers.native import linear_ops

NORM_MODES = {"rms": 0, "gemma": 1, "layer": 2}  # csrc/decoder.cpp's NormMode


def native_norm(x: torch.Tensor) -> bool:
    """Whether x's norm runs natively: bf16 on a CPU where the native decoder stack runs."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and linear_ops() is not None


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); without a residual, x itself is the new residual."""
        if residual is not None:
            x = x + residual
        if native_norm(x):
            return torch.ops.surge_native.norm(x, self.weight, None, self.eps, NORM_MODES["rms"]), x
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype), x


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the checkpoint stores w and the norm scales by (1 + w), in float32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__(hidden_size, eps)
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            x = x + residual
        if native_norm(x):
            return torch.ops.surge_native.norm(x, self.weight, None, self.eps, NORM_MODES["gemma"]), x
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype), x


class LayerNorm(nn.Module):
    """(x - mean) / std * w + b over the last dimension, in float32, residual fused as RMSNorm's."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            x = x + residual
        if native_norm(x):
            return torch.ops.surge_native.norm(x, self.weight, self.bias, self.eps, NORM_MODES["layer"]), x
        normed = F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), self.bias.float(), self.eps)
        return normed.to(x.dtype), x
