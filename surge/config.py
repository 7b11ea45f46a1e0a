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
    # longrope (Phi-3): per-frequency divisors for a context within / beyond the original one
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None

    SUPPORTED = ("default", "linear", "llama3", "yarn", "longrope")
    ALIASES = {"su": "longrope"}  # early Phi-3 configs

    @classmethod
    def from_hf(cls, params: dict[str, Any] | None, theta: float) -> "RopeConfig":
        """From a transformers `rope_parameters` (v5) or `rope_scaling` (v4) dict."""
        params = dict(params or {})
        rope_type = params.get("rope_type") or params.get("type") or "default"
        rope_type = cls.ALIASES.get(rope_type, rope_type)
        theta = float(params.get("rope_theta", theta))
        if rope_type not in cls.SUPPORTED:
            raise InvalidArgumentError(
                f"unsupported RoPE scaling type {rope_type!r}; surge supports {', '.join(cls.SUPPORTED)}"
            )
        known = {f for f in cls.__dataclass_fields__ if f not in ("theta", "rope_type")}
        kwargs = {k: tuple(float(f) for f in v) if k in ("short_factor", "long_factor") else v
                  for k, v in params.items() if k in known and v is not None}
        if rope_type == "longrope" and not (kwargs.get("short_factor") and kwargs.get("long_factor")):
            raise InvalidArgumentError("longrope RoPE scaling needs short_factor and long_factor")
        return cls(theta=theta, rope_type=rope_type, **kwargs)

    def check_dims(self, head_dim: int) -> None:
        """longrope's factors: one per rotated frequency."""
        half = int(head_dim * self.partial_rotary_factor) // 2
        for name in ("short_factor", "long_factor"):
            factors = getattr(self, name)
            if factors is not None and len(factors) != half:
                raise InvalidArgumentError(f"RoPE {name} has {len(factors)} values; the rotated head dimension needs "
                                           f"{half} (one per frequency)")


LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and hyperparameters of a decoder, whatever the checkpoint format.

    Attention may differ per layer: `layer_types` lists "full_attention" / "sliding_attention"
    per layer (None: every layer sliding when `sliding_window` is set, else full), and sliding
    layers use `local_rope` where the model has one (surge.models.interfaces.attention_specs)."""

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
    layer_types: tuple[str, ...] | None = None
    local_rope: RopeConfig | None = None
    # RMSNorm of each head's q and k before RoPE (Qwen3, Gemma 3)
    qk_norm: bool = False
    # attention scores scaled by query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5 (Gemma)
    query_pre_attn_scalar: float | None = None
    # logits = cap * tanh(logits / cap) (Gemma 2/3 configs may set it)
    final_logit_softcapping: float | None = None
    # mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE): 0 experts = a dense MLP everywhere
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # of each expert (0: intermediate_size)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on expert, gated (0: none)
    norm_topk_prob: bool = False  # renormalise the chosen experts' probabilities to sum to 1
    # layers whose MLP is dense (Qwen's mlp_only_layers / decoder_sparse_step)
    dense_mlp_layers: tuple[int, ...] = ()
    # the experts this process holds, first..end-1 (expert parallelism: each rank its share); None: all
    expert_range: tuple[int, int] | None = None
    # the decoder layers this process holds, first..end-1 (a pipeline stage's); None: all. The
    # stage holding layer 0 also holds the embedding, the final norm and the LM head.
    layer_range: tuple[int, int] | None = None
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
            + 3 * h * self.active_intermediate_size
        return max(1, linear // (2 * self.num_attention_heads * d))

    def __post_init__(self) -> None:
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise InvalidArgumentError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.layer_types is not None:
            unknown = set(self.layer_types) - set(LAYER_TYPES)
            if unknown or len(self.layer_types) != self.num_hidden_layers:
                raise InvalidArgumentError(
                    f"layer_types must name one of {', '.join(LAYER_TYPES)} for each of the "
                    f"{self.num_hidden_layers} layers (got {list(self.layer_types)})"
                )
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise InvalidArgumentError("layer_types has sliding_attention layers but the config has no sliding_window")
        for rope in (self.rope, self.local_rope):
            if rope is not None:
                rope.check_dims(self.head_dim)
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise InvalidArgumentError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and num_experts ({self.num_experts})")
        if self.num_experts and not self.moe_intermediate_size:
            object.__setattr__(self, "moe_intermediate_size", self.intermediate_size)

    @property
    def active_intermediate_size(self) -> int:
        """The MLP width one token runs through: its experts' and the shared expert's, if any."""
        if not self.num_experts:
            return self.intermediate_size
        return self.num_experts_per_tok * self.moe_intermediate_size + self.shared_expert_intermediate_size

    def is_moe_layer(self, layer: int) -> bool:
        """Layer `layer` routes its tokens to experts (else its MLP is dense)."""
        return self.num_experts > 0 and layer not in self.dense_mlp_layers

    def layer_type(self, layer: int) -> str:
        if self.layer_types is not None:
            return self.layer_types[layer]
        return "sliding_attention" if self.sliding_window else "full_attention"

    @property
    def local_layers(self) -> range:
        """The decoder layers this process holds."""
        return range(*self.layer_range) if self.layer_range is not None else range(self.num_hidden_layers)

    @property
    def holds_ends(self) -> bool:
        """This process holds the embedding, final norm and LM head (the first pipeline stage)."""
        return self.layer_range is None or self.layer_range[0] == 0

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim


KV_CACHE_DTYPES = ("auto", "int8")
SCHEDULING_POLICIES = ("fcfs", "priority")
EXECUTOR_BACKENDS = ("uni", "mp", "ray")
QUANTIZATIONS = ("auto", "none", "int8", "int4")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: block size in tokens and the memory budget it is sized from."""

    block_size: int = 16
    # Bytes for the KV cache; None means a fraction of the memory free at start.
    kv_cache_memory: int | None = None
    memory_fraction: float = 0.5
    # "auto": the model's dtype; "int8": rows quantized per token and head (surge/layers/attention.py)
    cache_dtype: str = "auto"
    enable_prefix_caching: bool = True

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


@dataclass(frozen=True)
class SchedulerConfig:
    """How the scheduler hands out each step's token budget (surge/core/scheduler.py)."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 2048  # prompt + output tokens of one request at most
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 256  # prompt tokens a step while others decode; 0: off
    policy: str = "fcfs"
    # context length where a token's attention costs what its linears do (ModelConfig); 0: unknown
    attention_parity_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise InvalidArgumentError("max_num_seqs and max_num_batched_tokens must be positive")
        if self.max_model_len < 2:
            raise InvalidArgumentError(f"max_model_len must be at least 2 tokens, got {self.max_model_len}")
        if self.long_prefill_token_threshold < 0:
            raise InvalidArgumentError("long_prefill_token_threshold must be 0 (off) or positive")
        if self.policy not in SCHEDULING_POLICIES:
            raise InvalidArgumentError(
                f"unknown scheduling policy {self.policy!r}: choose one of {', '.join(SCHEDULING_POLICIES)}")


MAX_DATA_PARALLEL = 64


@dataclass(frozen=True)
class AutoscalingConfig:
    """Data-parallel replicas added and removed by load (core/autoscaler.py): the ongoing requests
    per replica are held near `target_ongoing_requests`, between `min_replicas` and
    `max_replicas`; a change is made once it has been wanted for its delay (seconds)."""

    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 8.0
    upscale_delay: float = 10.0
    downscale_delay: float = 60.0
    look_back: float = 5.0  # seconds of once-a-second samples averaged into the load

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas <= MAX_DATA_PARALLEL:
            raise InvalidArgumentError(
                f"replicas must satisfy 1 <= min_replicas <= max_replicas <= {MAX_DATA_PARALLEL}, got "
                f"min_replicas {self.min_replicas}, max_replicas {self.max_replicas}")
        for name in ("target_ongoing_requests", "upscale_delay", "downscale_delay", "look_back"):
            if not getattr(self, name) > 0:
                raise InvalidArgumentError(f"{name} must be above 0, got {getattr(self, name)!r}")


MAX_TENSOR_PARALLEL = 64


@dataclass(frozen=True)
class ParallelConfig:
    """How many workers run the model and where: the executor backend (the worker in this
    process or a spawned one), tensor-parallel ranks and pipeline stages (one model split over
    processes joined by torch.distributed: executor/distributed.py) and data-parallel replicas (whole engines, each a
    process of its own, behind one front: engine/data_parallel.py), their number fixed or
    autoscaled. Pipeline stages split the layers; a stage is a tensor-parallel group."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1  # with autoscaling: the replicas started with (within its bounds)
    distributed_executor_backend: str = "uni"
    autoscaling: AutoscalingConfig | None = None
    enable_expert_parallel: bool = False  # MoE experts split whole between the tensor-parallel ranks
    replica_health_timeout: float = 10.0  # seconds without a replica's heartbeat before it is restarted
    ray_address: str | None = None  # backend "ray": the cluster to join ("auto", HOST:PORT); None: start one

    def __post_init__(self) -> None:
        if self.distributed_executor_backend not in EXECUTOR_BACKENDS:
            raise InvalidArgumentError(
                f"unknown executor backend {self.distributed_executor_backend!r}: choose one of "
                f"{', '.join(EXECUTOR_BACKENDS)}")
        if not 1 <= self.tensor_parallel_size <= MAX_TENSOR_PARALLEL:
            raise InvalidArgumentError(f"tensor_parallel_size must be between 1 and {MAX_TENSOR_PARALLEL}, "
                                       f"got {self.tensor_parallel_size}")
        if not 1 <= self.pipeline_parallel_size <= MAX_TENSOR_PARALLEL:
            raise InvalidArgumentError(f"pipeline_parallel_size must be between 1 and {MAX_TENSOR_PARALLEL}, "
                                       f"got {self.pipeline_parallel_size}")
        if self.enable_expert_parallel and self.tensor_parallel_size == 1:
            raise InvalidArgumentError("enable_expert_parallel splits the experts between the tensor-parallel ranks: "
                                       "it needs tensor_parallel_size above 1")
        if self.world_size > 1 and self.distributed_executor_backend == "ray":
            raise InvalidArgumentError("tensor and pipeline parallel ranks run as local processes (the uni or mp "
                                       "backend); ranks placed by Ray are not built yet")
        if not 1 <= self.data_parallel_size <= MAX_DATA_PARALLEL:
            raise InvalidArgumentError(f"data_parallel_size must be between 1 and {MAX_DATA_PARALLEL}, "
                                       f"got {self.data_parallel_size}")
        scaling = self.autoscaling
        if scaling is not None and self.data_parallel_size > 1 and not (
                scaling.min_replicas <= self.data_parallel_size <= scaling.max_replicas):
            raise InvalidArgumentError(
                f"data_parallel_size {self.data_parallel_size} is outside the autoscaling bounds "
                f"{scaling.min_replicas}..{scaling.max_replicas}")
        if self.ray_address is not None and self.distributed_executor_backend != "ray":
            raise InvalidArgumentError("ray_address needs distributed_executor_backend ray")
        if not self.replica_health_timeout > 0:
            raise InvalidArgumentError(f"replica_health_timeout must be above 0, got {self.replica_health_timeout!r}")

    @property
    def initial_replicas(self) -> int:
        """Replicas started with: data_parallel_size, raised to the autoscaling minimum."""
        if self.autoscaling is None:
            return self.data_parallel_size
        return max(self.data_parallel_size, self.autoscaling.min_replicas)

    @property
    def replicated(self) -> bool:
        """More than one engine now or later, or engines placed by Ray: the data-parallel front serves."""
        return self.data_parallel_size > 1 or self.autoscaling is not None or self.distributed_executor_backend == "ray"

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class LoadConfig:
    """Which checkpoint, as resolved from what the user named, and the dtype it runs in."""

    path: str  # a .gguf file or a Hugging Face directory
    kind: str  # "gguf" or "hf"
    name: str  # what the server calls it by default
    dtype: str = "float32"  # resolved: float32, bfloat16 or float16


@dataclass(frozen=True)
class QuantConfig:
    """auto: a GGUF's Q4/Q8 weights stay 4/8-bit; none: everything dequantized; int8/int4: every linear."""

    method: str = "auto"
    group_size: int = 32

    def __post_init__(self) -> None:
        if self.method not in QUANTIZATIONS:
            raise InvalidArgumentError(
                f"unknown quantization {self.method!r}: choose one of {', '.join(QUANTIZATIONS)}")
        if self.group_size < 1:
            raise InvalidArgumentError(f"group_size must be positive, got {self.group_size}")


@dataclass(frozen=True)
class DeviceConfig:
    device: str = "cpu"
    threads: int | None = None  # CPU threads of the worker; None: PyTorch's choice

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise InvalidArgumentError(f"threads must be at least 1, got {self.threads}")


@dataclass(frozen=True)
class CompilationConfig:
    compile: bool = False  # the forward under torch.compile (Inductor)
    warmup: bool = True  # a server runs every decode bucket and some prefill shapes before serving
    native_decode: bool = True  # decode-only steps through the native decoder stack where it runs


SPECULATIVE_METHODS = ("ngram", "draft")
MAX_SPECULATIVE_TOKENS = 32  # proposals a step per request at most: past it a step verifies mostly misses


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (vLLM's --speculative-config keys): each step a decoding request's
    next tokens are proposed cheaply and verified in the target's own forward pass.

    ngram: the continuation of the latest match of the context's last n tokens (n from
    prompt_lookup_max down to prompt_lookup_min) in the request's own prompt and output.
    draft: a smaller model with the target's tokenizer (`model`: a path or name as --model
    takes it, or "self-int4" / "self-int8": the target itself quantized) runs ahead of the
    target, greedily, in its own paged KV cache."""

    method: str = "ngram"
    num_speculative_tokens: int = 4  # proposed tokens a step per request at most
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    model: str | None = None  # the draft model (method "draft")
    # method "draft": a proposal the draft gives less probability than this is not made, nor
    # any after it in the step (llama.cpp's --draft-p-min)
    draft_p_min: float = 0.5

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise InvalidArgumentError(f"speculative_config: unknown method {self.method!r}; choose one of "
                                       f"{', '.join(SPECULATIVE_METHODS)}")
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"speculative_config: {name} must be a positive integer, got {value!r}")
        if self.num_speculative_tokens > MAX_SPECULATIVE_TOKENS:
            raise InvalidArgumentError(
                f"speculative_config: num_speculative_tokens {self.num_speculative_tokens} is more than "
                f"{MAX_SPECULATIVE_TOKENS}; a step's proposals past a few tokens are almost never all accepted")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise InvalidArgumentError(
                f"speculative_config: prompt_lookup_min ({self.prompt_lookup_min}) is above prompt_lookup_max "
                f"({self.prompt_lookup_max})")
        if self.model is not None and self.method == "ngram":
            raise InvalidArgumentError("speculative_config: 'model' is a draft model's; method 'ngram' has none")
        if isinstance(self.draft_p_min, bool) or not isinstance(self.draft_p_min, (int, float)) \
                or not 0.0 <= self.draft_p_min <= 1.0:
            raise InvalidArgumentError(f"speculative_config: draft_p_min must be a probability in [0, 1], "
                                       f"got {self.draft_p_min!r}")
        if self.method == "draft" and (not isinstance(self.model, str) or not self.model.strip()):
            raise InvalidArgumentError(
                "speculative_config: method 'draft' needs 'model': a model with the target's tokenizer (a path or "
                f"name as --model takes it, or one of {', '.join(SELF_DRAFTS)}), got {self.model!r}")


SELF_DRAFTS = {"self-int4": "int4", "self-int8": "int8"}  # draft model names for the target quantized


@dataclass(frozen=True)
class DraftModelConfig:
    """The draft model of method "draft", resolved like the target: its checkpoint, its
    architecture and how its weights are quantized (its dtype is the target's)."""

    model: ModelConfig
    load: LoadConfig
    quant: QuantConfig


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine and its workers are built from; plain data, so a worker process
    receives it as it is. Made by EngineArgs.create_engine_config()."""

    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    load: LoadConfig
    quant: QuantConfig
    device: DeviceConfig
    compilation: CompilationConfig = field(default_factory=CompilationConfig)
    speculative: SpeculativeConfig | None = None  # None: no speculative decoding
    draft: DraftModelConfig | None = None  # speculative method "draft": the model that proposes
