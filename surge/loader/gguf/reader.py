"""Open a GGUF file and turn its metadata into surge's ModelConfig."""

from __future__ import annotations

import re
import struct
from dataclasses import replace
from typing import Any

from surge.config import ModelConfig, RopeConfig
from surge.errors import ModelFormatError, UnsupportedArchitectureError
from surge.loader.gguf.file import GgufError, GgufFile
from surge.models.registry import architecture_of_gguf, gguf_architectures


def open_gguf(path: str) -> GgufFile:
    """The file's metadata and tensor table, or ModelFormatError naming the file if it is not a
    whole GGUF (bad magic, truncated, corrupt)."""
    try:
        return GgufFile(path)
    except (GgufError, struct.error, IndexError, ValueError, OSError) as exc:
        raise ModelFormatError(
            f"{path}: not a valid GGUF file, truncated or corrupt ({type(exc).__name__}: {exc})"
        ) from exc


def field_value(reader: GgufFile, key: str, default: Any = None) -> Any:
    """The Python value of a metadata field (str, number, bool or list), or `default`."""
    return reader.metadata.get(key, default)


def gguf_architecture(reader: GgufFile, path: str) -> tuple[str, str]:
    """(GGUF architecture name, surge architecture class name) or UnsupportedArchitectureError."""
    arch = field_value(reader, "general.architecture")
    if arch is None:
        raise ModelFormatError(f"{path}: GGUF metadata has no general.architecture")
    known = architecture_of_gguf(arch, experts=bool(field_value(reader, f"{arch}.expert_count")))
    if known is None:
        raise UnsupportedArchitectureError(
            f"{path}: architecture {arch!r} is not supported; surge runs {', '.join(gguf_architectures())} GGUF files"
        )
    return arch, known.name


def _rope_from_gguf(reader: GgufFile, arch: str) -> RopeConfig:
    theta = float(field_value(reader, f"{arch}.rope.freq_base", 10000.0))
    scaling = field_value(reader, f"{arch}.rope.scaling.type", "none")
    factor = float(field_value(reader, f"{arch}.rope.scaling.factor", 1.0) or 1.0)
    original = field_value(reader, f"{arch}.rope.scaling.original_context_length")
    if scaling in ("none", None) or factor == 1.0:
        # llama3-style scaling is baked into a `rope_freqs` tensor, applied by the model.
        return RopeConfig(theta=theta)
    if scaling == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=factor)
    if scaling == "yarn":
        return RopeConfig(
            theta=theta,
            rope_type="yarn",
            factor=factor,
            original_max_position_embeddings=int(original) if original else None,
            beta_fast=float(field_value(reader, f"{arch}.rope.scaling.yarn_beta_fast", 32.0)),
            beta_slow=float(field_value(reader, f"{arch}.rope.scaling.yarn_beta_slow", 1.0)),
        )
    raise ModelFormatError(f"unsupported RoPE scaling type {scaling!r} in GGUF metadata")


def _longrope_from_gguf(reader: GgufFile, arch: str, path: str) -> RopeConfig | None:
    """Phi-3's LongRoPE: its factors are the `rope_factors_short` / `rope_factors_long` tensors."""
    tensors = {t.name: t for t in reader.tensors if t.name in ("rope_factors_short.weight", "rope_factors_long.weight")}
    if not tensors:
        return None
    if len(tensors) != 2:
        raise ModelFormatError(f"{path}: GGUF has only one of rope_factors_short / rope_factors_long")
    from surge.loader.gguf.weights import dequantize

    short, long = (tuple(float(f) for f in dequantize(tensors[f"rope_factors_{k}.weight"], path).reshape(-1))
                   for k in ("short", "long"))
    context = int(field_value(reader, f"{arch}.context_length", 2048))
    original = int(field_value(reader, f"{arch}.rope.scaling.original_context_length") or context)
    attention = field_value(reader, f"{arch}.rope.scaling.attn_factor")
    return RopeConfig(theta=float(field_value(reader, f"{arch}.rope.freq_base", 10000.0)), rope_type="longrope",
                      factor=context / original, original_max_position_embeddings=original,
                      attention_factor=float(attention) if attention is not None else None,
                      short_factor=short, long_factor=long)


def _partial_rotary(reader: GgufFile, arch: str, head_dim: int, rope: RopeConfig) -> RopeConfig:
    """`rope.dimension_count` below the head dimension: only that many dimensions rotate."""
    dims = field_value(reader, f"{arch}.rope.dimension_count")
    if dims is None or int(dims) == head_dim:
        return rope
    return replace(rope, partial_rotary_factor=int(dims) / head_dim)


def config_from_gguf(reader: GgufFile, path: str) -> ModelConfig:
    """ModelConfig from `{arch}.*` metadata; tied embeddings when the file has no output tensor."""
    arch, architecture = gguf_architecture(reader, path)

    def need(key: str) -> Any:
        value = field_value(reader, f"{arch}.{key}")
        if value is None:
            raise ModelFormatError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    names = {t.name for t in reader.tensors}
    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv_heads = int(field_value(reader, f"{arch}.attention.head_count_kv", heads))
    head_dim = int(field_value(reader, f"{arch}.attention.key_length", hidden // heads))
    vocab = field_value(reader, f"{arch}.vocab_size")
    if vocab is None:
        tokens = reader.metadata.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ModelFormatError(f"{path}: GGUF metadata has neither vocab_size nor tokens")
        vocab = len(tokens)
    eos = field_value(reader, "tokenizer.ggml.eos_token_id")
    eot = field_value(reader, "tokenizer.ggml.eot_token_id")
    eos_ids = tuple(dict.fromkeys(int(t) for t in (eos, eot) if t is not None))
    bos = field_value(reader, "tokenizer.ggml.bos_token_id")
    window = field_value(reader, f"{arch}.attention.sliding_window")
    layers = int(need("block_count"))
    family = _family_fields(arch, layers, hidden, heads, head_dim, window)
    experts = _experts(reader, arch, layers, names, path)
    return ModelConfig(
        architecture=architecture,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(field_value(reader, f"{arch}.feed_forward_length")
                              or experts.get("moe_intermediate_size") or need("feed_forward_length")),
        vocab_size=int(vocab),
        rms_norm_eps=float(field_value(reader, f"{arch}.attention.layer_norm_rms_epsilon")
                           or field_value(reader, f"{arch}.attention.layer_norm_epsilon", 1e-6)),
        max_position_embeddings=int(field_value(reader, f"{arch}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names or "blk.0.attn_qkv.bias" in names,
        sliding_window=int(window) if window else None,
        rope=_partial_rotary(reader, arch, head_dim, _longrope_from_gguf(reader, arch, path) or _rope_from_gguf(reader, arch)),
        qk_norm="blk.0.attn_q_norm.weight" in names,
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=eos_ids,
        checkpoint_dtype="float32",
        **family,
        **experts,
    )


# llama.cpp's routing per architecture where the file does not say (`expert_weights_norm`)
_RENORMALIZED_TOP_K = {"llama": True, "qwen2moe": False, "qwen3moe": True}
_SOFTMAX_GATING = 1  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX
_PER_EXPERT_TENSOR = re.compile(r"^blk\.\d+\.ffn_(gate|up|down)\.\d+\.weight$")


def _experts(reader: GgufFile, arch: str, layers: int, names: set[str], path: str) -> dict[str, Any]:
    """The MoE fields from `{arch}.expert_*`; a layer without a router tensor is dense."""
    count = field_value(reader, f"{arch}.expert_count")
    if not count:
        return {}
    if any(_PER_EXPERT_TENSOR.match(name) for name in names):
        raise UnsupportedArchitectureError(
            f"{path}: the experts are stored one tensor each (blk.N.ffn_gate.E.weight, the layout of GGUFs "
            "converted before llama.cpp stacked them); surge reads the stacked blk.N.ffn_gate_exps tensors: "
            "convert the model again with a current llama.cpp")
    gating = field_value(reader, f"{arch}.expert_gating_func")
    if gating is not None and int(gating) != _SOFTMAX_GATING:
        raise UnsupportedArchitectureError(
            f"{path}: expert gating function {gating} is not supported; surge routes with a softmax ({_SOFTMAX_GATING})")
    used = field_value(reader, f"{arch}.expert_used_count")
    if not used:
        raise ModelFormatError(f"{path}: GGUF metadata has {arch}.expert_count but no {arch}.expert_used_count")
    size = field_value(reader, f"{arch}.expert_feed_forward_length") or field_value(reader, f"{arch}.feed_forward_length")
    if not size:
        raise ModelFormatError(f"{path}: GGUF metadata lacks {arch}.expert_feed_forward_length")
    norm = field_value(reader, f"{arch}.expert_weights_norm")
    return {
        "num_experts": int(count),
        "num_experts_per_tok": int(used),
        "moe_intermediate_size": int(size),
        "shared_expert_intermediate_size": int(field_value(reader, f"{arch}.expert_shared_feed_forward_length") or 0),
        "norm_topk_prob": bool(norm) if norm is not None else _RENORMALIZED_TOP_K.get(arch, True),
        "dense_mlp_layers": tuple(i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in names),
    }


def _family_fields(arch: str, layers: int, hidden: int, heads: int, head_dim: int, window: Any) -> dict[str, Any]:
    """What llama.cpp knows of a family without reading it from the file (llama-model.cpp)."""
    if arch == "gpt2":
        return {"hidden_act": "gelu_new", "mlp_bias": True}
    if arch != "gemma3":
        return {}
    # every 6th layer global, the others a sliding window with RoPE base 10000; the 27B model
    # (62 layers) scales scores by hidden / heads, the others by head_dim
    return {
        "hidden_act": "gelu_pytorch_tanh",
        "layer_types": tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers))
        if window else None,
        "local_rope": RopeConfig(theta=10000.0) if window else None,
        "query_pre_attn_scalar": float(hidden // heads if layers == 62 else head_dim),
    }


def tokenizer_metadata(reader: GgufFile) -> dict[str, Any]:
    """The `tokenizer.*` fields, keyed without the `tokenizer.ggml.` / `tokenizer.` prefix."""
    meta: dict[str, Any] = {}
    for key in reader.metadata:
        if key.startswith("tokenizer.ggml."):
            meta[key[len("tokenizer.ggml.") :]] = field_value(reader, key)
        elif key == "tokenizer.chat_template":
            meta["chat_template"] = field_value(reader, key)
    return meta

