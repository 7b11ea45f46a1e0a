"""Weight-only quantized linear layers on PyTorch's packed CPU kernels.

Small batches (decode) are bound by reading weights, so they run on the packed int4 / int8
kernels; large ones (prefill, big decode batches) are bound by compute, where oneDNN's dense
GEMM is 2-2.5x faster than the int4 kernel on this CPU, so they run on a dense copy holding
exactly the dequantized values (measured crossover: 8-12 rows; docs/performance.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from surge.quant.formats import Int4Weight, Int8GroupWeight, Int8Weight

INNER_K_TILES = 8
DENSE_MIN_ROWS = 9  # rows from which the dense copy is faster than the packed kernels


class QuantLinear(nn.Module):
    """y = x W^T (+ b) with W stored as int4 group-wise or int8 per-channel."""

    def __init__(
        self,
        weight: Int4Weight | Int8Weight | Int8GroupWeight,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        keep_dense: bool = True,
    ):
        super().__init__()
        self.out_features, self.in_features = weight.q.shape
        self.dtype = dtype
        if isinstance(weight, (Int4Weight, Int8GroupWeight)):
            planes = weight.planes() if isinstance(weight, Int8GroupWeight) else weight
            self.kind = "int8g" if isinstance(weight, Int8GroupWeight) else "int4"
            self.group_size = weight.group_size
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                planes.q.contiguous(), INNER_K_TILES))
            sz = torch.stack([planes.scale.t(), planes.zero.t()], dim=-1)  # [K / G, N, 2]
            self.register_buffer("scales_zeros", sz.to(dtype).contiguous())
        else:
            self.kind = "int8"
            self.group_size = 0
            self.register_buffer("packed", weight.q.contiguous())
            self.register_buffer("scales_zeros", weight.scale.to(dtype).contiguous())
        self.register_buffer("dense", weight.dequantize().to(dtype) if keep_dense else None)
        self.register_buffer("bias", bias.to(dtype) if bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.dense is not None and x2.shape[0] >= DENSE_MIN_ROWS:
            return F.linear(x, self.dense, self.bias)
        if self.kind == "int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_zeros)
        elif self.kind == "int8g":
            planes = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_zeros)
            y = planes[:, : self.out_features] + planes[:, self.out_features :]
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.packed, self.scales_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The float weight these buffers represent (for tests and fallbacks)."""
        if self.kind == "int8":
            return self.packed.float() * self.scales_zeros.float().unsqueeze(1)
        eye = torch.eye(self.in_features, dtype=self.scales_zeros.dtype)
        w_t = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, self.scales_zeros)
        w = w_t.t().float()
        return w[: self.out_features] + w[self.out_features :] if self.kind == "int8g" else w

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        return f"{self.in_features}, {self.out_features}, {self.kind}{g}, dense={self.dense is not None}"
