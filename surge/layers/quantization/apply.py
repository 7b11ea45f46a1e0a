"""Quantization applied to a loaded model from outside: each nn.Linear is replaced by the
layer that runs its weight (the model classes know nothing of quantization).

    "auto"         a GGUF's quantized weights run from their blocks (Q4_0/Q4_1 as int4, Q8_0
                   as int8 groups, Q4_K/Q5_K/Q6_K/Q5_0/Q5_1 as they are, where the CPU
                   kernels run; elsewhere in float), its embedding table and its MoE
                   experts' stacks (one linear per expert) too; a fused
                   projection whose parts came in different formats runs as its parts; a
                   surge checkpoint's weights as stored (w8a8 on the int8 GEMM); float
                   weights stay float
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

from surge.layers.linear import ConcatLinear, PackedLinear, can_pack
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
    rows_of,
)
from surge.layers.quantization.gguf_blocks import GgufBlockWeight
from surge.layers.quantization.quant_embedding import QuantEmbedding
from surge.layers.quantization.quant_linear import QuantLinear, runs_natively
from surge.layers.quantization.w8a8_linear import W8A8Linear

_KINDS = {Int4Weight: "int4", Int8Weight: "int8", Int8GroupWeight: "int8g"}  # w8a8: none of these


def _format(weight: QuantizedWeight) -> tuple[type, int]:
    return type(weight), getattr(weight, "qtype", 0)


def _runs(weight: QuantizedWeight, dtype: torch.dtype) -> bool:
    """GGUF blocks run only on the native kernel, in shapes it takes (else they are dequantized)."""
    if not isinstance(weight, GgufBlockWeight):
        return True
    return runs_natively(weight.rows, weight.cols, 2, dtype)


def _joined(module: nn.Linear, parts: dict[int, QuantizedWeight] | None, scheme: str,
            dtype: torch.dtype) -> QuantizedWeight | list[QuantizedWeight] | None:
    """The pending shards of one linear (loading leaves only complete sets: see weight_loading)
    as one weight, or as its parts where they came in different formats (under "auto", where
    each runs); otherwise they are dequantized into the float weight and None is returned."""
    if parts is None:
        return None
    ordered = [parts[i] for i in sorted(parts)]
    if scheme != "none" and all(_runs(p, dtype) for p in ordered):
        fused = _fused(ordered)
        if not isinstance(fused, list) or (scheme == "auto" and not any(isinstance(p, W8A8Weight) for p in ordered)):
            return fused
    with torch.no_grad():
        module.weight.copy_(torch.cat([p.dequantize() for p in ordered]))
    return None


def _fused(parts: list[QuantizedWeight]) -> QuantizedWeight | list[QuantizedWeight]:
    """The parts of a fused projection as one weight where they share a format, else as they are."""
    if len({_format(p) for p in parts}) == 1:
        return type(parts[0]).cat(parts)  # type: ignore[attr-defined]
    return parts


def _quant_layer(weight: QuantizedWeight | list[QuantizedWeight], bias: torch.Tensor | None, dtype: torch.dtype,
                 keep_dense: bool = True) -> nn.Module:
    """A QuantLinear, or for parts of different formats a ConcatLinear of one QuantLinear each."""
    if not isinstance(weight, list):
        return QuantLinear(weight, bias, dtype, keep_dense)
    bounds = [0]
    for w in weight:
        bounds.append(bounds[-1] + rows_of(w))
    return ConcatLinear([QuantLinear(w, bias[a:b] if bias is not None else None, dtype, keep_dense)
                         for w, a, b in zip(weight, bounds, bounds[1:])])


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
        if isinstance(module, FusedExperts):
            if not _experts_from_blocks(module, pending, path, scheme, dtype) and scheme in ("int4", "int8"):
                _quantize_experts(module, scheme, group_size, keep_dense, dtype, path)
        if not isinstance(module, nn.Linear):
            continue
        weight = _joined(module, pending.get(path), scheme, dtype)
        if scheme in ("int4", "int8"):
            weight = _requantized(weight, module, "int8g" if path == output_head else scheme, group_size, path)
        bias = module.bias.detach() if module.bias is not None else None
        if weight is None or scheme == "none":
            if can_pack(dtype):
                _replace(model, path, PackedLinear(module.weight, module.bias))
        elif isinstance(weight, W8A8Weight):
            _replace(model, path, W8A8Linear(weight, bias, dtype))
        else:
            _replace(model, path, _quant_layer(weight, bias, dtype, keep_dense))
    if scheme == "auto":
        _embedding_from_blocks(model, pending, output_head, dtype)


def _replace(model: nn.Module, path: str, layer: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, layer)


def _embedding_from_blocks(model: nn.Module, pending: dict[str, dict[int, QuantizedWeight]], output_head: str,
                           dtype: torch.dtype) -> None:
    """The embedding table looked up from its quantized rows where the file stored it quantized
    and the native kernels run: shared with the output head when the head runs from the same
    tensor (tied embeddings), else packed on its own."""
    embedding = getattr(model, "embedding", None)
    stored = pending.get(embedding, {}).get(0) if embedding else None
    if stored is None or isinstance(stored, (W8A8Weight, Int8Weight)):
        return
    head = model.get_submodule(output_head)
    if isinstance(head, QuantLinear) and pending.get(output_head, {}).get(0) is stored:
        table = head
    elif _runs(stored, dtype):
        table = QuantLinear(stored, None, dtype, keep_dense=False)
    else:
        return
    if table.native:
        _replace(model, embedding, QuantEmbedding(table, dtype))


def _experts_from_blocks(experts: FusedExperts, pending: dict[str, dict[int, QuantizedWeight]], path: str,
                         scheme: str, dtype: torch.dtype) -> bool:
    """A GGUF's quantized expert stacks: under "auto", where every expert's gate, up and down
    came quantized and the kernels run them, each expert runs from its own blocks (gate and up
    as one linear, or as its parts where their formats differ); otherwise the quantized ones
    are dequantized into the stacked float weights (to run in float, or to be quantized from).
    Returns whether the experts now run from their blocks."""
    gate_up = pending.pop(f"{path}.gate_up_proj", {})
    down = pending.pop(f"{path}.down_proj", {})
    if not gate_up and not down:
        return False
    count, rows = experts.num_experts, experts.intermediate_size
    weights = list(gate_up.values()) + list(down.values())
    if (scheme == "auto" and len(gate_up) == 2 * count and len(down) == count
            and not any(isinstance(w, W8A8Weight) for w in weights) and all(_runs(w, dtype) for w in weights)):
        fused = [_quant_layer(_fused([gate_up[2 * e], gate_up[2 * e + 1]]), None, dtype) for e in range(count)]
        experts.use_expert_linears(fused, [QuantLinear(down[e], None, dtype) for e in range(count)])
        return True
    with torch.no_grad():
        for index, weight in gate_up.items():
            e, shard = divmod(index, 2)
            experts.gate_up_proj[e, shard * rows:(shard + 1) * rows].copy_(weight.dequantize())
        for e, weight in down.items():
            experts.down_proj[e].copy_(weight.dequantize())
    return False


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
