"""Dense linear layers on the CPU kernels: packed float weights.

On CPUs with AVX-512 BF16 bf16 weights run on surge's kernels (csrc/linear.cpp: a layout
made for `vdpbf16ps`, read once per four rows; one-row GEMVs at ~28 GB/s, oneDNN: ~20) and
many rows at oneDNN's GEMM speed. Elsewhere they are prepacked for oneDNN (same results as
`F.linear`, 1.4-2x faster than it for 1-32 rows). The quantized linears are in
surge/layers/quantization/.
"""

from __future__ import annotations

import itertools
import os
import weakref

import torch
from torch import nn

from surge.layers import native_linear
from surge.layers.native import linear_ops

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


class ConcatLinear(nn.Module):
    """One fused projection (q/k/v, gate/up) run as its parts, outputs concatenated: for parts
    stored in different formats (a GGUF's Q4_K q/k with a Q6_K v)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


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
