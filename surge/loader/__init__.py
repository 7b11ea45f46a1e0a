"""Checkpoint loading: resolve what the user named, read config, weights and tokenizer."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from surge.config import QUANTIZATIONS, ModelConfig
from surge.errors import InvalidArgumentError
from surge.loader.hub import ModelSource, resolve_model
from surge.layers.quantization.apply import quantize_linears
from surge.models.registry import get_model_class
from surge.platform import release_free_memory
from surge.loader.weight_loading import Pending, Share
from surge.loader.weight_loading import load_weights as load_model_weights
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


def read_model_config(source: ModelSource) -> ModelConfig:
    """The architecture of a checkpoint, read from its metadata only (no weight is touched)."""
    if source.kind == "gguf":
        from surge.loader.gguf import config_from_gguf, open_gguf

        return config_from_gguf(open_gguf(source.path), source.path)
    from surge.loader.hf_config import config_from_hf_dir

    return config_from_hf_dir(source.path)


def load_tokenizer(source: ModelSource, config: ModelConfig) -> Tokenizer:
    if source.kind == "gguf":
        from surge.loader.gguf import open_gguf, tokenizer_metadata

        return Tokenizer.from_gguf_metadata(tokenizer_metadata(open_gguf(source.path)), source.path)
    return Tokenizer.from_hf_dir(source.path, config.eos_token_ids)


def build_meta_model(config: ModelConfig) -> torch.nn.Module:
    """The model's modules on the meta device: shapes without memory (for estimates and loading)."""
    cls = get_model_class(config.architecture)
    with torch.device("meta"):
        return cls(config)


def check_tensor_parallel(config: ModelConfig, size: int, expert_parallel: bool = False) -> None:
    """InvalidArgumentError, in one line, where the model cannot be split `size` ways."""
    from surge.distributed.tensor_parallel import check_tensor_parallel as check

    check(config, size, get_model_class(config.architecture).tp_plan, config.architecture, expert_parallel)


def check_pipeline_parallel(config: ModelConfig, stages: int) -> None:
    """InvalidArgumentError, in one line, where the model cannot run in `stages` pipeline stages."""
    from surge.distributed.pipeline_parallel import check_pipeline_parallel as check

    check(config, stages, get_model_class(config.architecture).tp_plan, config.architecture)


def estimate_model_bytes(config: ModelConfig, dtype: torch.dtype, quantization: str) -> int:
    """Upper bound of the weights' bytes once loaded, before any is read."""
    from surge.loader.memory import estimate_weight_bytes

    return estimate_weight_bytes(build_meta_model(config), dtype, quantization)


def load_weights(
    source: ModelSource,
    config: ModelConfig,
    dtype: torch.dtype,
    device: str,
    quantization: str = "auto",
    group_size: int = 32,
    before_finalize: Callable[[torch.nn.Module, Pending], None] | None = None,
    share: Share | None = None,
    model_config: ModelConfig | None = None,
) -> torch.nn.Module:
    """The model of `config` with the checkpoint's weights, finalized (linears packed), in eval mode.

    quantization: "auto" runs a GGUF's Q4_0/Q4_1 weights as int4 and Q8_0 as int8 (other
    types and float checkpoints in float); "int4"/"int8" quantize every linear; "none"
    dequantizes everything to `dtype`. A checkpoint written by `surge quantize` keeps its
    quantized modules under "auto". before_finalize(model, pending) runs once the weights are
    read and before linears are replaced (surge quantize installs its weights there; `pending`:
    module path -> {shard: quantized weight}, see surge.loader.weight_loading). With `share`,
    each checkpoint tensor (read as `config` describes it) is cut to its share as it is read into
    the model of `model_config` (a tensor-parallel rank's: surge.distributed.tensor_parallel).
    """
    if source.kind == "gguf":
        from surge.loader.gguf import iter_gguf_weights, open_gguf

        names = get_model_class(config.architecture).gguf_names
        weights = iter_gguf_weights(open_gguf(source.path), config, names, source.path, dtype,
                                    keep_quantized=quantization != "none")
    else:
        import os

        from surge.loader.hf_config import read_json
        from surge.loader.safetensors_dir import iter_safetensors_weights, safetensors_files
        from surge.loader.quantized_checkpoint import iter_quantized_weights, read_quantization_config

        config_path = os.path.join(source.path, "config.json")
        modules = read_quantization_config(read_json(config_path), config_path)
        if modules is None:
            weights = iter_safetensors_weights(source.path, dtype)
        else:
            weights = iter_quantized_weights(safetensors_files(source.path), dtype, modules)
    net = build_meta_model(model_config or config)
    net = net.to(dtype=dtype).to_empty(device=device)
    net.tie_weights()  # to_empty gives each module its own tensor; share them again
    pending = load_model_weights(net, weights, source.path, share)
    if before_finalize is not None:
        before_finalize(net, pending)
    quantize_linears(net, pending, quantization, group_size, output_head=net.output_head)
    net.eval()
    del pending, weights
    release_free_memory()
    return net


def effective_quantization(quantization: str, device: str) -> str:
    """The packed int4/int8 kernels are CPU kernels: on a GPU everything runs in float."""
    if quantization not in QUANTIZATIONS:
        raise InvalidArgumentError(f"unknown quantization {quantization!r}: choose one of {', '.join(QUANTIZATIONS)}")
    return "none" if device.startswith("cuda") else quantization


def load_model(
    model: str | None,
    dtype: str = "auto",
    device: str | None = None,
    quantization: str = "auto",
    group_size: int = 32,
    before_finalize: Callable[[torch.nn.Module, Pending], None] | None = None,
) -> LoadedModel:
    """Model and tokenizer from a GGUF file, a HF directory, a hub id, or the default, in this
    process (the offline tools' path; engines load through their workers). See load_weights."""
    from surge.platform import TORCH_DTYPES, default_device, resolve_dtype

    start = time.perf_counter()
    device = device or default_device()
    quantization = effective_quantization(quantization, device)
    source = resolve_model(model)
    config = read_model_config(source)
    torch_dtype = TORCH_DTYPES[resolve_dtype(dtype, device, config.checkpoint_dtype)]
    tokenizer = load_tokenizer(source, config)
    net = load_weights(source, config, torch_dtype, device, quantization, group_size, before_finalize)
    logger.info(
        "loaded %s (%s, %s) in %.1fs", source.name, config.architecture, str(torch_dtype).removeprefix("torch."),
        time.perf_counter() - start,
    )
    return LoadedModel(source, config, net, tokenizer, torch_dtype, describe_quantization(net))


def describe_quantization(net: torch.nn.Module) -> str:
    """"int4-g32 (210 linears), int8 (1 linears)" or "none"."""
    from collections import Counter

    from surge.layers.quantization.quant_linear import QuantLinear
    from surge.layers.quantization.w8a8_linear import W8A8Linear

    kinds = Counter(
        "w8a8" if isinstance(m, W8A8Linear) else f"{m.kind.removesuffix('g')}-g{m.group_size}" if m.group_size
        else m.kind
        for m in net.modules() if isinstance(m, (QuantLinear, W8A8Linear))
    )
    return ", ".join(f"{k} ({n} linears)" for k, n in sorted(kinds.items())) or "none"


__all__ = ["LoadedModel", "ModelSource", "QUANTIZATIONS", "build_meta_model", "check_pipeline_parallel",
           "check_tensor_parallel",
           "estimate_model_bytes", "load_model",
           "load_tokenizer", "load_weights", "read_model_config", "resolve_model"]
