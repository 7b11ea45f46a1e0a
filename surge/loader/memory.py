"""Memory accounting for loaded models: an estimate before the weights exist, a measurement
after, and a budget that refuses a load that would not fit instead of running out of memory."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from torch import nn

from surge.errors import SurgeError

MiB = 1 << 20


class MemoryBudgetError(SurgeError):
    """A model load refused because it would not fit the memory budget."""


def estimate_weight_bytes(net: nn.Module, dtype: torch.dtype, quantization: str) -> int:
    """Upper bound of the weights' bytes once loaded, from a model built on the meta device.

    A quantized linear keeps its packed weight (int8: 1 byte, int4: 1/2 byte per weight, plus
    scales) beside the dense copy it uses for large batches, hence the extra 1.25 bytes.
    """
    element = torch.tensor([], dtype=dtype).element_size()
    total = sum(p.numel() for p in net.parameters()) * element
    if quantization != "none":
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


@dataclass
class MemoryBudget:
    """Bytes set aside for models, by owner; thread-safe."""

    total: int
    _held: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def reserve(self, owner: str, nbytes: int, what: str) -> None:
        """Set `nbytes` aside for `owner` (replacing what it held), or refuse with the numbers."""
        with self._lock:
            others = {k: v for k, v in self._held.items() if k != owner}
            in_use = sum(others.values())
            if in_use + nbytes > self.total:
                holders = ", ".join(f"{k} {v / MiB:.0f} MiB" for k, v in sorted(others.items())) or "nothing"
                raise MemoryBudgetError(
                    f"not enough memory to load {owner}: it needs about {nbytes / MiB:.0f} MiB ({what}), "
                    f"the memory budget is {self.total / MiB:.0f} MiB and {in_use / MiB:.0f} MiB of it is "
                    f"in use ({holders}); unload a model, lower its KV cache, or raise --memory-budget"
                )
            self._held[owner] = nbytes

    def settle(self, owner: str, nbytes: int) -> None:
        """Replace `owner`'s estimate by what it measured once loaded (no check: it is loaded)."""
        with self._lock:
            self._held[owner] = nbytes

    def release(self, owner: str) -> None:
        with self._lock:
            self._held.pop(owner, None)

    def holdings(self) -> dict[str, int]:
        with self._lock:
            return dict(self._held)
