"""EngineArgs: the one table of engine settings. Each field's flag, help and default are written
once here; the CLI flags, the `surge.toml` keys of a model repository and `LLM(**kwargs)` are all
made from and checked against it, and create_engine_config() turns it into an EngineConfig.

A new setting is one field here, one field in the config dataclass it belongs to
(surge/config.py, filled in create_engine_config below) and the code that reads it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from surge.config import (
    EXECUTOR_BACKENDS,
    KV_CACHE_DTYPES,
    QUANTIZATIONS,
    SCHEDULING_POLICIES,
    AutoscalingConfig,
    CacheConfig,
    CompilationConfig,
    DeviceConfig,
    EngineConfig,
    LoadConfig,
    ParallelConfig,
    QuantConfig,
    SELF_DRAFTS,
    DraftModelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from surge.errors import InvalidArgumentError, SurgeError

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


# kinds of settings: how a value is read from a flag and checked wherever it comes from
STR, OPT_STR, INT, OPT_INT, COUNT, FRACTION, SIZE, BOOL = ("str", "str?", "int", "int?", "count", "fraction",
                                                            "size", "bool")
POSITIVE = "positive"  # a number above 0 (seconds, a rate)
SPECULATIVE = "speculative"  # a SpeculativeConfig: a JSON object (flag), a table (surge.toml) or a dict


def parse_speculative(value: Any, what: str) -> SpeculativeConfig | None:
    """vLLM's speculative config from a JSON string, a mapping or a SpeculativeConfig."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError(f"{what}: not JSON ({exc}); example: "
                                       '\'{"method": "ngram", "num_speculative_tokens": 4}\'') from exc
    if not isinstance(value, Mapping):
        raise InvalidArgumentError(f"{what} must be a JSON object, got {value!r}")
    known = {f.name for f in dataclasses.fields(SpeculativeConfig)}
    unknown = sorted(str(k) for k in value if k not in known)
    if unknown:
        raise InvalidArgumentError(f"{what}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
    return SpeculativeConfig(**value)


def setting(default: Any, help: str, kind: str, *, flags: tuple[str, ...] = (), choices: Iterable[str] = (),
            metavar: str | None = None, toml: bool = True, serve_only: bool = False) -> Any:
    """A field of EngineArgs with what its flag needs. flags: the CLI spellings (default
    --the-field-name; a boolean that defaults to true is switched off by its one flag);
    toml: settable per model in surge.toml; serve_only: a flag of `surge serve` alone."""
    return field(default=default, metadata=dict(help=help, kind=kind, flags=flags, choices=tuple(choices),
                                                metavar=metavar, toml=toml, serve_only=serve_only))


@dataclass(frozen=True)
class EngineArgs:
    """How to load and run one model: every engine setting, checked when made."""

    model: str | None = setting(
        None, "a .gguf file, a Hugging Face directory, a packaged model name (README) or hub id (default: the "
        "embedded SmolLM2-135M-Instruct "
        "Q4_1)", OPT_STR, flags=("--model", "-m"), toml=False)
    dtype: str = setting("auto", "auto | float32 | bfloat16 | float16 (default: auto)", STR)
    device: str | None = setting(None, "cpu or cuda (default: cuda when available)", OPT_STR)
    threads: int | None = setting(None, "CPU threads (default: PyTorch's choice; with tensor parallelism, per rank: "
                                        "the machine's cores split between the ranks)", OPT_INT, toml=False)
    quantization: str = setting(
        "auto", "auto: a GGUF's Q4/Q8 weights run as int4/int8; int8/int4: quantize a float model", STR,
        flags=("--quantization", "-q"), choices=QUANTIZATIONS)
    group_size: int = setting(32, "int4 group size (32, 64 or 128)", COUNT)
    kv_cache_memory: int | None = setting(
        None, "KV cache size: bytes or 512MiB, 2GiB ... (default: min(2 GiB, half the free memory) on CPU)",
        SIZE, metavar="SIZE")
    kv_cache_fraction: float = setting(
        0.5, "without --kv-cache-memory: this fraction of free memory (capped at 2 GiB on CPU)", FRACTION,
        metavar="F")
    kv_cache_dtype: str = setting(
        "auto", "auto: the model's dtype; int8: quantized per token and head, ~1.9x the tokens", STR,
        choices=KV_CACHE_DTYPES)
    block_size: int = setting(16, "tokens per KV-cache block", COUNT)
    max_num_seqs: int = setting(256, "sequences batched together at most", COUNT)
    max_num_batched_tokens: int = setting(
        8192, "tokens computed per step at most (longer prompts are prefilled in chunks)", COUNT)
    max_model_len: int | None = setting(
        None, "context length at most, prompt and output together, below the model's own (a shorter context "
        "bounds what one request may hold; default: the model's)", OPT_INT, metavar="N")
    long_prefill_token_threshold: int = setting(
        256, "while other requests decode, prefill a prompt at most N tokens a step, so their streams keep "
        "flowing (0: off; default: 256)", INT, metavar="N")
    enable_prefix_caching: bool = setting(True, "do not reuse KV blocks of shared prefixes", BOOL,
                                          flags=("--no-prefix-caching",))
    enable_chunked_prefill: bool = setting(True, "prefill each prompt in one step", BOOL,
                                           flags=("--no-chunked-prefill",))
    scheduling_policy: str = setting("fcfs", "fcfs: in arrival order; priority: lower priority values first",
                                     STR, choices=SCHEDULING_POLICIES)
    distributed_executor_backend: str = setting(
        "uni", "uni: the model runs in this process; mp: in a worker process of its own (a worker that dies "
        "or hangs is detected, the engine reports dead instead of hanging); ray (surge serve): each replica is a "
        "Ray actor placed on a Ray cluster (pip install \"surge[ray]\")", STR, choices=EXECUTOR_BACKENDS)
    ray_address: str | None = setting(
        None, "with --distributed-executor-backend ray: the Ray cluster to join, auto or HOST:PORT (default: "
        "start a local one)", OPT_STR, metavar="ADDRESS", serve_only=True)
    tensor_parallel_size: int = setting(
        1, "split the model over N processes (ranks joined by torch.distributed: gloo on CPU, NCCL on CUDA): "
        "each holds 1/N of the attention heads, MLP and vocabulary and its heads' KV cache; rank 0 runs in "
        "this process and samples", COUNT, flags=("--tensor-parallel-size", "-tp"), metavar="N")
    pipeline_parallel_size: int = setting(
        1, "split the model's layers into N contiguous stages, each in processes of its own (times "
        "--tensor-parallel-size ranks), the hidden states passed stage to stage; the first stage also holds "
        "the embedding and the LM head and samples", COUNT, flags=("--pipeline-parallel-size", "-pp"), metavar="N")
    enable_expert_parallel: bool = setting(
        False, "with -tp N on a mixture-of-experts model: each rank holds 1/N of the experts whole and runs "
        "them on the step's tokens (default: every expert split N ways, like the MLP)", BOOL)
    data_parallel_size: int = setting(
        1, "serve N replicas of the engine, each a process of its own with its scheduler, KV cache and "
        "--threads (default: the machine's cores split between them), behind the one endpoint; requests go "
        "where their prompt's prefix was sent, or to the least loaded", COUNT, flags=("--data-parallel-size", "-dp"),
        metavar="N", serve_only=True)
    min_replicas: int | None = setting(
        None, "autoscaling: replicas kept at least (default 1 when --max-replicas is given)", OPT_INT, metavar="N",
        serve_only=True)
    max_replicas: int | None = setting(
        None, "autoscaling on: replicas added while the ongoing requests per replica stay above "
        "--target-ongoing-requests, removed (after draining) when they stay below, between --min-replicas and "
        "this (default: off, a fixed --data-parallel-size)", OPT_INT, metavar="N", serve_only=True)
    target_ongoing_requests: float = setting(
        8.0, "autoscaling: ongoing (running and waiting) requests per replica aimed at", POSITIVE, metavar="N",
        serve_only=True)
    upscale_delay: float = setting(10.0, "autoscaling: seconds more replicas must be wanted before one is added",
                                   POSITIVE, metavar="S", serve_only=True)
    downscale_delay: float = setting(
        60.0, "autoscaling: seconds fewer replicas must be wanted before one is drained and removed", POSITIVE,
        metavar="S", serve_only=True)
    replica_health_timeout: float = setting(
        10.0, "a data-parallel replica that sends no heartbeat (one a second) for this many seconds is killed "
        "and restarted", POSITIVE, metavar="S", serve_only=True)
    compile: bool = setting(False, "run the forward under torch.compile (first use of each shape class "
                                   "compiles; cached on disk under ~/.cache/surge/inductor)", BOOL)
    native_decode: bool = setting(
        True, "decode every step through the model's layers in PyTorch, not the native decoder stack (one "
        "native call per decode step where the CPU and the model's formats allow it)", BOOL,
        flags=("--no-native-decode",))
    speculative_config: SpeculativeConfig | None = setting(
        None, "speculative decoding, vLLM's JSON: {\"method\": \"ngram\", \"num_speculative_tokens\": 4, "
        "\"prompt_lookup_min\": 2, \"prompt_lookup_max\": 4} proposes each request's next tokens from its own "
        "context and verifies them in one forward pass (default: off)", SPECULATIVE, metavar="JSON")
    warmup: bool = setting(True, "serve without first running each decode batch size and some prefill shapes",
                           BOOL, flags=("--no-warmup",), serve_only=True)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = _check(f.name, getattr(self, f.name), f.metadata)
            object.__setattr__(self, f.name, value)

    # ---- where settings come from -------------------------------------------------------

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any], source: str = "LLM()") -> "EngineArgs":
        """From keyword arguments (LLM(**kwargs)); an unknown name is an error listing the known ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise InvalidArgumentError(f"{source}: unknown setting {unknown[0]!r}; known settings: "
                                       f"{', '.join(sorted(names))}")
        return cls(**kwargs)

    def updated(self, mapping: Mapping[str, Any], source: str) -> "EngineArgs":
        """A copy with `mapping`'s settings (from a config file named `source`), each checked."""
        settable = {f.name for f in dataclasses.fields(self) if f.metadata["toml"]}
        for key in mapping:
            if key not in settable:
                raise InvalidArgumentError(
                    f"{source}: unknown setting {key!r}; known settings: {', '.join(sorted(settable))}")
        try:
            return dataclasses.replace(self, **mapping)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"{source}: {exc}") from exc

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, serve: bool = False) -> None:
        """One flag per field (serve-only ones only when `serve`)."""
        for f in dataclasses.fields(EngineArgs):
            meta = f.metadata
            if meta["serve_only"] and not serve:
                continue
            flags = meta["flags"] or ("--" + f.name.replace("_", "-"),)
            options: dict[str, Any] = dict(dest=f.name, help=meta["help"], default=f.default)
            if meta["kind"] == BOOL:
                options["action"] = "store_false" if f.default else "store_true"
            else:
                options["type"] = _flag_parser(flags[0], meta["kind"])
                if meta["choices"]:
                    options["choices"] = list(meta["choices"])
                if meta["metavar"]:
                    options["metavar"] = meta["metavar"]
            parser.add_argument(*flags, **options)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})

    # ---- the configuration --------------------------------------------------------------

    def create_engine_config(self) -> EngineConfig:
        """Resolve the model (a bad path fails here), read its architecture, decide device and
        dtype, and compose the configuration every component is built from."""
        from surge.loader import effective_quantization, read_model_config, resolve_model
        from surge.platform import default_device, resolve_dtype

        device = self.device or default_device()
        quantization = effective_quantization(self.quantization, device)
        source = resolve_model(self.model)
        model = read_model_config(source)
        max_model_len = model.max_position_embeddings
        if self.max_model_len is not None:
            if self.max_model_len > max_model_len:
                raise InvalidArgumentError(
                    f"max_model_len {self.max_model_len} is longer than the context of {source.name} "
                    f"({max_model_len} tokens); choose at most {max_model_len}")
            max_model_len = self.max_model_len
        dtype = resolve_dtype(self.dtype, device, model.checkpoint_dtype)
        self._check_tensor_parallel(model, device)
        return EngineConfig(
            model=model,
            cache=CacheConfig(self.block_size, self.kv_cache_memory, self.kv_cache_fraction, self.kv_cache_dtype,
                              self.enable_prefix_caching),
            scheduler=SchedulerConfig(
                self.max_num_seqs, self.max_num_batched_tokens, max_model_len, self.enable_chunked_prefill,
                self.long_prefill_token_threshold, self.scheduling_policy, model.attention_parity_tokens),
            parallel=ParallelConfig(tensor_parallel_size=self.tensor_parallel_size,
                                    pipeline_parallel_size=self.pipeline_parallel_size,
                                    enable_expert_parallel=self.enable_expert_parallel,
                                    data_parallel_size=self.data_parallel_size,
                                    distributed_executor_backend=self.distributed_executor_backend,
                                    autoscaling=self._autoscaling(), ray_address=self.ray_address,
                                    replica_health_timeout=self.replica_health_timeout),
            load=LoadConfig(source.path, source.kind, source.name, dtype),
            quant=QuantConfig(quantization, self.group_size),
            device=DeviceConfig(device, self.threads),
            compilation=CompilationConfig(self.compile, self.warmup, self.native_decode),
            speculative=self.speculative_config,
            draft=self._draft_config(source, device, dtype),
        )

    def _check_tensor_parallel(self, model: Any, device: str) -> None:
        """Sizes that cannot work, refused before any process starts: the model's heads, KV heads,
        MLP width, experts or vocabulary not split by the tensor-parallel size, more stages than
        layers, more ranks than the devices or than two a CPU core, and what the ranks do not
        run yet (compilation, a draft model)."""
        size, stages = self.tensor_parallel_size, self.pipeline_parallel_size
        world = size * stages
        if world == 1:
            return
        import os

        from surge.loader import check_pipeline_parallel, check_tensor_parallel

        check_tensor_parallel(model, size, self.enable_expert_parallel)
        check_pipeline_parallel(model, stages)
        if size > 1 and self.quantization == "int4":  # groups are cut from each rank's columns of o_proj and down_proj
            for what, cols in (("o_proj", model.num_attention_heads * model.head_dim),
                               ("down_proj", model.intermediate_size)):
                if (cols // size) % self.group_size:
                    raise InvalidArgumentError(
                        f"tensor_parallel_size {size}: {what}'s {cols} input columns give {cols // size} a rank, "
                        f"which int4 groups of {self.group_size} would cut; choose a group size dividing "
                        f"{cols // size}")
        ranks = (f"tensor_parallel_size {size} x pipeline_parallel_size {stages} = {world} ranks" if stages > 1
                 else f"tensor_parallel_size {size}")
        if device.startswith("cuda"):
            import torch

            if world > torch.cuda.device_count():
                raise InvalidArgumentError(f"{ranks} is above the {torch.cuda.device_count()} CUDA devices of this "
                                           "machine")
        elif world > 2 * (os.cpu_count() or 1):
            raise InvalidArgumentError(f"{ranks} is above twice this machine's {os.cpu_count()} CPU cores; ranks "
                                       "would only wait on each other")
        if self.compile:
            raise InvalidArgumentError("--compile with tensor or pipeline parallelism is not supported yet")
        spec = self.speculative_config
        if spec is not None and spec.method == "draft":
            raise InvalidArgumentError("a draft model with tensor or pipeline parallelism is not supported yet "
                                       "(the ngram method is)")

    def _autoscaling(self) -> AutoscalingConfig | None:
        if self.max_replicas is None:
            if self.min_replicas is not None:
                raise InvalidArgumentError("min_replicas needs max_replicas (autoscaling)")
            return None
        return AutoscalingConfig(self.min_replicas or 1, self.max_replicas, self.target_ongoing_requests,
                                 self.upscale_delay, self.downscale_delay)

    def _draft_config(self, target: Any, device: str, dtype: str) -> DraftModelConfig | None:
        """The draft model of method "draft", resolved as the target is (a bad path fails here,
        naming the draft), or the target itself quantized ("self-int4" / "self-int8"); it runs
        in the target's dtype."""
        from surge.loader import effective_quantization, read_model_config, resolve_model

        spec = self.speculative_config
        if spec is None or spec.method != "draft":
            return None
        assert spec.model is not None
        if spec.model in SELF_DRAFTS:
            source, quantization = target, effective_quantization(SELF_DRAFTS[spec.model], device)
        else:
            try:
                source = resolve_model(spec.model)
            except SurgeError as exc:
                raise InvalidArgumentError(f"speculative_config: draft model {spec.model!r}: {exc}") from exc
            quantization = effective_quantization("auto", device)
        try:
            model = read_model_config(source)
        except SurgeError as exc:
            raise InvalidArgumentError(f"speculative_config: draft model {spec.model!r}: {exc}") from exc
        return DraftModelConfig(model, LoadConfig(source.path, source.kind, spec.model, dtype),
                                QuantConfig(quantization, self.group_size))


def _check(name: str, value: Any, meta: Mapping[str, Any]) -> Any:
    """The value as the setting holds it, or an error naming the setting."""
    kind = meta["kind"]
    if kind == BOOL:
        if not isinstance(value, bool):
            raise InvalidArgumentError(f"{name} must be true or false, got {value!r}")
        return value
    if kind == SPECULATIVE:
        return parse_speculative(value, name)
    if value is None and kind in (OPT_STR, OPT_INT, SIZE):
        return None
    if kind == SIZE:
        return parse_bytes(value, name)
    if kind in (STR, OPT_STR):
        if not isinstance(value, str):
            raise InvalidArgumentError(f"{name} must be a string, got {value!r}")
        if meta["choices"] and value not in meta["choices"]:
            raise InvalidArgumentError(f"{name} must be one of {', '.join(meta['choices'])}, got {value!r}")
        return value
    if kind == FRACTION:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise InvalidArgumentError(f"{name} must be a number in (0, 1], got {value!r}")
        return float(value)
    if kind == POSITIVE:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise InvalidArgumentError(f"{name} must be a number above 0, got {value!r}")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"{name} must be {'an integer' if kind == INT else 'a positive integer'}, "
                                   f"got {value!r}")
    if kind == INT and value < 0:
        raise InvalidArgumentError(f"{name} must be 0 or positive, got {value}")
    if kind in (COUNT, OPT_INT) and value <= 0:
        raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")
    return value


def _flag_parser(flag: str, kind: str) -> Callable[[str], Any]:
    """How argparse reads the flag; a bad value is a usage error naming the flag."""
    def parse(text: str) -> Any:
        try:
            if kind == SIZE:
                return parse_bytes(text, flag)
            if kind in (INT, OPT_INT, COUNT):
                return int(text)
            if kind in (FRACTION, POSITIVE):
                return float(text)
            if kind == SPECULATIVE:
                return parse_speculative(text, flag)
            return text
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{flag}: cannot read {text!r} ({exc})") from exc
        except InvalidArgumentError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return parse
