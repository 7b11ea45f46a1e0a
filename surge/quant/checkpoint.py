"""surge's quantized checkpoints: a Hugging Face model directory (config.json, tokenizer.json,
model.safetensors) whose quantized linears are stored as codes with fp16 scales and zeros,
listed module by module in config.json's `quantization_config`:

    <module>.qweight   int4: uint8 [N, K/2], column 2j in the low nibble, 2j+1 in the high
                       int8 / int8-g32: int8 [N, K]
    <module>.scales    fp16 [N, K/G]  (int8 per channel: [N, 1])
    <module>.zeros     fp16 [N, K/G]  int4 only:  w = (q - 8) * scale + zero
    <module>.input_scale   float32 [1]  w8a8 only: the inputs' static per-tensor scale
    <module>.smooth        float32 [K]  w8a8 only: SmoothQuant factors (the codes are of W diag(smooth))
    <module>.weight    float modules, in their scheme's dtype

Module names are the checkpoint's (q_proj, k_proj, ..., not surge's fused ones), so a reader
needs nothing of surge's layout. Loading keeps the codes as they are: the packed kernels get
exactly the weights that were quantized.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import torch
from safetensors.torch import save_file

from surge.config import ModelConfig
from surge.errors import ModelFormatError
from surge.loader.safetensors_dir import open_safetensors
from surge.quant.formats import (
    Int4Weight,
    Int8GroupWeight,
    Int8Weight,
    QuantizedWeight,
    W8A8Weight,
)
from surge.quant.schemes import Scheme, parse_scheme

QUANT_METHOD = "surge"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
QUANT_SUFFIXES = (".qweight", ".scales", ".zeros", ".input_scale", ".smooth")


def hf_config(config: ModelConfig, dtype: str, quantization_config: dict[str, Any]) -> dict[str, Any]:
    """config.json for `config`, readable by surge.loader.hf_config (and transformers' fields)."""
    rope = config.rope
    raw: dict[str, Any] = {
        "architectures": [config.architecture],
        "model_type": MODEL_TYPES.get(config.architecture, "llama"),
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
        "rope_theta": rope.theta,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_ids),
        "dtype": dtype,
        "quantization_config": quantization_config,
    }
    if rope.rope_type != "default" or rope.partial_rotary_factor != 1.0:
        fields = {k: v for k, v in vars(rope).items() if k not in ("theta",) and v is not None}
        raw["rope_scaling"] = fields
    return raw


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


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1).to(torch.int32)


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


def split_rows(weight: QuantizedWeight | torch.Tensor, sizes: list[int]) -> list[QuantizedWeight | torch.Tensor]:
    """A fused module's weight cut back into the checkpoint's parts (rows)."""
    if len(sizes) == 1:
        return [weight]
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    pieces = [slice(a, b) for a, b in zip(bounds, bounds[1:])]
    if isinstance(weight, torch.Tensor):
        return [weight[s] for s in pieces]
    if isinstance(weight, Int4Weight):
        return [Int4Weight(weight.q[s], weight.scale[s], weight.zero[s], weight.group_size) for s in pieces]
    if isinstance(weight, Int8GroupWeight):
        return [Int8GroupWeight(weight.q[s], weight.scale[s], weight.group_size) for s in pieces]
    if isinstance(weight, W8A8Weight):  # the parts read one input: they share its quantizer
        return [W8A8Weight(weight.q[s], weight.scale[s], weight.input_scale, weight.smooth) for s in pieces]
    return [Int8Weight(weight.q[s], weight.scale[s]) for s in pieces]


def write_checkpoint(directory: str, tensors: dict[str, torch.Tensor], config: dict[str, Any],
                     tokenizer: Any) -> None:
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(directory, WEIGHTS_FILE),
              metadata={"format": "pt", "quantized_by": "surge"})
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    save_tokenizer(tokenizer, directory)


def read_quantization_config(raw: dict[str, Any], path: str) -> dict[str, Scheme] | None:
    """Module name -> scheme from a config.json's quantization_config (None when there is none)."""
    qc = raw.get("quantization_config")
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method != QUANT_METHOD:
        raise ModelFormatError(
            f"{path}: quantization_config with quant_method {method!r} is not supported; surge loads its own "
            "quantized checkpoints (surge quantize), GGUF files and float checkpoints")
    if qc.get("format_version") != FORMAT_VERSION:
        raise ModelFormatError(f"{path}: surge quantization format version {qc.get('format_version')!r}; this "
                               f"surge reads version {FORMAT_VERSION}")
    modules = qc.get("modules")
    if not isinstance(modules, dict):
        raise ModelFormatError(f"{path}: quantization_config has no 'modules' table")
    try:
        return {name: parse_scheme(s) for name, s in modules.items()}
    except Exception as exc:
        raise ModelFormatError(f"{path}: quantization_config: {exc}") from exc


def _read_quantized(f: Any, name: str, scheme: Scheme, path: str) -> QuantizedWeight:
    keys = set(f.keys())
    extra = {"int4": ["zeros"], "w8a8": ["input_scale", "smooth"]}.get(scheme.kind, [])
    need = [f"{name}.{suffix}" for suffix in ["qweight", "scales", *extra]]
    missing = [k for k in need if k not in keys]
    if missing:
        raise ModelFormatError(f"{path}: {scheme.name} module {name} has no tensor {missing[0]}")
    q, scale = f.get_tensor(f"{name}.qweight"), f.get_tensor(f"{name}.scales").float()
    rows = q.shape[0]
    if scheme.kind == "int4":
        cols = 2 * q.shape[1]
        zero = f.get_tensor(f"{name}.zeros").float()
        if q.dtype != torch.uint8 or cols % scheme.group_size or scale.shape != (rows, cols // scheme.group_size) \
                or zero.shape != scale.shape:
            raise ModelFormatError(f"{path}: {name}: tensors do not fit {scheme.name} (qweight {tuple(q.shape)} "
                                   f"{q.dtype}, scales {tuple(scale.shape)}, zeros {tuple(zero.shape)})")
        return Int4Weight(unpack_nibbles(q), scale, zero, scheme.group_size)
    groups = q.shape[1] // scheme.group_size if scheme.group_size else 1
    if q.dtype != torch.int8 or scale.shape != (rows, groups):
        raise ModelFormatError(f"{path}: {name}: tensors do not fit {scheme.name} (qweight {tuple(q.shape)} "
                               f"{q.dtype}, scales {tuple(scale.shape)})")
    if scheme.kind == "w8a8":
        input_scale, smooth = f.get_tensor(f"{name}.input_scale").float(), f.get_tensor(f"{name}.smooth").float()
        if input_scale.numel() != 1 or not float(input_scale) > 0 or smooth.shape != (q.shape[1],) \
                or not bool((smooth > 0).all()):
            raise ModelFormatError(f"{path}: {name}: input_scale must be one positive number and smooth "
                                   f"[{q.shape[1]}] positive factors (got {tuple(input_scale.shape)}, "
                                   f"{tuple(smooth.shape)})")
        return W8A8Weight(q, scale[:, 0], input_scale.reshape(()), smooth)
    return Int8GroupWeight(q, scale, scheme.group_size) if scheme.group_size else Int8Weight(q, scale[:, 0])


def iter_quantized_weights(files: list[str], dtype: torch.dtype, modules: dict[str, Scheme]
                           ) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """(name, tensor) pairs as the model's load_weights takes them: a quantized module's
    tensors come as one quantized weight named <module>.weight; float ones as `dtype`."""
    quantized = {n: s for n, s in modules.items() if s.quantized}
    for path in files:
        with open_safetensors(path) as f:
            for key in f.keys():
                module, _, suffix = key.rpartition(".")
                if module in quantized and suffix == "qweight":
                    yield f"{module}.weight", _read_quantized(f, module, quantized[module], path)
                elif module not in quantized or f".{suffix}" not in QUANT_SUFFIXES:  # float tensors, biases
                    yield key, f.get_tensor(key).to(dtype)
