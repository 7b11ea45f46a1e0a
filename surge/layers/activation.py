"""Gated activations of the MLP."""

from __future__ import annotations

import torch.nn.functional as F

from surge.errors import UnsupportedArchitectureError

_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def get_activation(name: str):
    if name not in _ACTIVATIONS:
        raise UnsupportedArchitectureError(f"activation {name!r} is not supported ({', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]

