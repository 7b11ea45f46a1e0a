"""The model contract: what a causal LM gives the rest of surge.

    forward(input_ids [T], positions [T]) -> hidden [T, H]
        flat tokens of every scheduled sequence; attention layers read their KV cache and the
        step's metadata from the forward context (surge/layers/attention_layer.py), so the
        same call runs eager and under torch.compile
    compute_logits(hidden [N, H]) -> float logits [N, V]
    packed_modules     checkpoint name part -> (fused module name part, shard index): q/k/v
                       load into one qkv_proj, gate/up into one gate_up_proj
    expert_weights     checkpoint names of experts' matrices (one expert's, or all stacked) ->
                       the stacked [E, rows, K] parameter and shard they load into
    shard_sizes(name)  row counts of the checkpoint tensors stacked in a fused parameter
    weight_loaders()   checkpoint names loaded by a function instead of copied into a parameter
    gguf_names         GGUF tensor names -> checkpoint names, and whether llama.cpp permuted Q/K
    hf_names           a family's checkpoint names -> the model's, and which are stored [in, out]
    attention_specs(config)  per layer: heads, head size, sliding window, RoPE parameters
    embedding / output_head  module names (tied weights; quantization keeps the head in int8 groups)
    tp_plan            parameter-name patterns -> how tensor parallelism splits them (the STYLES of
                       surge/distributed/tensor_parallel.py); None: the family runs in one
                       process only (no tensor or pipeline split)
    decoder_plan()     the decoder's layers as plain parts (norms, linears, attention, MLP) for the
                       native decode step (surge/layers/native_decoder.py), or None where the
                       model's layers are not of those parts (experts): it then decodes eagerly

Weights load generically from this (surge/loader/weight_loading.py); quantization is applied from
outside by replacing linears (surge/layers/quantization/apply.py); the architecture registry
(surge/models/registry.py) maps config names to classes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from surge.config import ModelConfig, RopeConfig


@dataclass(frozen=True)
class AttentionSpec:
    """One layer's attention: what its module, its RoPE and its KV cache need."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None
    rope: RopeConfig
    scale: float  # of the attention scores


def attention_specs(config: ModelConfig) -> list[AttentionSpec]:
    """Per layer: "sliding_attention" layers get the window (and the local RoPE where the model
    has one), "full_attention" layers none."""
    specs = []
    scale = (config.query_pre_attn_scalar or config.head_dim) ** -0.5
    for layer in range(config.num_hidden_layers):
        sliding = config.layer_type(layer) == "sliding_attention"
        rope = config.local_rope if sliding and config.local_rope is not None else config.rope
        specs.append(AttentionSpec(config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                                   config.sliding_window if sliding else None, rope, scale))
    return specs


@dataclass(frozen=True)
class LayerPlan:
    """One pre-norm decoder layer as its parts, in the order they run:

        h = attn_norm(x + r) ; a = o(attention(rope(q_norm(q)), rope(k_norm(k)), v)) of qkv(h)
        a = attn_out_norm(a) if any ; r' = x + r + a ; h = mlp_norm(r')
        y = down(act(gate) * up) of up(h) when gated (gate | up in one output), else down(act(up(h)))
        y = mlp_out_norm(y) if any ; the next layer gets (y, r')

    Norms are the modules of surge/layers/norm.py; linears any of the model's (the native step
    takes those with a native kernel); `rope` indexes DecoderPlan.rotaries, None: no RoPE."""

    attn_norm: nn.Module
    qkv: nn.Module
    o: nn.Module
    attn_out_norm: nn.Module | None
    mlp_norm: nn.Module
    up: nn.Module
    down: nn.Module
    mlp_out_norm: nn.Module | None
    activation: str
    gated: bool
    spec: AttentionSpec
    rope: int | None
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None


@dataclass(frozen=True)
class DecoderPlan:
    """A decoder as plain parts: `embed(ids, positions)` -> the first layer's input, the layers,
    the final norm (whose output compute_logits takes), and the RoPE tables the layers index."""

    embed: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    layers: list[LayerPlan]
    norm: nn.Module
    rotaries: list  # surge.layers.rotary.RotaryEmbedding


_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


@dataclass(frozen=True)
class GgufNames:
    """GGUF tensor names -> checkpoint (Hugging Face) names.

    `globals` maps whole names (token_embd.weight), `blocks` the part of blk.N.<part>.weight;
    `permuted_qk`: llama.cpp's converter permuted Q/K rows for ggml's RoPE (Llama, Mistral);
    `norm_offset`: it stored every norm weight plus this (Gemma's 1 + w), which loading subtracts."""

    globals: dict[str, str] = field(default_factory=dict)
    blocks: dict[str, str] = field(default_factory=dict)
    permuted_qk: bool = False
    norm_offset: float = 0.0

    def hf_name(self, name: str) -> str | None:
        """The checkpoint name of a GGUF tensor, or None for tensors the model does not use."""
        if name in self.globals:
            return self.globals[name]
        match = _BLOCK_RE.match(name)
        if match and match.group(2) in self.blocks:
            layer, part, kind = match.groups()
            return f"model.layers.{layer}.{self.blocks[part]}.{kind}"
        return None


@dataclass(frozen=True)
class HfNames:
    """A family's own checkpoint names -> the model's, where they differ (GPT-2's
    transformer.h.N.attn.c_attn -> model.layers.N.self_attn.qkv_proj): `renames` are regex
    substitutions applied in order; `transposed` matches the checkpoint names of matrices stored
    [in, out] (GPT-2's Conv1D), which load transposed."""

    renames: tuple[tuple[str, str], ...] = ()
    transposed: str | None = None

    def model_name(self, name: str) -> tuple[str, bool]:
        """(the model's name for checkpoint tensor `name`, whether it is stored transposed)."""
        transposed = self.transposed is not None and re.search(self.transposed, name) is not None
        for pattern, replacement in self.renames:
            name = re.sub(pattern, replacement, name)
        return name, transposed


@dataclass(frozen=True)
class ExpertWeights:
    """Where experts' matrices load: `pattern` matches the end of a checkpoint name, and its
    group "e", where it has one, is the expert's index (a single expert's matrix); without it
    the tensor holds every expert, stacked (GGUF's ffn_*_exps). The match is replaced by
    `parameter`, the stacked [E, rows, K] parameter, whose rows `shard` it fills."""

    pattern: str
    parameter: str
    shard: int = 0

    def target(self, name: str) -> tuple[str, int | None] | None:
        """(parameter name, expert index or None for all) of checkpoint tensor `name`, if it matches."""
        match = re.search(self.pattern, name)
        if match is None:
            return None
        expert = match.groupdict().get("e")
        return name[: match.start()] + self.parameter, int(expert) if expert is not None else None


def gated_expert_weights(module: str, gate: str, up: str, down: str) -> tuple[ExpertWeights, ...]:
    """The names of gated experts under `module` (block_sparse_moe, mlp): one expert's
    `module.experts.{e}.<gate|up|down>.weight` and the stacked `mlp.experts.<gate|up|down>_proj.weight`
    that GGUF files give, into `mlp.experts.gate_up_proj` / `down_proj`."""
    fused, down_param = ".mlp.experts.gate_up_proj", ".mlp.experts.down_proj"
    single = rf"\.{module}\.experts\.(?P<e>\d+)\."
    return (
        ExpertWeights(single + rf"{gate}\.weight$", fused, 0),
        ExpertWeights(single + rf"{up}\.weight$", fused, 1),
        ExpertWeights(single + rf"{down}\.weight$", down_param, 0),
        ExpertWeights(r"\.mlp\.experts\.gate_proj\.weight$", fused, 0),
        ExpertWeights(r"\.mlp\.experts\.up_proj\.weight$", fused, 1),
        ExpertWeights(r"\.mlp\.experts\.down_proj\.weight$", down_param, 0),
    )


class MissingLayer(nn.Module):
    """Where a module of another pipeline stage sits: it keeps the layer's index (and so the
    names of the layers after it) and holds nothing."""

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        raise RuntimeError("this module is held by another pipeline stage")


def stage_module(held: bool, build: Callable[[], nn.Module]) -> nn.Module:
    """build() where this process holds the module, else a MissingLayer."""
    return build() if held else MissingLayer()


class CausalLM(nn.Module):
    """Base of surge's decoder-only models; subclasses fill in the contract above."""

    packed_modules: ClassVar[dict[str, tuple[str, int]]] = {}
    expert_weights: ClassVar[tuple[ExpertWeights, ...]] = ()
    gguf_names: ClassVar[GgufNames] = GgufNames()
    hf_names: ClassVar[HfNames] = HfNames()
    embedding: ClassVar[str] = "model.embed_tokens"
    output_head: ClassVar[str] = "lm_head"
    tp_plan: ClassVar[tuple[tuple[str, str], ...] | None] = None

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.get_submodule(self.output_head)(hidden).float()

    def shard_sizes(self, name: str) -> list[int]:
        """Rows of each checkpoint tensor stacked into fused parameter `name`; [] if not fused."""
        return []

    def weight_loaders(self) -> dict[str, Callable[[torch.Tensor], None]]:
        return {}

    def tie_weights(self) -> None:
        """Share the output head's weight with the embedding's when the config ties them."""
        head, embedding = self.get_submodule(self.output_head), self.get_submodule(self.embedding)
        if self.config.tie_word_embeddings and not isinstance(head, MissingLayer):
            head.weight = embedding.weight

    def prepare_compile(self, max_positions: int) -> None:
        """Build what a compiled forward must find ready (tables for every position)."""

    def decoder_plan(self) -> DecoderPlan | None:
        """The decoder as plain parts for the native decode step; None: decode eagerly."""
        return None

    @property
    def dtype(self) -> torch.dtype:
        embedding = self.get_submodule(self.embedding)
        if isinstance(embedding, MissingLayer):  # a later pipeline stage: its norms' dtype
            return next(p.dtype for p in self.parameters() if p.is_floating_point())
        weight = getattr(embedding, "weight", None)  # a table looked up from quantized rows has none
        return weight.dtype if weight is not None else embedding.dtype
