"""Activations of the MLP (gated or not)."""

from __future__ import annotations

import torch.nn.functional as F

from surge.errors import UnsupportedArchitectureError

def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


# gelu_new (GPT-2) is the same tanh approximation as gelu_pytorch_tanh
_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": _gelu_tanh, "gelu_new": _gelu_tanh}


def get_activation(name: str):
    if name not in _ACTIVATIONS:
        raise UnsupportedArchitectureError(f"activation {name!r} is not supported ({', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]

