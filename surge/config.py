"""Configuration dataclasses, passed down explicitly from the entry points to every layer.

Kept free of torch: dtypes are names ("float32", "bfloat16", "float16") resolved where torch
is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from surge.errors import InvalidArgumentError

DTYPE_ALIASES = {
    "auto": "auto",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


def normalize_dtype(name: str) -> str:
    """Canonical dtype name, or a clear error listing the choices."""
    canonical = DTYPE_ALIASES.get(str(name).lower())
    if canonical is None:
        raise InvalidArgumentError(
            f"unknown dtype {name!r}: choose one of auto, float32, bfloat16, float16"
        )
    return canonical


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; `rope_type` is one of default, linear, dynamic, llama3, yarn."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    partial_rotary_factor: float = 1.0

    SUPPORTED = ("default", "linear", "llama3", "yarn")

    @classmethod
    def from_hf(cls, params: dict[str, Any] | None, theta: float) -> "RopeConfig":
        """From a transformers `rope_parameters` (v5) or `rope_scaling` (v4) dict."""
        params = dict(params or {})
        rope_type = params.get("rope_type") or params.get("type") or "default"
        theta = float(params.get("rope_theta", theta))
        if rope_type not in cls.SUPPORTED:
            raise InvalidArgumentError(
                f"unsupported RoPE scaling type {rope_type!r}; surge supports {', '.join(cls.SUPPORTED)}"
            )
        known = {f for f in cls.__dataclass_fields__ if f not in ("theta", "rope_type")}
        kwargs = {k: v for k, v in params.items() if k in known and v is not None}
        return cls(theta=theta, rope_type=rope_type, **kwargs)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and hyperparameters of a Llama-family decoder, whatever the checkpoint format."""

    architecture: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int = 0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    rope: RopeConfig = field(default_factory=RopeConfig)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # dtype the weights are stored in, as a name ("float32", ...); "auto" resolution uses it.
    checkpoint_dtype: str = "float32"

    @property
    def attention_parity_tokens(self) -> int:
        """The context length at which one token's attention (QK and PV over the context) costs
        as many flops as its linear layers: beyond it, prefill chunks cost more per token."""
        h, d = self.hidden_size, self.head_dim
        linear = h * self.num_attention_heads * d * 2 + 2 * h * self.num_key_value_heads * d \
            + 3 * h * self.intermediate_size
        return max(1, linear // (2 * self.num_attention_heads * d))

    def __post_init__(self) -> None:
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise InvalidArgumentError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim


KV_CACHE_DTYPES = ("auto", "int8")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: block size in tokens and the memory budget it is sized from."""

    block_size: int = 16
    # Bytes for the KV cache; None means a fraction of the memory free at start.
    kv_cache_memory: int | None = None
    memory_fraction: float = 0.5
    # "auto": the model's dtype; "int8": rows quantized per token and head (surge/layers/attention.py)
    cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.cache_dtype not in KV_CACHE_DTYPES:
            raise InvalidArgumentError(
                f"unknown KV cache dtype {self.cache_dtype!r}: choose one of {', '.join(KV_CACHE_DTYPES)}")
        if self.block_size <= 0:
            raise InvalidArgumentError(f"block_size must be positive, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise InvalidArgumentError(
                f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory}"
            )
        if not 0.0 < self.memory_fraction <= 1.0:
            raise InvalidArgumentError(
                f"memory_fraction must be in (0, 1], got {self.memory_fraction}"
            )
