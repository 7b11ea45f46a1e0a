"""Weight-only quantized linears (int4 group-wise, int8 per channel or in groups).

Small batches (decode) are bound by reading weights, so they run on the quantized kernels;
large ones (prefill, big decode batches) are bound by compute, where a dense bf16 GEMM is
faster, so they run on a dense copy holding exactly the dequantized values (measured
crossover: 9 rows for int4, 5 for GGUF's Q8_0 run as two int4 planes; docs/performance.md).
With AVX-512 BF16 int4 GEMVs run on surge's kernel (csrc/linear.cpp, 20-28 GB/s; ATen's int4
kernel: 12-20), elsewhere on ATen's packed kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from surge.layers import native_linear
from surge.layers.linear import dense_linear
from surge.layers.native import linear_ops
from surge.layers.quantization.formats import Int4Weight, Int8GroupWeight, Int8Weight

INNER_K_TILES = 8
DENSE_MIN_ROWS = 9  # rows from which the dense copy is faster than the packed kernels
# int8 groups run as two int4 planes on surge's kernel, twice the work: the dense copy wins sooner
DENSE_MIN_ROWS_INT8_PLANES = 5


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
        self.native = False  # int4 planes in the layout of surge's kernel (csrc/linear.cpp), not ATen's
        if isinstance(weight, (Int4Weight, Int8GroupWeight)):
            planes = weight.planes() if isinstance(weight, Int8GroupWeight) else weight
            self.kind = "int8g" if isinstance(weight, Int8GroupWeight) else "int4"
            self.group_size = weight.group_size
            self.native = (dtype == torch.bfloat16 and linear_ops() is not None
                           and native_linear.fits(self.out_features, self.in_features, self.group_size))
            if self.native:  # W = scale * q + (zero - 8 scale)
                nibbles, s = native_linear.pack_int4(planes.q, planes.scale, planes.zero - 8 * planes.scale)
                self.register_buffer("packed", nibbles)
                self.register_buffer("scales_zeros", s)
            else:
                self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                    planes.q.contiguous(), INNER_K_TILES))
                sz = torch.stack([planes.scale.t(), planes.zero.t()], dim=-1)  # [K / G, N, 2]
                self.register_buffer("scales_zeros", sz.to(dtype).contiguous())
        else:
            self.kind = "int8"
            self.group_size = 0
            self.register_buffer("packed", weight.q.contiguous())
            self.register_buffer("scales_zeros", weight.scale.to(dtype).contiguous())
        self.register_buffer("bias", bias.to(dtype) if bias is not None else None)
        self.dense_min_rows = DENSE_MIN_ROWS_INT8_PLANES if self.native and self.kind == "int8g" else DENSE_MIN_ROWS
        # for batches of dense_min_rows and more
        self.dense: nn.Module | None = dense_linear(weight.dequantize().to(dtype), self.bias) if keep_dense else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.dense is not None and x2.shape[0] >= self.dense_min_rows:
            return self.dense(x)
        if self.native:  # int8 groups as two int4 planes summed; the bias added before the one rounding
            planes = 2 if self.kind == "int8g" else 1
            y = torch.ops.surge_native.linear_int4(x2, self.packed, self.scales_zeros, self.group_size, self.bias, planes)
            return y.reshape(*shape[:-1], self.out_features)
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
        if self.native:
            w = native_linear.unpack_int4(self.packed, self.scales_zeros)
            return w[: self.out_features] + w[self.out_features :] if self.kind == "int8g" else w
        eye = torch.eye(self.in_features, dtype=self.scales_zeros.dtype)
        w_t = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, self.scales_zeros)
        w = w_t.t().float()
        return w[: self.out_features] + w[self.out_features :] if self.kind == "int8g" else w

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        return (f"{self.in_features}, {self.out_features}, {self.kind}{g}, dense={self.dense is not None}, "
                f"native={self.native}")
