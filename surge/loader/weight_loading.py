"""Generic weight loading: (checkpoint name, tensor) pairs into a model's parameters, driven by
the model contract (surge/models/interfaces.py): hf_names maps a family's own names (GPT-2's,
Conv1D matrices transposed), packed_modules puts q/k/v and gate/up rows into their fused
parameters (a checkpoint's own fused tensor fills them whole), weight_loaders() takes names
that are not parameters (RoPE frequency factors), tied embeddings are shared.

Quantized tensors (a GGUF's blocks, a surge checkpoint's codes) are not expanded: they are
returned as pending weights, module path -> {shard: weight}, for
surge.layers.quantization.apply.quantize_linears. The embedding table is looked up, not
multiplied: it is also dequantized into its float parameter (the fallback where its rows
cannot be read from the blocks). Experts' matrices load into their stacked parameters
(ExpertWeights in the contract) when float; quantized, each expert's waits under the stacked
parameter's name for apply.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from surge.errors import ModelFormatError
from surge.layers.quantization.formats import QUANTIZED_TYPES, QuantizedWeight, cols_of, rows_of, split_rows
from surge.models.interfaces import CausalLM

Pending = dict[str, dict[int, QuantizedWeight]]
# share(parameter, shard, tensor) -> this process's part; share.expert(parameter, expert, shard, tensor)
# -> (its index here, its part) or None (surge.distributed.tensor_parallel.TensorParallelShards)
Share = Callable[[str, int, "torch.Tensor | QuantizedWeight"], "torch.Tensor | QuantizedWeight"]


def fused_name(model: CausalLM, name: str) -> tuple[str, int]:
    """(the model's parameter name, shard index) of a checkpoint tensor name."""
    for part, (fused, index) in model.packed_modules.items():
        if part in name:
            return name.replace(part, fused), index
    return name, 0


def expert_target(model: CausalLM, name: str) -> tuple[str, int | None, int] | None:
    """(stacked parameter, expert index or None for all experts, shard) of an expert's tensor."""
    for rule in model.expert_weights:
        found = rule.target(name)
        if found is not None:
            return found[0], found[1], rule.shard
    return None


def load_weights(model: CausalLM, weights: Iterable[tuple[str, torch.Tensor | QuantizedWeight]],
                 source: str = "checkpoint", share: Share | None = None) -> Pending:
    """Copy every pair into its parameter (rows of its shard; for stacked experts, of one
    expert or all); every parameter must be given. Returns the quantized weights kept aside.
    ModelFormatError names a wrong shape or what is missing. `share(parameter, shard, tensor)`,
    where given, cuts each tensor to what this process holds (a tensor-parallel rank's share)
    before it is copied or kept."""
    params = dict(model.named_parameters())
    loaders = model.weight_loaders()
    tied = model.config.tie_word_embeddings
    head_weight, embedding_weight = f"{model.output_head}.weight", f"{model.embedding}.weight"
    loaded: set[tuple[str, int]] = set()
    experts_loaded: dict[tuple[str, int], set[int]] = {}
    pending: Pending = {}
    for checkpoint_name, tensor in weights:
        checkpoint_name, transposed = model.hf_names.model_name(checkpoint_name)
        if transposed:
            if isinstance(tensor, QUANTIZED_TYPES):
                raise ModelFormatError(f"{source}: tensor {checkpoint_name!r} is stored [in, out] and quantized; "
                                       "surge loads such matrices from float only")
            tensor = tensor.t()
        if checkpoint_name in loaders:
            loaders[checkpoint_name](tensor)  # type: ignore[arg-type]
            continue
        if checkpoint_name == head_weight and tied:
            if isinstance(tensor, QUANTIZED_TYPES):  # the file's own quantized copy of the head
                pending.setdefault(model.output_head, {})[0] = share(head_weight, 0, tensor) if share else tensor
            continue
        stacked = expert_target(model, checkpoint_name)
        expert: int | None = None
        if stacked is not None:
            name, expert, shard = stacked
        else:
            name, shard = fused_name(model, checkpoint_name)
        param = params.get(name)
        if param is None:
            continue  # e.g. rotary inv_freq buffers saved by old checkpoints
        sizes = model.shard_sizes(name)
        # a checkpoint that stores the fused tensor itself (Phi-3's qkv_proj, gate_up_proj) fills every shard
        whole = stacked is None and len(sizes) > 1 and name == checkpoint_name
        if share is not None:
            assert not whole, "a family whose tensors are not cut per rank (tp_plan)"
            if stacked is None:
                tensor = share(name, shard, tensor)
            else:
                mine = share.expert(name, expert, shard, tensor)  # type: ignore[attr-defined]
                if mine is None:
                    continue  # another rank's expert
                expert, tensor = mine
        if expert is not None and not 0 <= expert < param.shape[0]:
            raise ModelFormatError(f"{source}: tensor {checkpoint_name!r} is expert {expert}, the model has "
                                   f"{param.shape[0]}")
        if isinstance(tensor, QUANTIZED_TYPES):
            if name != embedding_weight and stacked is None:
                if whole and rows_of(tensor) != sum(sizes):
                    raise ModelFormatError(f"{source}: tensor {checkpoint_name!r} has {rows_of(tensor)} rows, the "
                                           f"model expects {sum(sizes)}")
                parts = enumerate(split_rows(tensor, sizes)) if whole else [(shard, tensor)]
                for index, part in parts:
                    pending.setdefault(name.rsplit(".", 1)[0], {})[index] = part  # type: ignore[assignment]
                    loaded.add((name, index))
                continue
            if name == embedding_weight:  # looked up from its quantized rows where the kernels run
                pending.setdefault(model.embedding, {})[0] = tensor
                if tied:
                    pending.setdefault(model.output_head, {})[0] = tensor
                _dequantize_into(param.data, tensor, f"{source}: tensor {checkpoint_name!r}")  # its float fallback
                loaded.add((name, 0))
                continue
            if stacked is not None:
                _pend_experts(pending, experts_loaded, name, param, expert, shard, sizes, tensor,
                              f"{source}: tensor {checkpoint_name!r}")
                continue
        rows = slice(sum(sizes[:shard]), sum(sizes[: shard + 1])) if sizes and not whole else slice(None)
        if stacked is not None:
            target = param.data[:, rows] if expert is None else param.data[expert, rows]
        else:
            target = param.data[rows]
        if target.dim() == 2 and target.shape[0] == 1 and tuple(tensor.shape) == tuple(target.shape[1:]):
            tensor = tensor.unsqueeze(0)  # GGUF stores a one-row matrix (a shared expert's gate) as a vector
        if tuple(target.shape) != tuple(tensor.shape):
            raise ModelFormatError(
                f"{source}: tensor {checkpoint_name!r} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(tensor)
        if stacked is not None and expert is not None:
            experts_loaded.setdefault((name, shard), set()).add(expert)
        else:
            loaded.update((name, i) for i in (range(len(sizes)) if whole else [shard]))
    absent_experts: dict[tuple[str, int], list[int]] = {}
    for (name, shard), experts in experts_loaded.items():
        absent = sorted(set(range(params[name].shape[0])) - experts)
        if absent:
            absent_experts[(name, shard)] = absent
        else:
            loaded.add((name, shard))
    if tied:
        loaded.add((head_weight, 0))
    _dequantize_mixed_fusions(model, params, pending)
    expected = {(n, i) for n in params for i in range(max(1, len(model.shard_sizes(n))))}
    missing = sorted(n + (f"[{i}]" if len(model.shard_sizes(n)) > 1 else "")
                     + (f" (expert {', '.join(map(str, absent_experts[n, i]))})" if (n, i) in absent_experts else "")
                     for n, i in expected - loaded)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelFormatError(f"{source}: missing weights {', '.join(missing[:3])}{more}")
    return pending


def _pend_experts(pending: Pending, experts_loaded: dict[tuple[str, int], set[int]], name: str,
                  param: torch.nn.Parameter, expert: int | None, shard: int, sizes: list[int],
                  tensor: QuantizedWeight, what: str) -> None:
    """One expert's quantized matrix, or every expert's stacked (E * rows rows), kept aside for
    quantization/apply.py (which runs it from its blocks or dequantizes it into `param`) under
    the stacked parameter's name, at expert * shards + shard."""
    experts, rows, cols = param.shape
    part_rows = sizes[shard] if sizes else rows
    count = 1 if expert is not None else experts
    if rows_of(tensor) != count * part_rows or cols_of(tensor) != cols:
        raise ModelFormatError(f"{what} has shape ({rows_of(tensor)}, {cols_of(tensor)}), the model expects "
                               f"({count * part_rows}, {cols})")
    indices = [expert] if expert is not None else list(range(experts))
    for e, part in zip(indices, split_rows(tensor, [part_rows] * count)):
        pending.setdefault(name, {})[e * max(1, len(sizes)) + shard] = part  # type: ignore[assignment]
        experts_loaded.setdefault((name, shard), set()).add(e)


def _dequantize_into(target: torch.Tensor, weight: QuantizedWeight, what: str, values_per_slice: int = 1 << 24) -> None:
    """target[:] = weight dequantized, a slice of rows at a time: a 150k-row table dequantized
    whole would take gigabytes of float32 for a moment."""
    rows, cols = target.shape
    if rows_of(weight) != rows:
        raise ModelFormatError(f"{what} has {rows_of(weight)} rows, the model expects {rows}")
    step = max(1, values_per_slice // max(1, cols))
    sizes = [min(step, rows - r) for r in range(0, rows, step)]
    with torch.no_grad():
        for start, part in zip(range(0, rows, step), split_rows(weight, sizes)):
            values = part.dequantize()
            if values.shape[1] != cols:
                raise ModelFormatError(f"{what} has rows of {values.shape[1]} values, the model expects {cols}")
            target[start:start + values.shape[0]].copy_(values)


def _dequantize_mixed_fusions(model: CausalLM, params: dict[str, torch.nn.Parameter], pending: Pending) -> None:
    """A fused linear runs quantized only when every shard came quantized (in one format, or
    in several, run as parts: see quantization/apply.py); where some came in float (a GGUF may
    store q/k in F16 and v as Q8_0) its quantized shards are dequantized into their rows of the
    float weight."""
    for module, shards in list(pending.items()):
        if module in params:  # experts' matrices, under their stacked parameter: apply.py's
            continue
        sizes = model.shard_sizes(f"{module}.weight")
        if len(sizes) < 2 or set(shards) == set(range(len(sizes))):
            continue
        weight = params[f"{module}.weight"]
        with torch.no_grad():
            for shard, quantized in shards.items():
                weight.data[sum(sizes[:shard]): sum(sizes[: shard + 1])].copy_(quantized.dequantize())
        del pending[module]
