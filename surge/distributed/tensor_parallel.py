"""Tensor parallelism: how a model is split between the ranks of one group, and the modules that
join the ranks' shares again.

    column-parallel  q/k/v (by heads; KV heads replicated where ranks outnumber them) and gate/up:
                     each rank holds rows, no communication
    row-parallel     o_proj and down_proj: each rank holds the input columns of its heads / its
                     part of the MLP, and the partial outputs are summed (one all-reduce each);
                     the bias is rank 0's alone
    vocab-parallel   the embedding (each rank looks up its own rows, the rest are zero, summed)
                     and the LM head (each rank's logits, gathered on rank 0)
    experts          each expert's rows split like the MLP, or (expert parallelism) whole experts
                     per rank, each running its own on the step's tokens; an MoE block's output
                     (with a shared expert's, split like the MLP) summed once

A model states its split in its contract (`tp_plan`: parameter-name patterns -> style). Weights are
cut as they are read, before any is packed or quantized, so a rank never holds more than its share;
a quantized matrix is cut between its blocks (int4/int8 groups, GGUF blocks and K-quant superblocks
of 256), and a split that would cut one is refused with the numbers. Each rank's model is the model
of a rank-local configuration (its heads, KV heads, MLP width and vocabulary rows), so its KV cache
holds its own heads only.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from surge.config import ModelConfig
from surge.distributed.comm import Communicator
from surge.errors import InvalidArgumentError
from surge.layers.quantization.formats import QUANTIZED_TYPES, block_values, cols_of, rows_of, split_rows, take_cols

STYLES = ("qkv", "column", "row", "row_bias", "row_in_block", "vocab", "experts_column", "experts_row")


@dataclass(frozen=True)
class TensorParallelLayout:
    """Which share of `config` rank `rank` of `size` holds."""

    config: ModelConfig
    rank: int
    size: int
    expert_parallel: bool = False  # MoE: whole experts per rank (else each expert split like the MLP)

    @property
    def expert_range(self) -> tuple[int, int]:
        """The experts this rank holds: its share under expert parallelism, else all."""
        experts = self.config.num_experts
        if not self.expert_parallel:
            return 0, experts
        per = experts // self.size
        return self.rank * per, (self.rank + 1) * per

    @property
    def heads(self) -> int:
        return self.config.num_attention_heads // self.size

    @property
    def kv_heads(self) -> int:
        """KV heads per rank: its share, or one replicated where ranks outnumber the KV heads."""
        return max(1, self.config.num_key_value_heads // self.size)

    @property
    def first_kv_head(self) -> int:
        kv = self.config.num_key_value_heads
        if kv >= self.size:
            return self.rank * self.kv_heads
        return self.rank // (self.size // kv)  # ranks sharing one KV head: those whose query heads use it

    @property
    def vocab_per_rank(self) -> int:
        return math.ceil(self.config.vocab_size / self.size)

    def vocab_range(self, rank: int | None = None) -> tuple[int, int]:
        """The vocabulary rows rank `rank` (default: this one) holds: equal shares, the last short."""
        r = self.rank if rank is None else rank
        per = self.vocab_per_rank
        return min(r * per, self.config.vocab_size), min((r + 1) * per, self.config.vocab_size)

    def local_config(self) -> ModelConfig:
        """The model configuration of this rank's share."""
        start, end = self.vocab_range()
        c = self.config
        moe = {}
        if c.num_experts:
            moe = dict(shared_expert_intermediate_size=c.shared_expert_intermediate_size // self.size)
            if self.expert_parallel:
                moe["expert_range"] = self.expert_range
            else:
                moe["moe_intermediate_size"] = c.moe_intermediate_size // self.size
        return dataclasses.replace(c, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                                   intermediate_size=c.intermediate_size // self.size, vocab_size=end - start,
                                   head_dim=c.head_dim, **moe)

    def describe(self) -> str:
        c = self.config
        kv = (f"{self.kv_heads} KV heads" if c.num_key_value_heads >= self.size else
              f"1 KV head (each of the {c.num_key_value_heads} replicated on {self.size // c.num_key_value_heads} ranks)")
        experts = ""
        if c.num_experts:
            first, end = self.expert_range
            experts = (f", {end - first} of {c.num_experts} experts (expert parallel)" if self.expert_parallel else
                       f", {c.moe_intermediate_size // self.size} of {c.moe_intermediate_size} rows of each expert")
        return (f"tensor parallel over {self.size} ranks: {self.heads} of {c.num_attention_heads} attention heads, "
                f"{kv}, {c.intermediate_size // self.size} of {c.intermediate_size} MLP rows{experts} and "
                f"{self.vocab_per_rank} of {c.vocab_size} vocabulary rows per rank")


def check_tensor_parallel(config: ModelConfig, size: int, plan: tuple[tuple[str, str], ...] | None,
                          architecture: str, expert_parallel: bool = False) -> None:
    """One line on why `config` cannot be split `size` ways, if it cannot."""
    if size == 1:
        return
    if expert_parallel and not config.num_experts:
        raise InvalidArgumentError(f"enable_expert_parallel: the {architecture} model has no experts")
    if config.num_experts:
        if expert_parallel and config.num_experts % size:
            raise InvalidArgumentError(f"tensor_parallel_size {size} does not divide the model's {config.num_experts} "
                                       "experts (expert parallelism gives each rank a whole share)")
        if not expert_parallel and config.moe_intermediate_size % size:
            raise InvalidArgumentError(f"tensor_parallel_size {size} does not divide the experts' width "
                                       f"{config.moe_intermediate_size}")
        if config.shared_expert_intermediate_size % size:
            raise InvalidArgumentError(f"tensor_parallel_size {size} does not divide the shared expert's width "
                                       f"{config.shared_expert_intermediate_size}")
    if plan is None:
        raise InvalidArgumentError(f"tensor_parallel_size {size}: tensor parallelism is not available for the "
                                   f"{architecture} architecture yet")
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    if heads % size:
        raise InvalidArgumentError(f"tensor_parallel_size {size} does not divide the model's {heads} attention heads")
    if kv % size and size % kv:
        raise InvalidArgumentError(f"tensor_parallel_size {size} and the model's {kv} KV heads: one must divide the "
                                   "other (KV heads are split, or replicated when ranks outnumber them)")
    if config.intermediate_size % size:
        raise InvalidArgumentError(f"tensor_parallel_size {size} does not divide the model's MLP width "
                                   f"{config.intermediate_size}")
    if config.vocab_size < size:
        raise InvalidArgumentError(f"tensor_parallel_size {size} is above the model's vocabulary of "
                                   f"{config.vocab_size} rows")


class TensorParallelShards:
    """Cuts each checkpoint tensor to this rank's share as loading reads it:
    `shards(parameter name, fused shard index, tensor)` -> the share (float or quantized)."""

    def __init__(self, layout: TensorParallelLayout, plan: tuple[tuple[str, str], ...]):
        self.layout = layout
        self.plan = [(re.compile(pattern), style) for pattern, style in plan]
        assert all(style in STYLES for _, style in plan)

    def expert(self, name: str, expert: int | None, shard: int, tensor):  # noqa: ANN001, ANN201
        """(the expert's index among this rank's, its share) of one expert's matrix, or None where
        the expert is another rank's (expert parallelism)."""
        if expert is None:
            raise InvalidArgumentError(f"{name}: experts stored as one stacked tensor (a GGUF's ffn_*_exps) are not "
                                       "split between tensor-parallel ranks yet")
        first, end = self.layout.expert_range
        if not first <= expert < end:
            return None
        if self.layout.expert_parallel:
            return expert - first, tensor
        return expert, self(name, shard, tensor)

    def style(self, name: str) -> str | None:
        for pattern, style in self.plan:
            if pattern.search(name):
                return style
        return None

    def __call__(self, name: str, shard: int, tensor):  # noqa: ANN001, ANN204 (torch.Tensor | QuantizedWeight)
        style = self.style(name)
        if style is None:
            return tensor  # replicated: norms, RoPE factors
        lay, c = self.layout, self.layout.config
        if style == "row_bias":
            return tensor if lay.rank == 0 else torch.zeros_like(tensor)
        if style in ("row", "row_in_block", "experts_row"):
            cols = cols_of(tensor) if isinstance(tensor, QUANTIZED_TYPES) else int(tensor.shape[-1])
            part = cols // lay.size
            block = block_values(tensor) if isinstance(tensor, QUANTIZED_TYPES) else 1
            if cols % lay.size or part % block:
                raise InvalidArgumentError(
                    f"tensor_parallel_size {lay.size}: {name} has {cols} input columns in blocks of {block} "
                    f"({_format_name(tensor)}); {lay.size} shares of {cols / lay.size:g} would cut a block")
            return take_cols(tensor, lay.rank * part, (lay.rank + 1) * part)
        if style == "vocab":
            start, end = lay.vocab_range()
            return _rows(tensor, start, end)
        if style in ("column", "experts_column"):
            per = _rows_count(tensor) // lay.size
            return _rows(tensor, lay.rank * per, (lay.rank + 1) * per)
        assert style == "qkv", style
        # shard 0 holds the query heads, 1 and 2 the key and value heads
        d = c.head_dim
        if shard == 0:
            return _rows(tensor, lay.rank * lay.heads * d, (lay.rank + 1) * lay.heads * d)
        first = lay.first_kv_head
        return _rows(tensor, first * d, (first + lay.kv_heads) * d)


def _format_name(tensor) -> str:  # noqa: ANN001
    qtype = getattr(tensor, "qtype", None)
    if qtype is not None:
        import gguf

        return gguf.GGMLQuantizationType(qtype).name
    return {"Int4Weight": "int4 groups, Q4_0 / Q4_1", "Int8GroupWeight": "int8 groups, Q8_0"}.get(
        type(tensor).__name__, type(tensor).__name__)


def _rows_count(tensor) -> int:  # noqa: ANN001
    return rows_of(tensor) if isinstance(tensor, QUANTIZED_TYPES) else int(tensor.shape[0])


def _rows(tensor, start: int, end: int):  # noqa: ANN001, ANN202
    if not isinstance(tensor, QUANTIZED_TYPES):
        return tensor[start:end]
    rows = rows_of(tensor)
    return split_rows(tensor, [start, end - start, rows - end])[1]


# ---- the modules that join the ranks' shares ------------------------------------------------


class RowParallel(nn.Module):
    """A row-parallel linear (or an MoE block): this rank's partial output, summed over the ranks."""

    def __init__(self, inner: nn.Module, comm: Communicator):
        super().__init__()
        self.inner = inner
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(self.inner(x))


class VocabParallelEmbedding(nn.Module):
    """The embedding of the vocabulary rows start..start+rows: ids outside them give zeros, and the
    sum over ranks is every id's row (exactly: one row and zeros)."""

    def __init__(self, inner: nn.Module, start: int, vocab_size: int, comm: Communicator):
        super().__init__()
        self.inner = inner
        self.start, self.rows = start, inner.num_embeddings
        self.vocab_size = vocab_size
        self.comm = comm

    @property
    def dtype(self) -> torch.dtype:
        weight = getattr(self.inner, "weight", None)
        return weight.dtype if weight is not None else self.inner.dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.vocab_size):
            # every rank sees the same ids and stops here, before any collective
            raise IndexError(f"token id out of the vocabulary of {self.vocab_size}")
        local = input_ids - self.start
        inside = (local >= 0) & (local < self.rows)
        rows = self.inner(local.clamp(0, max(0, self.rows - 1)))
        return self.comm.all_reduce(rows.masked_fill(~inside.unsqueeze(-1), 0))


class GatheredLogits(nn.Module):
    """The LM head of this rank's vocabulary rows; the full logits on rank 0 (gathered), an empty
    tensor on the others (which do not sample)."""

    def __init__(self, inner: nn.Module, layout: TensorParallelLayout, comm: Communicator):
        super().__init__()
        self.inner = inner
        self.per_rank, self.vocab_size = layout.vocab_per_rank, layout.config.vocab_size
        self.comm = comm

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = self.inner(hidden)
        if local.shape[-1] < self.per_rank:  # the last rank's short share, padded to gather
            local = nn.functional.pad(local, (0, self.per_rank - local.shape[-1]))
        parts = self.comm.gather(local, dst=0)
        if parts is None:
            return local.new_empty((*local.shape[:-1], 0))
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]


def parallelize(model: nn.Module, layout: TensorParallelLayout, comm: Communicator) -> None:
    """Wrap a loaded rank's model (its linears already packed or quantized) so its forward sums
    the row-parallel products and the embedding, and compute_logits gathers the vocabulary."""
    from surge.layers.moe import SparseMoeBlock

    shards = TensorParallelShards(layout, model.tp_plan)
    for path, module in list(model.named_modules()):
        if shards.style(f"{path}.weight") == "row" or isinstance(module, SparseMoeBlock):
            _replace(model, path, RowParallel(module, comm))  # (an MoE block's output: its ranks' parts summed)
    from surge.models.interfaces import MissingLayer

    embedding = model.get_submodule(model.embedding)
    if isinstance(embedding, MissingLayer):  # a later pipeline stage: no embedding, no LM head
        return
    start, _ = layout.vocab_range()
    _replace(model, model.embedding, VocabParallelEmbedding(embedding, start, layout.config.vocab_size, comm))
    _replace(model, model.output_head, GatheredLogits(model.get_submodule(model.output_head), layout, comm))


def _replace(model: nn.Module, path: str, layer: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, layer)
