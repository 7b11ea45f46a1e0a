"""Qwen3: the Qwen2 decoder without q/k/v biases and with an RMSNorm of each head's q and k
before RoPE (`qk_norm`, set by the registry); head_dim is explicit (not hidden / heads)."""

from __future__ import annotations

from dataclasses import replace

from surge.models.qwen2 import Qwen2ForCausalLM


class Qwen3ForCausalLM(Qwen2ForCausalLM):
    gguf_names = replace(Qwen2ForCausalLM.gguf_names, blocks={
        **Qwen2ForCausalLM.gguf_names.blocks,
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
    })
