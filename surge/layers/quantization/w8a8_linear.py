"""Static W8A8 linears: int8 inputs times int8 weights, for checkpoints written by
`surge quantize --scheme w8a8`.

    x  --quantize_u8-->  u8 codes  --int8 GEMM-->  y = input_scale scale[n] sum_k c[k] q[n, k] (+ b)
       x * act_inv[k], rounded,      int32 sums, scaled once into x's dtype
       clamped to +-127, + 128

The codes go in unsigned with zero point 128, as the int8 dot-product instruction (vpdpbusd:
u8 x s8) wants. Kernels, first that runs: surge's (csrc/linear.cpp, AVX-512 VNNI: at 1-128
rows 1.2-2.2x faster than oneDNN's with weights out of cache, the same at 512-2048 rows, and
~2x the dense bf16 linear from 8 rows up), oneDNN's u8 x s8 linear (its signed-input path is
a reference loop, ~1000x slower, hence unsigned codes), torch._int_mm.

Every batch size runs the same integer arithmetic, so a W8A8 model's output does not depend
on how requests are batched beyond the float rounding of the final scale.
"""

from __future__ import annotations

import torch
from torch import nn

from surge.layers import native_linear
from surge.layers.linear import packed_weight, register_packed
from surge.layers.native import native_ops, w8a8_ops
from surge.layers.quantization.formats import W8A8Weight, quantize_activations

ZERO_POINT = 128  # of the unsigned input codes (vpdpbusd and oneDNN multiply u8 by s8)


def onednn_int8() -> bool:
    """oneDNN's int8 linear kernels are in this PyTorch build and exact on this CPU. Without
    VNNI they multiply u8 by s8 in pairs summed into int16 (vpmaddubsw), which saturates for
    codes near 255 (measured on an AVX2 CPU: outputs off by up to 30% of their scale), so
    torch._int_mm is used there instead."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack")
            and torch.cpu._is_vnni_supported())


def quantize_input(x: torch.Tensor, act_inv: torch.Tensor, native: bool) -> torch.Tensor:
    """x [M, K] -> uint8 codes + 128 (surge's native kernel where built, else tensor ops)."""
    if native and x.dtype in (torch.bfloat16, torch.float32):
        return torch.ops.surge_native.quantize_u8(x if x.stride(-1) == 1 else x.contiguous(), act_inv)
    return (quantize_activations(x, act_inv).to(torch.int16) + ZERO_POINT).to(torch.uint8)


@torch.library.custom_op("surge::qlinear_w8a8", mutates_args=())
def qlinear_w8a8(codes: torch.Tensor, input_scale: float, handle: torch.Tensor, scale: torch.Tensor,
                 zeros: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """oneDNN's u8 x s8 linear on the weight registered under `handle` (the compiled path)."""
    return torch.ops.onednn.qlinear_pointwise(codes, input_scale, ZERO_POINT, packed_weight(handle), scale, zeros,
                                              bias, 1.0, 0, out_dtype, "none", [], "")


@qlinear_w8a8.register_fake
def _qlinear_w8a8_fake(codes: torch.Tensor, input_scale: float, handle: torch.Tensor, scale: torch.Tensor,
                       zeros: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    return codes.new_empty((codes.shape[0], scale.shape[0]), dtype=out_dtype)


class W8A8Linear(nn.Module):
    """y ~ x W^T (+ b) with int8 weights and inputs quantized by a calibrated static quantizer,
    on the fastest int8 kernel here: surge's (AVX-512 VNNI), else oneDNN's, else torch._int_mm."""

    def __init__(self, weight: W8A8Weight, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight.q.shape
        self.dtype = dtype
        self.input_scale = float(weight.input_scale)
        self.register_buffer("act_inv", weight.act_inv().contiguous())
        self.native = native_ops() is not None  # resolved here: a compiled forward must not build it
        q = weight.q.contiguous()
        if (w8a8_ops() is not None and native_linear.fits_w8a8(self.out_features, self.in_features)
                and dtype in (torch.bfloat16, torch.float32)):
            self.kernel = "surge"
            self.register_buffer("packed", native_linear.pack_w8a8(q))
            # y = (sum (x_q + 128) q - 128 sum q) * input_scale scale[n] + b
            self.register_buffer("comp", (weight.input_scale.double() * weight.scale.double()).float())
            self.register_buffer("corr", (ZERO_POINT * q.sum(1, dtype=torch.int32)).to(torch.int32))
            # added in float32 before the output's one rounding
            self.register_buffer("bias", bias.float().contiguous() if bias is not None else None)
            return
        self.register_buffer("bias", bias.to(dtype) if bias is not None else None)
        self.register_buffer("scale", weight.scale.float().contiguous())
        if onednn_int8():
            self.kernel = "oneDNN"
            self.register_buffer("zeros", torch.zeros(self.out_features, dtype=torch.long), persistent=False)
            self._packed = torch.ops.onednn.qlinear_prepack(q, None)
            self.register_buffer("handle", register_packed(self, self._packed), persistent=False)
        else:
            self.kernel = "torch._int_mm"
            self.register_buffer("q", q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        codes = quantize_input(x2, self.act_inv, self.native)
        if self.kernel == "surge":
            y = torch.ops.surge_native.linear_w8a8(codes, self.packed, self.comp, self.corr, self.bias,
                                                   x.dtype == torch.bfloat16)
        elif self.kernel == "torch._int_mm":
            sums = torch._int_mm((codes.to(torch.int16) - ZERO_POINT).to(torch.int8), self.q.t())
            y = (sums.float() * (self.input_scale * self.scale)).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias
        elif torch.compiler.is_compiling():
            y = torch.ops.surge.qlinear_w8a8(codes, self.input_scale, self.handle, self.scale, self.zeros, self.bias,
                                             x.dtype)
        else:
            y = torch.ops.onednn.qlinear_pointwise(codes, self.input_scale, ZERO_POINT, self._packed, self.scale,
                                                   self.zeros, self.bias, 1.0, 0, x.dtype, "none", [], "")
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, w8a8, input_scale={self.input_scale:.4g}, {self.kernel}"
