"""Quantization applied to a loaded model from outside: each nn.Linear is replaced by the
layer that runs its weight (the model classes know nothing of quantization).

    "auto"         a GGUF's Q4/Q8 weights run as int4/int8 and a surge checkpoint's as stored
                   (w8a8 on the int8 GEMM); float weights stay float
    "int4"/"int8"  every linear quantized, each expert's of an MoE layer too (the router stays
                   float); the output head in int8 groups of 32: it is the most
                   sensitive matrix (per-channel int8 flips ~3% of the default model's top-1
                   tokens, int8 in groups of 32 none)
    "none"         float everywhere (quantized weights dequantized; w8a8: its weights, inputs
                   not rounded)

A float linear becomes a PackedLinear where the dtype has a packed kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from surge.layers.linear import PackedLinear, can_pack
from surge.layers.moe import FusedExperts
from surge.layers.quantization.formats import (
    Int4Weight,
    Int8GroupWeight,
    Int8Weight,
    QuantizedWeight,
    W8A8Weight,
    check_group_size,
    quantize_int4,
    quantize_int8,
    quantize_int8_groups,
)
from surge.layers.quantization.quant_linear import QuantLinear
from surge.layers.quantization.w8a8_linear import W8A8Linear

_KINDS = {Int4Weight: "int4", Int8Weight: "int8", Int8GroupWeight: "int8g"}  # w8a8: none of these


def _joined(module: nn.Linear, parts: dict[int, QuantizedWeight] | None,
            scheme: str) -> QuantizedWeight | None:
    """The pending shards of one linear as one weight (loading leaves only complete sets of one
    type: see weight_loading); under scheme "none" they are dequantized into the float weight."""
    if parts is None:
        return None
    ordered = [parts[i] for i in sorted(parts)]
    if scheme != "none":
        return type(ordered[0]).cat(ordered)  # type: ignore[attr-defined]
    with torch.no_grad():
        module.weight.copy_(torch.cat([p.dequantize() for p in ordered]))
    return None


def _requantized(weight: QuantizedWeight | None, module: nn.Linear, target: str, group_size: int,
                 path: str) -> QuantizedWeight:
    current = _KINDS.get(type(weight))
    if current == target and not (target == "int4" and weight.group_size != group_size):  # type: ignore[union-attr]
        return weight  # type: ignore[return-value]
    source = weight.dequantize() if weight is not None else module.weight.detach().float()
    if target == "int4":
        check_group_size(group_size, source.shape[1], path)
        return quantize_int4(source, group_size)
    return quantize_int8_groups(source) if target == "int8g" else quantize_int8(source)


def quantize_linears(model: nn.Module, pending: dict[str, dict[int, QuantizedWeight]], scheme: str = "auto",
                     group_size: int = 32, keep_dense: bool = True, output_head: str = "lm_head") -> None:
    """Replace every nn.Linear of `model` by the layer for its weight under `scheme`;
    `pending` holds the quantized weights loading kept aside (module path -> {shard: weight})."""
    dtype = next(model.parameters()).dtype
    for path, module in list(model.named_modules()):
        if isinstance(module, FusedExperts) and scheme in ("int4", "int8"):
            _quantize_experts(module, scheme, group_size, keep_dense, dtype, path)
        if not isinstance(module, nn.Linear):
            continue
        weight = _joined(module, pending.get(path), scheme)
        if scheme in ("int4", "int8"):
            weight = _requantized(weight, module, "int8g" if path == output_head else scheme, group_size, path)
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if weight is None or scheme == "none":
            if can_pack(dtype):
                setattr(parent, attr, PackedLinear(module.weight, module.bias))
            continue
        bias = module.bias.detach() if module.bias is not None else None
        if isinstance(weight, W8A8Weight):
            setattr(parent, attr, W8A8Linear(weight, bias, dtype))
        else:
            setattr(parent, attr, QuantLinear(weight, bias, dtype, keep_dense))


def _quantize_experts(experts: FusedExperts, scheme: str, group_size: int, keep_dense: bool, dtype: torch.dtype,
                      path: str) -> None:
    """Each expert's gate/up and down matrices as quantized linears of `scheme`."""
    def quantized(weight: torch.Tensor, name: str) -> QuantLinear:
        if scheme == "int4":
            check_group_size(group_size, weight.shape[1], name)
            return QuantLinear(quantize_int4(weight.float(), group_size), None, dtype, keep_dense)
        return QuantLinear(quantize_int8(weight.float()), None, dtype, keep_dense)

    with torch.no_grad():
        gate_up = [quantized(experts.gate_up_proj[e], f"{path}.gate_up_proj[{e}]") for e in range(experts.num_experts)]
        down = [quantized(experts.down_proj[e], f"{path}.down_proj[{e}]") for e in range(experts.num_experts)]
    experts.use_expert_linears(gate_up, down)
