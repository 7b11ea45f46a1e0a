"""Gemma 3 (text): the Llama attention and gated MLP with Gemma's own layer around them.

    - RMSNorms scale by (1 + w), in float32; four per layer: before and after attention, before
      and after the MLP (the outputs of attention and MLP are normed before the residual add)
    - q and k normed per head before RoPE; scores scaled by query_pre_attn_scalar ** -0.5
    - embeddings multiplied by sqrt(hidden_size) (rounded to the model's dtype, as transformers does)
    - local sliding-window layers with their own RoPE base, and global layers (ModelConfig.layer_types)
    - GELU (tanh approximation) in the MLP; tied embeddings; optional final logit soft-capping

llama.cpp's converter stores every norm weight as 1 + w, so the GGUF names carry norm_offset 1.
"""

from __future__ import annotations

import torch
from torch import nn

from surge.config import ModelConfig
from surge.layers.norm import GemmaRMSNorm
from surge.layers.rotary import RotaryEmbedding
from surge.models.interfaces import AttentionSpec, GgufNames, LayerPlan
from surge.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, LlamaModel, attention_plan


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, spec: AttentionSpec, layer_index: int, o_bias: bool):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = LlamaAttention(config, spec, layer_index, o_bias, norm=GemmaRMSNorm)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = GemmaRMSNorm(h, eps)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.spec = spec
        self.activation = config.hidden_act

    def plan(self, rope: int) -> LayerPlan:
        return attention_plan(self, rope, attn_norm=self.input_layernorm,
                              attn_out_norm=self.post_attention_layernorm, mlp_norm=self.pre_feedforward_layernorm,
                              mlp_out_norm=self.post_feedforward_layernorm)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, rotary: RotaryEmbedding,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, residual): the layer's hidden state is their sum, added in the next norm."""
        h, residual = self.input_layernorm(x, residual)
        h = self.post_attention_layernorm(self.self_attn(h, rotary, cos_sin))[0]
        h, residual = self.pre_feedforward_layernorm(h, residual)
        return self.post_feedforward_layernorm(self.mlp(h))[0], residual


class Gemma3Model(LlamaModel):
    decoder_layer = Gemma3DecoderLayer
    norm_class = GemmaRMSNorm

    def __init__(self, config: ModelConfig, o_bias: bool):
        super().__init__(config, o_bias)
        self.embed_scale = config.hidden_size**0.5

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        return x * torch.tensor(self.embed_scale, dtype=x.dtype)


class Gemma3ForCausalLM(LlamaForCausalLM):
    model_class = Gemma3Model
    o_proj_bias = True  # Gemma's `attention_bias` covers o_proj as well
    gguf_names = GgufNames(
        globals={
            "token_embd.weight": "model.embed_tokens.weight",
            "output_norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight",
        },
        blocks={
            "attn_q": "self_attn.q_proj",
            "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj",
            "attn_q_norm": "self_attn.q_norm",
            "attn_k_norm": "self_attn.k_norm",
            "attn_norm": "input_layernorm",
            "post_attention_norm": "post_attention_layernorm",
            "ffn_norm": "pre_feedforward_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm",
            "ffn_gate": "mlp.gate_proj",
            "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj",
        },
        permuted_qk=False,
        norm_offset=1.0,
    )

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        cap = self.config.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits
