"""EngineArgs: every per-model engine setting in one place, from CLI flags or a config file.

The CLI builds one from its flags; a model repository overrides it per model and per version
from `surge.toml` files, so the same names (the flags with underscores) work in both.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from surge.errors import InvalidArgumentError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "ki": 1 << 10, "kib": 1 << 10, "mi": 1 << 20, "mib": 1 << 20,
          "gi": 1 << 30, "gib": 1 << 30, "ti": 1 << 40, "tib": 1 << 40}


def parse_bytes(value: str | int, what: str) -> int:
    """"256MiB", "2G", "1.5GiB" or a plain integer, as bytes."""
    if isinstance(value, bool):
        raise InvalidArgumentError(f"{what}: expected a size in bytes, got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise InvalidArgumentError(f"{what} must be positive, got {value}")
        return value
    match = _SIZE.match(str(value))
    if match is None or (match.group(2) or "").lower() not in _UNITS:
        raise InvalidArgumentError(f"{what}: cannot read {value!r} as a size (examples: 512MiB, 2GiB, 1000000)")
    size = int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])
    if size <= 0:
        raise InvalidArgumentError(f"{what} must be positive, got {value!r}")
    return size


@dataclass(frozen=True)
class EngineArgs:
    """How to load and run one model (the model and process-wide settings like threads aside)."""

    dtype: str = "auto"
    device: str | None = None
    quantization: str = "auto"
    group_size: int = 32
    kv_cache_memory: int | None = None  # bytes; None: a fraction of free memory
    kv_cache_fraction: float = 0.5
    kv_cache_dtype: str = "auto"
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 256  # prompt tokens a step while others decode; 0: off
    scheduling_policy: str = "fcfs"
    warmup: bool = True  # run every decode bucket and some prefill shapes before serving
    compile: bool = False  # the forward under torch.compile (Inductor)

    def llm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `LLM(...)`."""
        return dict(
            dtype=self.dtype, device=self.device, kv_cache_memory=self.kv_cache_memory,
            kv_cache_memory_fraction=self.kv_cache_fraction, block_size=self.block_size,
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            enable_prefix_caching=self.enable_prefix_caching, enable_chunked_prefill=self.enable_chunked_prefill,
            long_prefill_token_threshold=self.long_prefill_token_threshold,
            scheduling_policy=self.scheduling_policy, quantization=self.quantization,
            quantization_group_size=self.group_size, compile=self.compile, kv_cache_dtype=self.kv_cache_dtype,
        )

    def updated(self, mapping: dict[str, Any], source: str) -> "EngineArgs":
        """A copy with `mapping`'s settings (from a config file named `source`), each checked."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        changes: dict[str, Any] = {}
        for key, value in mapping.items():
            if key not in fields:
                raise InvalidArgumentError(
                    f"{source}: unknown setting {key!r}; known settings: {', '.join(sorted(fields))}")
            changes[key] = _coerce(key, value, getattr(self, key), source)
        return dataclasses.replace(self, **changes)


_OPTIONAL_STR = {"device"}


def _coerce(key: str, value: Any, current: Any, source: str) -> Any:
    what = f"{source}: {key}"
    if key == "kv_cache_memory":
        return None if value is None else parse_bytes(value, what)
    if key in _OPTIONAL_STR:
        if value is None or isinstance(value, str):
            return value
        raise InvalidArgumentError(f"{what} must be a string, got {value!r}")
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise InvalidArgumentError(f"{what} must be true or false, got {value!r}")
        return value
    if isinstance(current, int):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InvalidArgumentError(f"{what} must be a positive integer, got {value!r}")
        return value
    if isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise InvalidArgumentError(f"{what} must be a number in (0, 1], got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{what} must be a string, got {value!r}")
    return value
