"""Checkpoint loading: resolve what the user named, read config, weights and tokenizer."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from surge.config import ModelConfig
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


def read_config(source: ModelSource) -> ModelConfig:
    if source.kind == "gguf":
        from surge.loader.gguf import config_from_gguf, open_gguf

        return config_from_gguf(open_gguf(source.path), source.path)
    from surge.loader.hf_config import config_from_hf_dir

    return config_from_hf_dir(source.path)


def load_model(model: str | None, dtype: str = "auto", device: str | None = None) -> LoadedModel:
    """Load model and tokenizer from a GGUF file, a HF directory, a hub id, or the default."""
    from surge.platform import TORCH_DTYPES, default_device, resolve_dtype

    start = time.perf_counter()
    device = device or default_device()
    source = resolve_model(model)
    if source.kind == "gguf":
        from surge.loader.gguf import config_from_gguf, iter_gguf_weights, open_gguf, tokenizer_metadata
        from surge.loader.gguf.reader import gguf_architecture

        reader = open_gguf(source.path)
        config = config_from_gguf(reader, source.path)
        torch_dtype = TORCH_DTYPES[resolve_dtype(dtype, device, config.checkpoint_dtype)]
        arch, _ = gguf_architecture(reader, source.path)
        tokenizer = Tokenizer.from_gguf_metadata(tokenizer_metadata(reader), source.path)
        weights = iter_gguf_weights(reader, config, arch, source.path, torch_dtype)
    else:
        from surge.loader.hf_config import config_from_hf_dir
        from surge.loader.safetensors_dir import iter_safetensors_weights

        config = config_from_hf_dir(source.path)
        torch_dtype = TORCH_DTYPES[resolve_dtype(dtype, device, config.checkpoint_dtype)]
        tokenizer = Tokenizer.from_hf_dir(source.path, config.eos_token_ids)
        weights = iter_safetensors_weights(source.path, torch_dtype)

    cls = get_model_class(config.architecture)
    with torch.device("meta"):
        net = cls(config)
    net = net.to(dtype=torch_dtype).to_empty(device=device)
    net.tie_weights()  # to_empty gives each module its own tensor; share them again
    net.load_weights(weights, source.path)
    net.eval()
    logger.info(
        "loaded %s (%s, %s) in %.1fs", source.name, config.architecture, str(torch_dtype).removeprefix("torch."),
        time.perf_counter() - start,
    )
    return LoadedModel(source, config, net, tokenizer, torch_dtype)


__all__ = ["LoadedModel", "ModelSource", "load_model", "read_config", "resolve_model"]
