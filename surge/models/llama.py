"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) over flat tokens and a paged KV cache.

Parameter names follow Hugging Face's, so safetensors checkpoints load by name and the GGUF
loader maps its names onto them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from surge.config import ModelConfig
from surge.errors import ModelFormatError
from surge.layers import forward_context  # noqa: F401 - registers torch.ops.surge.attention
from surge.layers.activation import get_activation
from surge.layers.attention import (
    AttentionMetadata,
    DecodeBatch,
    decode_step,
    paged_attention,
    write_kv,
)
from surge.layers.linear import PackedLinear, QuantLinear, can_pack
from surge.layers.norm import RMSNorm
from surge.layers.rotary import RotaryEmbedding
from surge.layers.w8a8_linear import W8A8Linear
from surge.quant.formats import (
    QUANTIZED_TYPES,
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


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.scale = self.head_dim**-0.5
        self.sliding_window = config.sliding_window
        bias = config.attention_bias
        # q, k and v as one GEMM; checkpoints' q_proj/k_proj/v_proj load into its row ranges.
        self.qkv_proj = nn.Linear(config.hidden_size, config.q_size + 2 * config.kv_size, bias=bias)
        # Qwen2 has biases on q/k/v only; Llama's `attention_bias` covers o_proj too.
        o_bias = bias and config.architecture != "Qwen2ForCausalLM"
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=o_bias)
        self.rotary = rotary

    def forward(
        self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], kv_cache: torch.Tensor,
        meta: AttentionMetadata | DecodeBatch | None,
    ) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(cos_sin, q, k)
        if isinstance(meta, DecodeBatch):  # every sequence decodes: one native call writes and attends
            out = decode_step(q, k, v, kv_cache, meta, self.scale, self.sliding_window)
        elif meta is None:  # compiled: one opaque op that reads the step's metadata from the forward context
            window = -1 if self.sliding_window is None else self.sliding_window
            out = torch.ops.surge.attention(q, k, v, kv_cache, self.scale, window)
        else:
            write_kv(kv_cache, k, v, meta.slot_mapping)
            out = paged_attention(q, kv_cache, meta, self.scale, self.sliding_window)
        return self.o_proj(out.reshape(tokens, -1))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.intermediate_size = i
        self.gate_up_proj = nn.Linear(h, 2 * i, bias=bias)  # gate and up as one GEMM
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.act = get_activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(self.act(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.self_attn = LlamaAttention(config, rotary)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        meta: AttentionMetadata | DecodeBatch | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, residual) kept apart so each residual add fuses into the next norm."""
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, cos_sin, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.rotary = RotaryEmbedding(config.rope, config.head_dim, config.max_position_embeddings)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, self.rotary) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata | DecodeBatch | None,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        residual = None
        cos_sin = self.rotary.cos_sin(positions, x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, cos_sin, kv_cache, meta)
        return self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    """forward(flat ids, positions, KV caches, metadata) -> hidden; compute_logits on the rows that sample."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata | DecodeBatch | None,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def prepare_compile(self, max_positions: int) -> None:
        """Build what a compiled forward must find ready (RoPE's table for every position)."""
        dtype = self.model.embed_tokens.weight.dtype
        self.model.rotary.prepare(max_positions, self.model.embed_tokens.weight.device, dtype)

    # checkpoint name part -> (fused module name part, shard index)
    STACKED = {
        ".self_attn.q_proj.": (".self_attn.qkv_proj.", 0),
        ".self_attn.k_proj.": (".self_attn.qkv_proj.", 1),
        ".self_attn.v_proj.": (".self_attn.qkv_proj.", 2),
        ".mlp.gate_proj.": (".mlp.gate_up_proj.", 0),
        ".mlp.up_proj.": (".mlp.gate_up_proj.", 1),
    }

    def _shards(self, fused_param: str) -> list[int]:
        """Row counts of the checkpoint tensors stacked into a fused parameter."""
        c = self.config
        if ".qkv_proj." in fused_param:
            return [c.q_size, c.kv_size, c.kv_size]
        if ".gate_up_proj." in fused_param:
            return [c.intermediate_size, c.intermediate_size]
        return [0]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | QuantizedWeight]],
                     source: str = "checkpoint") -> None:
        """Copy (HF name, tensor) pairs into the parameters; every parameter must be given.

        Quantized tensors (from GGUF Q4/Q8 blocks) are kept aside for `finalize` instead of
        being expanded to float; the embedding table is the exception (it is looked up).
        """
        params = dict(self.named_parameters())
        loaded: set[tuple[str, int]] = set()
        self._quantized: dict[str, dict[int, QuantizedWeight]] = {}
        for name, tensor in weights:
            if name == "model.rope_freqs":
                self.model.rotary.set_frequency_factors(tensor)
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                if isinstance(tensor, QUANTIZED_TYPES):  # its own quantized copy
                    self._quantized.setdefault("lm_head", {})[0] = tensor
                continue
            shard = 0
            for part, (fused, index) in self.STACKED.items():
                if part in name:
                    name, shard = name.replace(part, fused), index
                    break
            param = params.get(name)
            if param is None:
                continue  # e.g. rotary inv_freq buffers saved by old checkpoints
            sizes = self._shards(name)
            if isinstance(tensor, QUANTIZED_TYPES):
                if name == "model.embed_tokens.weight":
                    if self.config.tie_word_embeddings:
                        self._quantized.setdefault("lm_head", {})[0] = tensor
                        loaded.add(("lm_head.weight", 0))
                    tensor = tensor.dequantize()
                else:
                    self._quantized.setdefault(name.rsplit(".", 1)[0], {})[shard] = tensor
                    loaded.add((name, shard))
                    continue
            rows = slice(sum(sizes[:shard]), sum(sizes[: shard + 1])) if sizes[0] else slice(None)
            target = param.data[rows]
            if tuple(target.shape) != tuple(tensor.shape):
                raise ModelFormatError(
                    f"{source}: tensor {name!r} (shard {shard}) has shape {tuple(tensor.shape)}, the model "
                    f"expects {tuple(target.shape)}"
                )
            with torch.no_grad():
                target.copy_(tensor)
            loaded.add((name, shard))
        if self.config.tie_word_embeddings:
            loaded.add(("lm_head.weight", 0))
        expected = {(n, i) for n in params for i in range(len(self._shards(n)))}
        missing = sorted(f"{n}" + (f"[{i}]" if len(self._shards(n)) > 1 else "") for n, i in expected - loaded)
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise ModelFormatError(f"{source}: missing weights {', '.join(missing[:3])}{more}")

    def finalize(self, scheme: str = "auto", group_size: int = 32, keep_dense: bool = True) -> None:
        """Turn linears into quantized ones: "auto" keeps a GGUF's Q4/Q8 weights as int4/int8
        and a surge checkpoint's as stored (w8a8 on the int8 GEMM), "int4"/"int8" quantize
        every linear (the LM head to int8 in groups of 32), "none" keeps float (w8a8: its
        weights, inputs not rounded)."""
        dtype = self.model.embed_tokens.weight.dtype
        pending = getattr(self, "_quantized", {})
        for path, module in list(self.named_modules()):
            if not isinstance(module, nn.Linear):
                continue
            parts = pending.get(path)
            weight: QuantizedWeight | None = None
            if parts is not None:
                ordered = [parts[i] for i in sorted(parts)]
                same = len({type(p) for p in ordered}) == 1
                weight = type(ordered[0]).cat(ordered) if same else None  # type: ignore[attr-defined]
                if weight is None or scheme == "none":
                    dense = torch.cat([p.dequantize() for p in ordered])
                    with torch.no_grad():
                        module.weight.copy_(dense)
                    weight = None
            if scheme in ("int4", "int8"):
                # the LM head is the most sensitive matrix: per-channel int8 flips ~3% of the
                # top-1 tokens of the default model, int8 in groups of 32 none, so it gets that
                target = "int8g" if path == "lm_head" else scheme
                current = {Int4Weight: "int4", Int8Weight: "int8", Int8GroupWeight: "int8g"}.get(type(weight))  # w8a8: None
                if current != target or (target == "int4" and weight.group_size != group_size):  # type: ignore[union-attr]
                    source = weight.dequantize() if weight is not None else module.weight.detach().float()
                    if target == "int4":
                        check_group_size(group_size, source.shape[1], path)
                        weight = quantize_int4(source, group_size)
                    elif target == "int8g":
                        weight = quantize_int8_groups(source)
                    else:
                        weight = quantize_int8(source)
            parent_path, _, attr = path.rpartition(".")
            parent = self.get_submodule(parent_path) if parent_path else self
            if weight is None or scheme == "none":
                if can_pack(dtype):  # a float linear stays float, prepacked for oneDNN
                    setattr(parent, attr, PackedLinear(module.weight, module.bias))
                continue
            bias = module.bias.detach() if module.bias is not None else None
            if isinstance(weight, W8A8Weight):
                setattr(parent, attr, W8A8Linear(weight, bias, dtype))
            else:
                setattr(parent, attr, QuantLinear(weight, bias, dtype, keep_dense))
        self._quantized = {}
