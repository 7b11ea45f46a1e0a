"""Checkpoint loading: resolve what the user named, read config, weights and tokenizer."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from surge.config import ModelConfig
from surge.errors import InvalidArgumentError
from surge.loader.hub import ModelSource, resolve_model
from surge.models.registry import get_model_class
from surge.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    source: ModelSource
    config: ModelConfig
    model: torch.nn.Module
    tokenizer: Tokenizer
    dtype: torch.dtype
    quantization: str = "none"


QUANTIZATIONS = ("auto", "none", "int8", "int4")

# Called once the config is read and before any weight is materialized, with the estimated
# weight bytes, the config, the dtype and the device; raising there stops the load.
ReserveHook = Callable[[int, ModelConfig, torch.dtype, str], None]


def load_model(
    model: str | None,
    dtype: str = "auto",
    device: str | None = None,
    quantization: str = "auto",
    group_size: int = 32,
    reserve: ReserveHook | None = None,
    before_finalize: Callable[[torch.nn.Module], None] | None = None,
) -> LoadedModel:
    """Load model and tokenizer from a GGUF file, a HF directory, a hub id, or the default.

    quantization: "auto" runs a GGUF's Q4_0/Q4_1 weights as int4 and Q8_0 as int8 (other
    types and float checkpoints in float); "int4"/"int8" quantize every linear; "none"
    dequantizes everything to `dtype`. A checkpoint written by `surge quantize` keeps its
    quantized modules under "auto". before_finalize(model) runs once the weights are read and
    before linears are packed (surge quantize installs its weights there).
    """
    from surge.platform import TORCH_DTYPES, default_device, resolve_dtype

    start = time.perf_counter()
    if quantization not in QUANTIZATIONS:
        raise InvalidArgumentError(f"unknown quantization {quantization!r}: choose one of {', '.join(QUANTIZATIONS)}")
    device = device or default_device()
    if device.startswith("cuda") and quantization != "none":
        quantization = "none"  # the packed int4/int8 kernels used here are CPU kernels
    source = resolve_model(model)
    if source.kind == "gguf":
        from surge.loader.gguf import (
            config_from_gguf,
            iter_gguf_weights,
            open_gguf,
            tokenizer_metadata,
        )
        from surge.loader.gguf.reader import gguf_architecture

        reader = open_gguf(source.path)
        config = config_from_gguf(reader, source.path)
        torch_dtype = TORCH_DTYPES[resolve_dtype(dtype, device, config.checkpoint_dtype)]
        arch, _ = gguf_architecture(reader, source.path)
        tokenizer = Tokenizer.from_gguf_metadata(tokenizer_metadata(reader), source.path)
        weights = iter_gguf_weights(reader, config, arch, source.path, torch_dtype,
                                    keep_quantized=quantization != "none")
    else:
        import os

        from surge.loader.hf_config import config_from_hf_dir, read_json
        from surge.loader.safetensors_dir import iter_safetensors_weights, safetensors_files
        from surge.quant.checkpoint import iter_quantized_weights, read_quantization_config

        config = config_from_hf_dir(source.path)
        torch_dtype = TORCH_DTYPES[resolve_dtype(dtype, device, config.checkpoint_dtype)]
        tokenizer = Tokenizer.from_hf_dir(source.path, config.eos_token_ids)
        config_path = os.path.join(source.path, "config.json")
        modules = read_quantization_config(read_json(config_path), config_path)
        if modules is None:
            weights = iter_safetensors_weights(source.path, torch_dtype)
        else:
            weights = iter_quantized_weights(safetensors_files(source.path), torch_dtype, modules)

    cls = get_model_class(config.architecture)
    with torch.device("meta"):
        net = cls(config)
    if reserve is not None:
        from surge.loader.memory import estimate_weight_bytes

        reserve(estimate_weight_bytes(net, torch_dtype, quantization), config, torch_dtype, device)
    net = net.to(dtype=torch_dtype).to_empty(device=device)
    net.tie_weights()  # to_empty gives each module its own tensor; share them again
    net.load_weights(weights, source.path)
    if before_finalize is not None:
        before_finalize(net)
    net.finalize(quantization, group_size)
    net.eval()
    logger.info(
        "loaded %s (%s, %s) in %.1fs", source.name, config.architecture, str(torch_dtype).removeprefix("torch."),
        time.perf_counter() - start,
    )
    return LoadedModel(source, config, net, tokenizer, torch_dtype, describe_quantization(net))


def describe_quantization(net: torch.nn.Module) -> str:
    """"int4-g32 (210 linears), int8 (1 linears)" or "none"."""
    from collections import Counter

    from surge.layers.linear import QuantLinear
    from surge.layers.w8a8_linear import W8A8Linear

    kinds = Counter(
        "w8a8" if isinstance(m, W8A8Linear) else f"{m.kind.removesuffix('g')}-g{m.group_size}" if m.group_size
        else m.kind
        for m in net.modules() if isinstance(m, (QuantLinear, W8A8Linear))
    )
    return ", ".join(f"{k} ({n} linears)" for k, n in sorted(kinds.items())) or "none"


__all__ = ["LoadedModel", "ModelSource", "ReserveHook", "load_model", "resolve_model"]
