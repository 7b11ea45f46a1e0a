"""Writing surge's quantized checkpoints (the format and its reader: surge/loader/quantized_checkpoint.py)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import save_file

from surge.config import ModelConfig, RopeConfig
from surge.models.registry import get_architecture
from surge.layers.quantization.formats import (
    Int4Weight,
    Int8GroupWeight,
    QuantizedWeight,
    W8A8Weight,
)

WEIGHTS_FILE = "model.safetensors"


def hf_config(config: ModelConfig, dtype: str, quantization_config: dict[str, Any]) -> dict[str, Any]:
    """config.json for `config`, which surge.loader.hf_config reads back into the same config
    (transformers' field names; RoPE as `rope_parameters`, per layer type where the sliding
    layers have their own)."""
    raw: dict[str, Any] = {
        "architectures": [config.architecture],
        "model_type": get_architecture(config.architecture).model_type,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "mlp_bias": config.mlp_bias,
        "hidden_act": config.hidden_act,
        "sliding_window": config.sliding_window,
        "layer_types": list(config.layer_types) if config.layer_types is not None else None,
        "rope_theta": config.rope.theta,
        "rope_parameters": _rope_parameters(config.rope),
        "qk_norm": config.qk_norm,
        "query_pre_attn_scalar": config.query_pre_attn_scalar,
        "final_logit_softcapping": config.final_logit_softcapping,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_ids),
        "dtype": dtype,
        "quantization_config": quantization_config,
    }
    if config.local_rope is not None and config.layer_types is not None:
        raw["rope_parameters"] = {"full_attention": raw["rope_parameters"],
                                  "sliding_attention": _rope_parameters(config.local_rope)}
    if config.num_experts:
        raw.update({
            "num_experts": config.num_experts,
            "num_experts_per_tok": config.num_experts_per_tok,
            "moe_intermediate_size": config.moe_intermediate_size,
            "shared_expert_intermediate_size": config.shared_expert_intermediate_size,
            "norm_topk_prob": config.norm_topk_prob,
            "mlp_only_layers": list(config.dense_mlp_layers),
        })
    return raw


def _rope_parameters(rope: RopeConfig) -> dict[str, Any]:
    fields = {k: v for k, v in vars(rope).items() if k not in ("theta", "rope_type") and v is not None}
    return {"rope_type": rope.rope_type, "rope_theta": rope.theta, **fields}


def save_tokenizer(tokenizer: Any, directory: str) -> None:
    """tokenizer.json (with its BOS/EOS post-processor) and tokenizer_config.json (special
    tokens, chat template), as Tokenizer.from_hf_dir reads them."""
    tokenizer.backend.save(os.path.join(directory, "tokenizer.json"))
    config = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
              "chat_template": tokenizer.chat_template}
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in config.items() if v is not None}, f, indent=2, ensure_ascii=False)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def quantized_tensors(name: str, weight: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The stored tensors of one module's quantized weight."""
    if isinstance(weight, Int4Weight):
        return {f"{name}.qweight": pack_nibbles(weight.q), f"{name}.scales": weight.scale.half().contiguous(),
                f"{name}.zeros": weight.zero.half().contiguous()}
    scale = weight.scale if isinstance(weight, Int8GroupWeight) else weight.scale.unsqueeze(1)
    tensors = {f"{name}.qweight": weight.q.to(torch.int8).contiguous(), f"{name}.scales": scale.half().contiguous()}
    if isinstance(weight, W8A8Weight):
        tensors[f"{name}.input_scale"] = weight.input_scale.float().reshape(1).clone()
        tensors[f"{name}.smooth"] = weight.smooth.float().contiguous().clone()
    return tensors


def write_checkpoint(directory: str, tensors: dict[str, torch.Tensor], config: dict[str, Any],
                     tokenizer: Any) -> None:
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(directory, WEIGHTS_FILE),
              metadata={"format": "pt", "quantized_by": "surge"})
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    save_tokenizer(tokenizer, directory)
