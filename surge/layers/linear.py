"""Linear layers on CPU kernels that fit their batch: packed dense bf16 weights and
weight-only quantized ones (int4 group-wise, int8).

Small batches (decode) are bound by reading weights, so they run on the quantized kernels;
large ones (prefill, big decode batches) are bound by compute, where a dense bf16 GEMM is
faster, so they run on a dense copy holding exactly the dequantized values (measured
crossover: 9 rows for int4, 5 for GGUF's Q8_0 run as two int4 planes; docs/performance.md).

On CPUs with AVX-512 BF16 both run on surge's kernels (csrc/linear.cpp: weights in a layout
made for `vdpbf16ps`, read once per four rows): one-row GEMVs read bf16 weights at ~28 GB/s
(oneDNN: ~20) and int4 ones at 20-28 GB/s (ATen's int4 kernel: 12-20), and many rows run at
oneDNN's GEMM speed. Elsewhere dense bf16 weights are prepacked for oneDNN (same results as
`F.linear`, 1.4-2x faster than it for 1-32 rows) and int4 ones use ATen's packed kernels.
"""

from __future__ import annotations

import itertools
import os
import weakref

import torch
from torch import nn

from surge.layers import native_linear
from surge.layers.native import linear_ops
from surge.quant.formats import Int4Weight, Int8GroupWeight, Int8Weight

INNER_K_TILES = 8
DENSE_MIN_ROWS = 9  # rows from which the dense copy is faster than the packed kernels
# int8 groups run as two int4 planes on surge's kernel, twice the work: the dense copy wins sooner
DENSE_MIN_ROWS_INT8_PLANES = 5
PACK_BATCH_HINT = 64  # oneDNN picks its blocking for this many rows; measured best for 1-512 rows

# oneDNN's packed weights are opaque tensors Inductor cannot take as graph inputs, so a
# compiled graph names them by a handle (a 0-d tensor buffer, read at call time, so graphs
# shared by two models of one shape still use each model's own weights).
_PACKED: dict[int, torch.Tensor] = {}
_handles = itertools.count()


def register_packed(owner: nn.Module, packed: torch.Tensor) -> torch.Tensor:
    """A handle naming `packed` (an opaque oneDNN tensor) for compiled graphs, valid while
    `owner` lives."""
    key = next(_handles)
    _PACKED[key] = packed
    weakref.finalize(owner, _PACKED.pop, key, None)
    return torch.tensor(key)


def packed_weight(handle: torch.Tensor) -> torch.Tensor:
    return _PACKED[int(handle)]


def can_pack(dtype: torch.dtype) -> bool:
    """oneDNN prepacking for `dtype` on this machine (bf16 with AVX-512 BF16 or AMX); off with
    SURGE_PACKED_LINEAR=0."""
    if os.environ.get("SURGE_PACKED_LINEAR", "1") == "0" or dtype != torch.bfloat16:
        return False
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@torch.library.custom_op("surge::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, handle: torch.Tensor, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T (+ b) with the oneDNN-packed W registered under `handle` (the compiled path)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight(handle), bias, "none", [], "")


@packed_linear.register_fake
def _packed_linear_fake(x: torch.Tensor, handle: torch.Tensor, out_features: int,
                        bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((x.shape[0], out_features))


class PackedLinear(nn.Module):
    """y = x W^T (+ b) with a bf16 W laid out once for the fastest kernel this CPU has: surge's
    own (csrc/linear.cpp, AVX-512 BF16) where it fits the shape, else oneDNN's (same results
    as F.linear)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.native = linear_ops() is not None and native_linear.fits(self.out_features, self.in_features)
        self.register_buffer("bias", bias.detach().to(weight.dtype) if bias is not None else None)
        if self.native:
            self.register_buffer("packed", native_linear.pack_bf16(weight.detach()))
            return
        self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_BATCH_HINT)
        self.register_buffer("handle", register_packed(self, self._packed), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.native:
            y = torch.ops.surge_native.linear_bf16(x2, self.packed, self.bias)
        elif torch.compiler.is_compiling():
            y = torch.ops.surge.packed_linear(x2, self.handle, self.out_features, self.bias)
        else:
            y = torch.ops.mkldnn._linear_pointwise(x2, self._packed, self.bias, "none", [], "")
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, packed for {'surge' if self.native else 'oneDNN'}"


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """The fastest dense linear for this weight: prepacked where oneDNN supports its dtype."""
    if can_pack(weight.dtype):
        return PackedLinear(weight, bias)
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


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
