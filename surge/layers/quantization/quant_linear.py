"""Weight-only quantized linears: int4 group-wise, int8 per channel or in groups, and GGUF's
K-quant (Q4_K, Q5_K, Q6_K) and Q5_0 / Q5_1 blocks.

With AVX-512 BF16 every block format runs on surge's kernel (csrc/linear.cpp linear_quant)
from its packed codes alone: few rows (decode) straight from the codes, bound by reading them;
many rows (prefill, large decode batches) a tile of the weight at a time dequantized to bf16
inside the GEMM, so no dense copy is kept (crossovers measured per code width, see
TILE_MIN_ROWS and docs/performance.md). Elsewhere int4 / int8 run on ATen's packed kernels with
a dense copy for many rows, and GGUF blocks are not run at all (surge.layers.quantization.apply
dequantizes them into a dense linear).
"""

from __future__ import annotations

import torch
from torch import nn

from surge.layers import native_linear
from surge.layers.linear import dense_linear
from surge.layers.native import linear_ops
from surge.layers.quantization.formats import Int4Weight, Int8GroupWeight, Int8Weight, cols_of, rows_of
from surge.layers.quantization.gguf_blocks import GgufBlockWeight

INNER_K_TILES = 8
DENSE_MIN_ROWS = 9  # ATen's int4 path: rows from which its dense copy is faster
# rows from which linear_quant dequantizes tiles instead of reading codes per four rows (2 cores,
# 1536 x 8960): the wider the codes, the dearer each pass over them
TILE_MIN_ROWS = {"int4": 28, "q4_k": 26, "q5": 18, "q5_k": 16, "q6_k": 14, "int8g": 10}

QuantWeight = Int4Weight | Int8Weight | Int8GroupWeight | GgufBlockWeight


def runs_natively(out_features: int, in_features: int, group_size: int, dtype: torch.dtype) -> bool:
    return (dtype == torch.bfloat16 and linear_ops() is not None
            and native_linear.fits(out_features, in_features, group_size))


class QuantLinear(nn.Module):
    """y = x W^T (+ b) with W stored quantized (see the module docstring)."""

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None, dtype: torch.dtype, keep_dense: bool = True):
        super().__init__()
        self.out_features, self.in_features = rows_of(weight), cols_of(weight)
        self.dtype = dtype
        self.planes = 1
        self.group_size = getattr(weight, "group_size", 0)
        self.native = not isinstance(weight, Int8Weight) and runs_natively(
            self.out_features, self.in_features, self.group_size or 2, dtype)
        if isinstance(weight, GgufBlockWeight):
            if not self.native:
                raise ValueError(f"{weight.kind} blocks run on surge's AVX-512 BF16 kernel only")
            packed = native_linear.pack_blocks(weight)
            self.kind, self.group_size = packed.kind, packed.group_size
        elif isinstance(weight, (Int4Weight, Int8GroupWeight)):
            self.kind = "int8g" if isinstance(weight, Int8GroupWeight) else "int4"
            if self.native:
                packed = native_linear.pack_groups(weight)
            else:
                planes = weight.planes() if isinstance(weight, Int8GroupWeight) else weight
        else:
            self.kind = "int8"
        self.bias: torch.Tensor | None
        self.register_buffer("bias", bias.to(dtype) if bias is not None else None)
        self.dense: nn.Module | None = None
        if self.native:
            self.register_buffer("packed", packed.q)
            self.register_buffer("high", packed.qh)
            self.register_buffer("scales_zeros", packed.s)
            self.kind_code = native_linear.KIND_CODES[packed.kind]
            self.tile_min_rows = TILE_MIN_ROWS[self.kind]
            return
        if self.kind == "int8":
            self.register_buffer("packed", weight.q.contiguous())
            self.register_buffer("scales_zeros", weight.scale.to(dtype).contiguous())
        else:
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                planes.q.contiguous(), INNER_K_TILES))
            sz = torch.stack([planes.scale.t(), planes.zero.t()], dim=-1)  # [K / G, N, 2]
            self.register_buffer("scales_zeros", sz.to(dtype).contiguous())
        if keep_dense:  # for batches of DENSE_MIN_ROWS and more
            self.dense = dense_linear(weight.dequantize().to(dtype), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.native:  # the bias added before the one rounding
            y = torch.ops.surge_native.linear_quant(x2, self.packed, self.high, self.scales_zeros, self.kind_code,
                                                    self.group_size, self.bias, self.planes, self.tile_min_rows)
            return y.reshape(*shape[:-1], self.out_features)
        if self.dense is not None and x2.shape[0] >= DENSE_MIN_ROWS:
            return self.dense(x)
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

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (1-d int64) of the float32 weight: an embedding table's lookup."""
        if self.native:
            return torch.ops.surge_native.quant_rows(ids, self.packed, self.high, self.scales_zeros, self.kind_code,
                                                     self.group_size, self.planes)
        return self.dequantize()[ids]

    def dequantize(self) -> torch.Tensor:
        """The float weight these buffers represent (for tests and fallbacks)."""
        if self.native:
            return self.rows(torch.arange(self.out_features))
        if self.kind == "int8":
            return self.packed.float() * self.scales_zeros.float().unsqueeze(1)
        eye = torch.eye(self.in_features, dtype=self.scales_zeros.dtype)
        w_t = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, self.scales_zeros)
        w = w_t.t().float()
        return w[: self.out_features] + w[self.out_features :] if self.kind == "int8g" else w

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        return (f"{self.in_features}, {self.out_features}, {self.kind}{g}, dense={self.dense is not None}, "
                f"native={self.native}")
