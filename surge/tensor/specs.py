"""A model's inputs and outputs as it describes them, reconciled with what its surge.toml
declares: the batch dimension taken off when the model batches, declared names checked,
pad values attached. No torch."""

from __future__ import annotations

import dataclasses

from surge.errors import InvalidArgumentError
from surge.tensor.config import DEFAULT_MAX_BATCH_SIZE, TensorModelConfig, TensorSpec


def _merge(model: TensorSpec, declared: TensorSpec | None, batched: bool, where: str) -> TensorSpec:
    dims = model.dims[1:] if batched else model.dims
    if declared is None:
        return dataclasses.replace(model, dims=dims)
    if declared.datatype and declared.datatype != model.datatype:
        raise InvalidArgumentError(f"{where}: '{model.name}' is {model.datatype} in the model, declared "
                                   f"{declared.datatype}")
    if declared.dims:
        if len(declared.dims) != len(dims) or any(m != -1 and m != d for m, d in zip(dims, declared.dims)):
            raise InvalidArgumentError(f"{where}: '{model.name}' has dims {list(dims)} in the model"
                                       f"{' (after the batch dimension)' if batched else ''}, declared "
                                       f"{list(declared.dims)}")
        dims = declared.dims
    return TensorSpec(model.name, model.datatype, dims, declared.pad_value)


def resolve_specs(inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], config: TensorModelConfig,
                  where: str) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...], int]:
    """(inputs, outputs, max batch size) from the model's own specs (full shapes, -1 where
    dynamic) and the declared ones. The model batches when every input and output has a
    dynamic first dimension; max_batch_size = 0 says it does not."""
    everything = inputs + outputs
    dynamic_first = bool(everything) and all(s.dims and s.dims[0] == -1 for s in everything)
    cap = config.max_batch_size
    if cap is None:
        cap = DEFAULT_MAX_BATCH_SIZE if dynamic_first else 0
    elif cap > 0 and not dynamic_first:
        fixed = [s.name for s in everything if not s.dims or s.dims[0] != -1]
        raise InvalidArgumentError(f"{where}: max_batch_size {cap} needs a dynamic first dimension on every input "
                                   f"and output; {', '.join(fixed)} has none (set max_batch_size = 0)")
    for kind, declared, model in (("input", config.inputs, inputs), ("output", config.outputs, outputs)):
        unknown = {d.name for d in declared} - {m.name for m in model}
        if unknown:
            raise InvalidArgumentError(f"{where}: declared {kind}(s) {', '.join(sorted(unknown))} are not in the "
                                       f"model; its {kind}s: {', '.join(m.name for m in model)}")
    by_name = {d.name: d for d in config.inputs + config.outputs}
    batched = cap > 0
    return (tuple(_merge(s, by_name.get(s.name), batched, where) for s in inputs),
            tuple(_merge(s, by_name.get(s.name), batched, where) for s in outputs), cap)
