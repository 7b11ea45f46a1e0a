"""The architectures surge runs: config.json's `architectures` name -> model class, with what
the checkpoint readers need to know of each (its GGUF name, its config.json `model_type`, the
defaults its config.json may leave out). Torch-free: reading a config imports no model."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from surge.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Architecture:
    name: str  # config.json `architectures[0]`, e.g. "Qwen2ForCausalLM"
    model_class: str  # "module:Class"
    model_type: str  # config.json `model_type`, written into the configs surge saves
    gguf: str | None = None  # GGUF `general.architecture`
    gguf_experts: bool = False  # this row is the GGUF architecture's files with experts (Mixtral's `llama`)
    # config.json fields it may omit, and what the family always has ("qk_norm": True)
    config_defaults: dict[str, Any] = field(default_factory=dict)
    # the family's own config.json keys -> the common ones (GPT-2's n_embd -> hidden_size)
    config_keys: dict[str, str] = field(default_factory=dict)
    mlp_ratio: int = 0  # intermediate_size = hidden_size * mlp_ratio where config.json gives none


_ARCHITECTURES = {a.name: a for a in (
    Architecture("LlamaForCausalLM", "surge.models.llama:LlamaForCausalLM", "llama", gguf="llama"),
    Architecture("MistralForCausalLM", "surge.models.llama:LlamaForCausalLM", "mistral", gguf="mistral"),
    Architecture("Qwen2ForCausalLM", "surge.models.qwen2:Qwen2ForCausalLM", "qwen2", gguf="qwen2",
                 config_defaults={"attention_bias": True}),
    Architecture("Qwen3ForCausalLM", "surge.models.qwen3:Qwen3ForCausalLM", "qwen3", gguf="qwen3",
                 config_defaults={"qk_norm": True}),
    Architecture("Gemma3ForCausalLM", "surge.models.gemma3:Gemma3ForCausalLM", "gemma3_text", gguf="gemma3",
                 config_defaults={"qk_norm": True, "hidden_activation": "gelu_pytorch_tanh",
                                  "query_pre_attn_scalar": 256, "tie_word_embeddings": True,
                                  "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0}),
    Architecture("Phi3ForCausalLM", "surge.models.phi3:Phi3ForCausalLM", "phi3", gguf="phi3"),
    Architecture("GPT2LMHeadModel", "surge.models.gpt2:GPT2LMHeadModel", "gpt2", gguf="gpt2",
                 config_defaults={"tie_word_embeddings": True, "activation_function": "gelu_new",
                                  "layer_norm_epsilon": 1e-5, "attention_bias": True, "mlp_bias": True},
                 config_keys={"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
                              "n_positions": "max_position_embeddings", "n_ctx": "max_position_embeddings",
                              "n_inner": "intermediate_size", "layer_norm_epsilon": "rms_norm_eps",
                              "activation_function": "hidden_act"},
                 mlp_ratio=4),
    # mixtures of experts; Mixtral always renormalises its top-k, Qwen2-MoE never, Qwen3-MoE as
    # its config says
    Architecture("MixtralForCausalLM", "surge.models.mixtral:MixtralForCausalLM", "mixtral", gguf="llama",
                 gguf_experts=True, config_defaults={"norm_topk_prob": True}),
    Architecture("Qwen2MoeForCausalLM", "surge.models.qwen_moe:Qwen2MoeForCausalLM", "qwen2_moe", gguf="qwen2moe",
                 config_defaults={"qkv_bias": True, "norm_topk_prob": False}),
    Architecture("Qwen3MoeForCausalLM", "surge.models.qwen_moe:Qwen3MoeForCausalLM", "qwen3_moe", gguf="qwen3moe",
                 config_defaults={"qk_norm": True, "norm_topk_prob": False}),
)}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def get_architecture(name: str | None) -> Architecture:
    if name not in _ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {name!r} is not supported; surge runs {', '.join(supported_architectures())}"
        )
    return _ARCHITECTURES[name]  # type: ignore[index]


def architecture_of_gguf(gguf_name: str, experts: bool = False) -> Architecture | None:
    """The row for a GGUF `general.architecture`; `experts`: the file has expert tensors."""
    rows = [a for a in _ARCHITECTURES.values() if a.gguf == gguf_name]
    return next((a for a in rows if a.gguf_experts == experts), rows[0] if rows else None)


def gguf_architectures() -> list[str]:
    return sorted({a.gguf for a in _ARCHITECTURES.values() if a.gguf})


def get_model_class(architecture: str) -> type:
    module, name = get_architecture(architecture).model_class.split(":")
    return getattr(importlib.import_module(module), name)
