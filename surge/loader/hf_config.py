"""Hugging Face `config.json` -> ModelConfig."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Any

from surge.config import ModelConfig, RopeConfig
from surge.errors import ModelFormatError, UnsupportedArchitectureError
from surge.models.registry import get_architecture, supported_architectures

_TORCH_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{path}: invalid JSON ({exc})") from exc


def config_from_hf_dir(directory: str) -> ModelConfig:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ModelFormatError(
            f"{directory}: no config.json; a Hugging Face model directory needs config.json and "
            "*.safetensors (or pass a .gguf file)"
        )
    raw = read_json(path)
    archs = raw.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in supported_architectures():
        raise UnsupportedArchitectureError(
            f"{path}: architecture {arch!r} (model_type {raw.get('model_type')!r}) is not supported; "
            f"surge runs {', '.join(supported_architectures())}"
        )
    family = get_architecture(arch)
    raw = {**family.config_defaults, **raw}
    for key, common in family.config_keys.items():
        if raw.get(key) is not None and raw.get(common) is None:
            raw[common] = raw[key]
    if raw.get("intermediate_size") is None and family.mlp_ratio and raw.get("hidden_size"):
        raw["intermediate_size"] = family.mlp_ratio * int(raw["hidden_size"])
    try:
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        rope, local_rope = _ropes(raw)
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        window = raw.get("sliding_window")
        if raw.get("use_sliding_window") is False:  # Qwen2 declares a window it does not use
            window = None
        layer_types = _layer_types(raw, window)
        _refuse_unsupported(raw, path)
        return ModelConfig(
            architecture=arch,
            hidden_size=hidden,
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            intermediate_size=int(raw["intermediate_size"]),
            vocab_size=int(raw["vocab_size"]),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", raw.get("qkv_bias", False))),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            hidden_act=str(raw.get("hidden_act") or raw.get("hidden_activation") or "silu"),
            sliding_window=int(window) if window else None,
            rope=rope,
            layer_types=layer_types,
            local_rope=local_rope if layer_types else None,
            qk_norm=bool(raw.get("qk_norm", False)),
            query_pre_attn_scalar=float(raw["query_pre_attn_scalar"]) if raw.get("query_pre_attn_scalar") else None,
            final_logit_softcapping=float(raw["final_logit_softcapping"]) if raw.get("final_logit_softcapping")
            else None,
            **_experts(raw, path),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            checkpoint_dtype=_TORCH_DTYPE_NAMES.get(str(dtype).replace("torch.", ""), "float32"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFormatError(f"{path}: missing or invalid field ({exc})") from exc


def _ropes(raw: dict[str, Any]) -> tuple[RopeConfig, RopeConfig | None]:
    """(RoPE of the full-attention layers, RoPE of the sliding layers or None).

    transformers 5 writes `rope_parameters` either as one dict or, for models whose layer types
    differ (Gemma 3), as one dict per layer type; older configs give `rope_scaling`, `rope_theta`
    and Gemma's `rope_local_base_freq`."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling")
    theta = float(raw.get("rope_theta", 10000.0))
    if isinstance(params, dict) and "full_attention" in params:
        full = RopeConfig.from_hf(params["full_attention"], theta)
        local = params.get("sliding_attention")
        return full, RopeConfig.from_hf(local, theta) if local else None
    local_theta = raw.get("rope_local_base_freq")
    rope = RopeConfig.from_hf(params, theta)
    if "partial_rotary_factor" in raw and not (params or {}).get("partial_rotary_factor"):
        rope = replace(rope, partial_rotary_factor=float(raw["partial_rotary_factor"]))
    if rope.rope_type == "longrope":
        rope = _longrope(rope, raw, params or {})
    return rope, RopeConfig(theta=float(local_theta)) if local_theta else None


def _longrope(rope: RopeConfig, raw: dict[str, Any], params: dict[str, Any]) -> RopeConfig:
    """Phi-3 keeps the pretrained context in `original_max_position_embeddings` beside the
    parameters, and the extension factor is the ratio of the two contexts unless given."""
    original = int(params.get("original_max_position_embeddings") or raw.get("original_max_position_embeddings")
                   or raw.get("max_position_embeddings", 2048))
    factor = params.get("factor") or int(raw.get("max_position_embeddings", original)) / original
    return replace(rope, original_max_position_embeddings=original, factor=float(factor))


def _experts(raw: dict[str, Any], path: str) -> dict[str, Any]:
    """The MoE fields: Mixtral's `num_local_experts`, Qwen's `num_experts` with the dense layers
    of `mlp_only_layers` and `decoder_sparse_step`; routers other than a softmax are refused."""
    experts = int(raw.get("num_local_experts") or raw.get("num_experts") or 0)
    if not experts:
        return {}
    for key in ("scoring_func", "router_type", "topk_method"):
        value = raw.get(key)
        if value not in (None, "softmax", "greedy"):
            raise UnsupportedArchitectureError(
                f"{path}: router {key}={value!r} is not supported; surge routes with a softmax over the experts' logits")
    layers = int(raw["num_hidden_layers"])
    step = int(raw.get("decoder_sparse_step") or 1)
    dense = set(int(i) for i in raw.get("mlp_only_layers") or []) | {i for i in range(layers) if (i + 1) % step}
    return {
        "num_experts": experts,
        "num_experts_per_tok": int(raw["num_experts_per_tok"]),
        "moe_intermediate_size": int(raw.get("moe_intermediate_size") or raw["intermediate_size"]),
        "shared_expert_intermediate_size": int(raw.get("shared_expert_intermediate_size") or 0),
        "norm_topk_prob": bool(raw.get("norm_topk_prob", False)),
        "dense_mlp_layers": tuple(sorted(dense)),
    }


def _refuse_unsupported(raw: dict[str, Any], path: str) -> None:
    """Settings of a supported architecture that surge does not implement: an error, never
    silently different outputs."""
    refused = {
        "attn_logit_softcapping": "attention logit soft-capping",
        "use_bidirectional_attention": "bidirectional attention",
        "scale_attn_by_inverse_layer_idx": "scores scaled by the inverse layer index",
    }
    for key, what in refused.items():
        if raw.get(key):
            raise UnsupportedArchitectureError(f"{path}: {what} ({key}={raw[key]!r}) is not supported")
    if raw.get("scale_attn_weights") is False:  # GPT-2 without the 1/sqrt(head_dim) of its scores
        raise UnsupportedArchitectureError(f"{path}: unscaled attention scores (scale_attn_weights=False) are not supported")


def _layer_types(raw: dict[str, Any], window: Any) -> tuple[str, ...] | None:
    """Which layers use the sliding window: config.json's `layer_types`, or Qwen2's rule (layers
    from `max_window_layers` on) when it enables a window without listing them; None: all alike."""
    if not window:
        return None
    if raw.get("layer_types") is not None:
        return tuple(str(t) for t in raw["layer_types"])
    if raw.get("sliding_window_pattern"):  # Gemma 3 before layer_types: every n-th layer is global
        n = int(raw["sliding_window_pattern"])
        return tuple("full_attention" if (i + 1) % n == 0 else "sliding_attention"
                     for i in range(int(raw["num_hidden_layers"])))
    if raw.get("use_sliding_window") and raw.get("max_window_layers") is not None:
        first = int(raw["max_window_layers"])
        return tuple("sliding_attention" if i >= first else "full_attention" for i in range(int(raw["num_hidden_layers"])))
    return None
