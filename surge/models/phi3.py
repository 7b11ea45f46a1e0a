"""Phi-3 (and Phi-4-mini): the Llama decoder with no biases, checkpoints that store q/k/v as
one `qkv_proj` and gate/up as one `gate_up_proj` (surge's own fused layout, loaded whole),
LongRoPE scaling and, for some, partial rotary dimensions. GGUF files (`phi3`) keep the same
fusions (`attn_qkv`, and `ffn_up` holding gate and up), Q/K unpermuted, the LongRoPE factors
as `rope_factors_short` / `rope_factors_long` tensors (read into the config by the GGUF reader)."""

from __future__ import annotations

from dataclasses import replace

from surge.models.llama import LlamaForCausalLM

_NAMES = LlamaForCausalLM.gguf_names


class Phi3ForCausalLM(LlamaForCausalLM):
    gguf_names = replace(
        _NAMES,
        blocks={**{k: v for k, v in _NAMES.blocks.items() if k not in ("ffn_gate", "ffn_up")},
                "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
        permuted_qk=False,
    )
    tp_plan = None  # its checkpoints' fused q/k/v and gate/up are not cut per rank yet
