"""Llama-family decoder (Llama 2/3, Mistral, SmolLM2; Qwen2, Qwen3 and Gemma 3 build on it in
their own files) over flat tokens and a paged KV cache, on the model contract
(surge/models/interfaces.py).

Parameter names follow Hugging Face's, so safetensors checkpoints load by name and the GGUF
loader maps its names onto them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from surge.config import ModelConfig
from surge.layers.activation import get_activation
from surge.layers.attention_layer import Attention
from surge.layers.norm import RMSNorm
from surge.layers.rotary import RotaryEmbedding
from surge.models.interfaces import (
    AttentionSpec,
    CausalLM,
    DecoderPlan,
    GgufNames,
    LayerPlan,
    attention_specs,
    stage_module,
)


class LlamaAttention(nn.Module):
    """q/k/v projections, RoPE and paged attention; with `config.qk_norm`, each head's q and k
    pass an RMSNorm of `norm` type over head_dim before RoPE (Qwen3, Gemma 3)."""

    def __init__(self, config: ModelConfig, spec: AttentionSpec, layer_index: int, o_bias: bool,
                 norm: type[RMSNorm] = RMSNorm):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_size, self.kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        # q, k and v as one GEMM; checkpoints' q_proj/k_proj/v_proj load into its row ranges.
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=o_bias)
        self.attn = Attention(layer_index, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.sliding_window,
                              spec.scale)
        self.q_norm = norm(spec.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = norm(spec.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def forward(self, x: torch.Tensor, rotary: RotaryEmbedding,
                cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q)[0], self.k_norm(k)[0]
        q, k = rotary(cos_sin, q, k)
        return self.o_proj(self.attn(q, k, v).reshape(tokens, -1))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, intermediate_size: int | None = None):
        super().__init__()
        h, i, bias = config.hidden_size, intermediate_size or config.intermediate_size, config.mlp_bias
        self.intermediate_size = i
        self.gate_up_proj = nn.Linear(h, 2 * i, bias=bias)  # gate and up as one GEMM
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.act = get_activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(self.act(gate) * up)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention and MLP; families with another MLP (experts) override `build_mlp`."""

    def __init__(self, config: ModelConfig, spec: AttentionSpec, layer_index: int, o_bias: bool):
        super().__init__()
        self.self_attn = LlamaAttention(config, spec, layer_index, o_bias)
        self.mlp = self.build_mlp(config, layer_index)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.spec = spec
        self.activation = config.hidden_act

    def plan(self, rope: int) -> LayerPlan | None:
        """This layer as plain parts (None where its MLP is not the gated one: experts)."""
        if type(self.mlp) is not LlamaMLP:
            return None
        return attention_plan(self, rope, attn_norm=self.input_layernorm, attn_out_norm=None,
                              mlp_norm=self.post_attention_layernorm, mlp_out_norm=None)

    def build_mlp(self, config: ModelConfig, layer_index: int) -> nn.Module:
        return LlamaMLP(config)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, rotary: RotaryEmbedding,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, residual) kept apart so each residual add fuses into the next norm."""
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, rotary, cos_sin)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


def attention_plan(layer: nn.Module, rope: int, **norms: nn.Module | None) -> LayerPlan:
    """The LayerPlan of a layer made of LlamaAttention and LlamaMLP, given its norms."""
    attn, mlp = layer.self_attn, layer.mlp
    return LayerPlan(qkv=attn.qkv_proj, o=attn.o_proj, up=mlp.gate_up_proj, down=mlp.down_proj,
                     activation=layer.activation, gated=True, spec=layer.spec, rope=rope,
                     q_norm=attn.q_norm, k_norm=attn.k_norm, **norms)  # type: ignore[arg-type]


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm; families that differ only in their layer or
    norm (Gemma 3) subclass it and set `decoder_layer` / `norm_class`."""

    decoder_layer: type[nn.Module] = LlamaDecoderLayer
    norm_class: type[RMSNorm] = RMSNorm

    def __init__(self, config: ModelConfig, o_bias: bool):
        super().__init__()
        specs = attention_specs(config)
        ropes = list(dict.fromkeys((s.rope, s.head_dim) for s in specs))  # distinct RoPEs, in layer order
        # one table per distinct RoPE; `rotary` is the first layer's (the one GGUF frequency factors scale)
        self.rotaries = [RotaryEmbedding(rope, dim, config.max_position_embeddings) for rope, dim in ropes]
        self.rotary = self.rotaries[0]
        self.layer_rope = [ropes.index((s.rope, s.head_dim)) for s in specs]
        # a pipeline stage holds its layers (and, the first, the embedding and final norm)
        ends, mine = config.holds_ends, config.local_layers
        self.embed_tokens = stage_module(ends, lambda: nn.Embedding(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(stage_module(i in mine, lambda: self.decoder_layer(config, spec, i, o_bias))
                                    for i, spec in enumerate(specs))
        self.norm = stage_module(ends, lambda: self.norm_class(config.hidden_size, config.rms_norm_eps))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x, residual = self.run_layers(self.embed(input_ids), None, positions, range(len(self.layers)))
        return self.norm(x, residual)[0]

    def run_layers(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                   layers: range) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, residual) of decoder layers `layers` (a pipeline stage's) from theirs before."""
        tables = [rotary.cos_sin(positions, x.dtype) for rotary in self.rotaries]
        for i in layers:
            rope = self.layer_rope[i]
            x, residual = self.layers[i](x, residual, self.rotaries[rope], tables[rope])
        assert residual is not None
        return x, residual

    def plan(self) -> DecoderPlan | None:
        layers = [layer.plan(rope) for layer, rope in zip(self.layers, self.layer_rope)]
        if any(layer is None for layer in layers):
            return None
        return DecoderPlan(lambda ids, positions: self.embed(ids), layers, self.norm, self.rotaries)  # type: ignore[arg-type]


class LlamaForCausalLM(CausalLM):
    """forward(flat ids, positions) -> hidden; compute_logits on the rows that sample."""

    packed_modules = {
        ".self_attn.q_proj.": (".self_attn.qkv_proj.", 0),
        ".self_attn.k_proj.": (".self_attn.qkv_proj.", 1),
        ".self_attn.v_proj.": (".self_attn.qkv_proj.", 2),
        ".mlp.gate_proj.": (".mlp.gate_up_proj.", 0),
        ".mlp.up_proj.": (".mlp.gate_up_proj.", 1),
    }
    gguf_names = GgufNames(
        globals={
            "token_embd.weight": "model.embed_tokens.weight",
            "output_norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight",
            "rope_freqs.weight": "model.rope_freqs",
        },
        blocks={
            "attn_q": "self_attn.q_proj",
            "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj",
            "attn_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm",
            "ffn_gate": "mlp.gate_proj",
            "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj",
        },
        permuted_qk=True,
    )
    tp_plan = (
        (r"\.self_attn\.qkv_proj\.(weight|bias)$", "qkv"),
        (r"\.self_attn\.o_proj\.weight$", "row"),
        (r"\.self_attn\.o_proj\.bias$", "row_bias"),
        (r"\.mlp\.gate_up_proj\.(weight|bias)$", "column"),
        (r"\.mlp\.down_proj\.weight$", "row"),
        (r"\.mlp\.down_proj\.bias$", "row_bias"),
        (r"^model\.embed_tokens\.weight$", "vocab"),
        (r"^lm_head\.weight$", "vocab"),
    )
    o_proj_bias = True  # Llama's `attention_bias` covers o_proj too
    model_class: type[LlamaModel] = LlamaModel

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.model = self.model_class(config, o_bias=config.attention_bias and self.o_proj_bias)
        self.lm_head = stage_module(config.holds_ends,
                                    lambda: nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        self.tie_weights()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def prepare_compile(self, max_positions: int) -> None:
        for rotary in self.model.rotaries:
            rotary.prepare(max_positions, self.model.norm.weight.device, self.dtype)

    def decoder_plan(self) -> DecoderPlan | None:
        return self.model.plan()

    def shard_sizes(self, name: str) -> list[int]:
        c = self.config
        if ".qkv_proj." in name:
            return [c.q_size, c.kv_size, c.kv_size]
        if ".gate_up_proj." in name:
            return [c.intermediate_size, c.intermediate_size]
        return []

    def weight_loaders(self) -> dict[str, Callable[[torch.Tensor], None]]:
        # llama3-style RoPE scaling baked into a GGUF's rope_freqs tensor
        return {"model.rope_freqs": self.model.rotary.set_frequency_factors}
