"""Architecture name (as in config.json's `architectures`) -> model class."""

from __future__ import annotations

from surge.errors import UnsupportedArchitectureError

# name -> (module, class); imported lazily so reading a config does not import torch.
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("surge.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("surge.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("surge.models.llama", "LlamaForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(architecture: str) -> type:
    if architecture not in _MODELS:
        raise UnsupportedArchitectureError(
            f"architecture {architecture!r} is not supported; surge runs {', '.join(supported_architectures())}"
        )
    import importlib

    module, name = _MODELS[architecture]
    return getattr(importlib.import_module(module), name)
