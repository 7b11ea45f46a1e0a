"""GPT-2: the family of LayerNorm, learned absolute positions and a plain GELU MLP.

    x = wte(ids) + wpe(positions); per layer, pre-LayerNorm attention (q/k/v as one projection
    with bias, no RoPE) and MLP (up -> GELU (tanh) -> down, with biases); final LayerNorm; the
    LM head tied to wte.

Modules carry surge's names (model.layers.N.self_attn.qkv_proj, mlp.up_proj, ...) so the loader,
quantization and `surge quantize` treat them as any family's; GPT-2's own checkpoint names
(transformer.h.N.attn.c_attn, Conv1D matrices stored [in, out]) map onto them through `hf_names`.
llama.cpp's converter already transposed the matrices and fused nothing else (GGUF `gpt2`).
"""

from __future__ import annotations

import torch
from torch import nn

from surge.config import ModelConfig
from surge.layers.activation import get_activation
from surge.layers.attention_layer import Attention
from surge.layers.norm import LayerNorm
from surge.models.interfaces import AttentionSpec, CausalLM, DecoderPlan, GgufNames, HfNames, LayerPlan, attention_specs


class GPT2Attention(nn.Module):
    def __init__(self, config: ModelConfig, spec: AttentionSpec, layer_index: int):
        super().__init__()
        self.num_heads, self.head_dim = spec.num_heads, spec.head_dim
        self.size = spec.num_heads * spec.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * self.size, bias=True)
        self.o_proj = nn.Linear(self.size, config.hidden_size, bias=True)
        self.attn = Attention(layer_index, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.sliding_window,
                              spec.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = (t.view(tokens, self.num_heads, self.head_dim) for t in self.qkv_proj(x).split(self.size, dim=-1))
        return self.o_proj(self.attn(q, k, v).reshape(tokens, -1))


class GPT2MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)
        self.act = get_activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: ModelConfig, spec: AttentionSpec, layer_index: int):
        super().__init__()
        eps = config.rms_norm_eps  # the norms' epsilon, whatever their kind
        self.input_layernorm = LayerNorm(config.hidden_size, eps)
        self.self_attn = GPT2Attention(config, spec, layer_index)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps)
        self.mlp = GPT2MLP(config)
        self.spec = spec
        self.activation = config.hidden_act

    def plan(self) -> LayerPlan:
        attn = self.self_attn
        return LayerPlan(attn_norm=self.input_layernorm, qkv=attn.qkv_proj, o=attn.o_proj, attn_out_norm=None,
                         mlp_norm=self.post_attention_layernorm, up=self.mlp.up_proj, down=self.mlp.down_proj,
                         mlp_out_norm=None, activation=self.activation, gated=False, spec=self.spec, rope=None)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h), residual)
        return self.mlp(h), residual


class GPT2Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(GPT2Block(config, spec, i) for i, spec in enumerate(attention_specs(config)))
        self.norm = LayerNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids) + self.embed_positions(positions)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual)
        return self.norm(x, residual)[0]

    def plan(self) -> DecoderPlan:
        def embed(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return self.embed_tokens(ids) + self.embed_positions(positions)

        return DecoderPlan(embed, [layer.plan() for layer in self.layers], self.norm, [])


_CONV1D = r"\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$"


class GPT2LMHeadModel(CausalLM):
    packed_modules = {
        ".self_attn.q_proj.": (".self_attn.qkv_proj.", 0),
        ".self_attn.k_proj.": (".self_attn.qkv_proj.", 1),
        ".self_attn.v_proj.": (".self_attn.qkv_proj.", 2),
    }
    hf_names = HfNames(
        renames=(
            (r"^(transformer\.)?wte\.", "model.embed_tokens."),
            (r"^(transformer\.)?wpe\.", "model.embed_positions."),
            (r"^(transformer\.)?ln_f\.", "model.norm."),
            (r"^(transformer\.)?h\.", "model.layers."),
            (r"\.ln_1\.", ".input_layernorm."),
            (r"\.ln_2\.", ".post_attention_layernorm."),
            (r"\.attn\.c_attn\.", ".self_attn.qkv_proj."),
            (r"\.attn\.c_proj\.", ".self_attn.o_proj."),
            (r"\.mlp\.c_fc\.", ".mlp.up_proj."),
            (r"\.mlp\.c_proj\.", ".mlp.down_proj."),
        ),
        transposed=_CONV1D,
    )
    gguf_names = GgufNames(
        globals={
            "token_embd.weight": "model.embed_tokens.weight",
            "position_embd.weight": "model.embed_positions.weight",
            "output_norm.weight": "model.norm.weight",
            "output_norm.bias": "model.norm.bias",
            "output.weight": "lm_head.weight",
        },
        blocks={
            "attn_norm": "input_layernorm",
            "attn_qkv": "self_attn.qkv_proj",
            "attn_output": "self_attn.o_proj",
            "ffn_norm": "post_attention_layernorm",
            "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj",
        },
    )

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.model = GPT2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def decoder_plan(self) -> DecoderPlan:
        return self.model.plan()

    def shard_sizes(self, name: str) -> list[int]:
        if ".qkv_proj." in name:
            size = self.config.num_attention_heads * self.config.head_dim
            return [size, size, size]
        return []
