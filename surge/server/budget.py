"""The memory budget of a model repository: it refuses a load that would not fit instead of
running out of memory, from the engine's estimate before loading and its measurement after."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from surge.errors import SurgeError

MiB = 1 << 20


class MemoryBudgetError(SurgeError):
    """A model load refused because it would not fit the memory budget."""


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
