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

from collections.abc import Iterator
from typing import Any

import torch

from surge.errors import ModelFormatError
from surge.layers.quantization.formats import (
    Int4Weight,
    Int8GroupWeight,
    Int8Weight,
    QuantizedWeight,
    W8A8Weight,
)
from surge.layers.quantization.schemes import Scheme, parse_scheme
from surge.loader.safetensors_dir import open_safetensors

QUANT_METHOD = "surge"
FORMAT_VERSION = 1
QUANT_SUFFIXES = (".qweight", ".scales", ".zeros", ".input_scale", ".smooth")


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1).to(torch.int32)


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
