"""Memory of a model: an estimate before the weights exist, a measurement after."""

from __future__ import annotations

import torch
from torch import nn


def estimate_weight_bytes(net: nn.Module, dtype: torch.dtype, quantization: str) -> int:
    """Upper bound of the weights' bytes once loaded, from a model built on the meta device.

    On surge's bf16 kernels a quantized weight takes at most its float bytes (no dense copy: many
    rows dequantize tiles). Elsewhere, and for per-channel int8 (ATen's kernel), a quantized
    linear keeps its packed weight (int8: 1 byte, int4: 1/2 byte per weight, plus scales) beside
    the dense copy it uses for large batches, hence the extra 1.25 bytes.
    """
    from surge.layers.native import linear_ops

    element = torch.tensor([], dtype=dtype).element_size()
    total = sum(p.numel() for p in net.parameters()) * element
    dense_copies = quantization == "int8" or dtype != torch.bfloat16 or linear_ops() is None
    if quantization != "none" and dense_copies:
        total += int(sum(m.weight.numel() for m in net.modules() if isinstance(m, nn.Linear)) * 1.25)
    return total


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (tied weights counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def module_bytes(net: nn.Module) -> int:
    return tensor_bytes([*net.parameters(), *(b for b in net.buffers() if b is not None)])
