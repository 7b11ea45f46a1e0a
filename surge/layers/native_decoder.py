"""The native decode step: a decode-only step's whole decoder stack in one C++ call.

Batch-1 decode of a small model is bound by per-op overhead, not by its weights: each of ~15
small PyTorch ops per layer (norms, RoPE, casts, the split of q/k/v, residual adds) costs
tens of microseconds of dispatch while the layer's weights take a few. `NativeDecoder` hands
the step to `surge_native.Decoder` (csrc/decoder.cpp), which runs every layer's norms, linears
(the same kernels as the eager path, reading the packed weights in place), RoPE, KV write and
paged attention and MLP with no Python and no dispatcher between them; Python keeps the
embedding before it and the LM head and sampling after it.

It is built from a model's DecoderPlan (surge/models/interfaces.py) where every part has a
native form: bf16 activations on AVX-512 BF16, linears on surge's kernels (dense bf16, int4 /
int8 groups, GGUF blocks, and fused projections of mixed formats as their parts), norms of
surge/layers/norm.py. Elsewhere `build_native_decoder` says why (logged) and the model decodes
eagerly. Prefill and mixed steps always run eagerly; both paths share the KV cache.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from surge.layers.attention import DecodeBatch
from surge.layers.linear import ConcatLinear, PackedLinear
from surge.layers.native import linear_ops
from surge.layers.norm import GemmaRMSNorm, LayerNorm, RMSNorm
from surge.layers.quantization.quant_linear import QuantLinear

logger = logging.getLogger(__name__)

# csrc/decoder.cpp's enums
ACTIVATIONS = {"silu": 0, "gelu_pytorch_tanh": 1, "gelu_new": 1, "gelu": 2}
NORM_SLOTS = {"attn_norm": 0, "attn_out_norm": 1, "mlp_norm": 2, "mlp_out_norm": 3, "q_norm": 4, "k_norm": 5}
LINEAR_SLOTS = {"qkv": 0, "o": 1, "up": 2, "down": 3}
_DENSE, _QUANT = 0, 1


class Unsupported(ValueError):
    """A part of the model that the native decoder has no form for (the message says which)."""


def _norm_args(norm: nn.Module) -> tuple[int, torch.Tensor, torch.Tensor | None, float]:
    """(mode, weight, bias, eps) of a norm, as csrc/decoder.cpp's norm takes them (Gemma's w: it
    scales by 1 + w)."""
    if type(norm) is GemmaRMSNorm:
        return 1, norm.weight.detach().float(), None, norm.eps
    if type(norm) is RMSNorm:
        return 0, norm.weight.detach().float(), None, norm.eps
    if type(norm) is LayerNorm:
        return 2, norm.weight.detach().float(), norm.bias.detach().float(), norm.eps
    raise Unsupported(f"norm {type(norm).__name__}")


def _linear_parts(module: nn.Module) -> list[tuple[int, list[torch.Tensor], list[int], torch.Tensor | None, int]]:
    """A linear as the (type, tensors, ints, bias, out) parts Decoder.add_linear_part takes."""
    if isinstance(module, ConcatLinear):
        return [part for p in module.parts for part in _linear_parts(p)]
    if type(module) is PackedLinear and module.native:
        return [(_DENSE, [module.packed], [], module.bias, module.out_features)]
    if type(module) is QuantLinear and module.native:
        ints = [module.kind_code, module.group_size, module.planes, module.tile_min_rows]
        return [(_QUANT, [module.packed, module.high, module.scales_zeros], ints, module.bias, module.out_features)]
    detail = f" ({module.extra_repr()})" if module.extra_repr() else ""
    raise Unsupported(f"linear {type(module).__name__}{detail} has no native kernel")


class NativeDecoder:
    """forward(ids, positions, caches, DecodeBatch) -> the final norm's output, as the model's
    forward gives it, for a step in which every sequence decodes one token."""

    def __init__(self, plan, hidden_size: int):  # noqa: ANN001 (a DecoderPlan)
        decoder = torch.classes.surge_native.Decoder(hidden_size)
        for i, layer in enumerate(plan.layers):
            if layer.activation not in ACTIVATIONS:
                raise Unsupported(f"activation {layer.activation!r}")
            spec = layer.spec
            window = -1 if spec.sliding_window is None else spec.sliding_window
            rope = -1 if layer.rope is None else layer.rope
            decoder.add_layer([rope, spec.num_heads, spec.num_kv_heads, spec.head_dim, window,
                               ACTIVATIONS[layer.activation], int(layer.gated)], float(spec.scale))
            for name, slot in NORM_SLOTS.items():
                norm = getattr(layer, name)
                if norm is not None:
                    decoder.set_norm(i, slot, *_norm_args(norm))
            for name, slot in LINEAR_SLOTS.items():
                for kind, tensors, ints, bias, out in _linear_parts(getattr(layer, name)):
                    decoder.add_linear_part(i, slot, kind, tensors, ints, bias, out)
        decoder.set_norm(-1, 0, *_norm_args(plan.norm))
        decoder.validate()
        self._decoder = decoder
        self._embed = plan.embed
        self._rotaries = plan.rotaries
        self.num_layers = len(plan.layers)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                 batch: DecodeBatch) -> torch.Tensor:
        x = self._embed(input_ids, positions)
        cos, sin = [], []
        for rotary in self._rotaries:
            c, s = rotary.cos_sin(positions, x.dtype)  # [T, 1, rot]
            cos.append(c.squeeze(1))
            sin.append(s.squeeze(1))
        return self._decoder.forward(x, cos, sin, kv_caches, batch.slot_mapping, batch.block_tables, batch.seq_lens)


def build_native_decoder(model: nn.Module, kv_caches: list[torch.Tensor]) -> NativeDecoder | None:
    """The model's native decoder, or None with the reason logged (the model then decodes eagerly)."""
    reason = _unsupported_reason(model, kv_caches)
    plan = model.decoder_plan() if reason is None else None  # type: ignore[operator]
    if reason is None and plan is None:
        reason = f"{type(model).__name__}'s layers have no plain form (mixture of experts)"
    if reason is None:
        try:
            decoder = NativeDecoder(plan, model.config.hidden_size)  # type: ignore[union-attr]
        except (Unsupported, RuntimeError) as exc:
            reason = str(exc).strip().splitlines()[0]
        else:
            logger.info("native decode step: on (%d layers in one call a step)", decoder.num_layers)
            return decoder
    logger.info("native decode step: off, decoding in PyTorch (%s)", reason)
    return None


def _unsupported_reason(model: nn.Module, kv_caches: list[torch.Tensor]) -> str | None:
    """Why the CPU, the dtype or the cache rule the native step out (the plan is checked apart)."""
    if linear_ops() is None:
        return "needs surge's AVX-512 BF16 kernels, which this CPU or build lacks"
    if getattr(model, "dtype", None) != torch.bfloat16:
        return f"activations are {str(getattr(model, 'dtype', '?')).removeprefix('torch.')}, it runs bf16 only"
    if not kv_caches or kv_caches[0].device.type != "cpu":
        return "no CPU KV cache"
    if not hasattr(model, "decoder_plan"):
        return f"{type(model).__name__} is not a CausalLM"
    return None
