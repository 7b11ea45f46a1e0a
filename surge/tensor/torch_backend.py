"""The torch backend: a TorchScript module (`model.pt`) or a `torch.export` program
(`model.pt2`), run under inference mode on the CPU.

An exported program carries its inputs' names, dtypes and shapes (symbolic dimensions as -1);
a TorchScript module only its argument names, so its surge.toml declares each input's
datatype and dims. Outputs are named by the declaration or `output__0`, `output__1`, ... (as
Triton's PyTorch backend names them); their dtypes and shapes, where not declared, are read
from two probe runs on zeros at different sizes of the dynamic dimensions.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from surge.errors import InvalidArgumentError, ModelFormatError
from surge.tensor.config import NUMPY_TYPES, TensorModelConfig, TensorSpec, datatype_of
from surge.tensor.specs import resolve_specs


def _datatype(dtype: torch.dtype) -> str:
    if dtype == torch.bfloat16:
        raise ModelFormatError("bf16 tensors have no KServe datatype; export the model in float32 or float16")
    return datatype_of(np.dtype(torch.empty((), dtype=dtype).numpy().dtype))


def _exported_specs(program: Any) -> tuple[TensorSpec, ...]:
    """The user inputs of an exported program, from its placeholders' example values."""
    wanted = set(program.graph_signature.user_inputs)
    specs = []
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in wanted:
            continue
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            raise ModelFormatError(f"exported input '{node.name}' is not a tensor")
        dims = tuple(d if isinstance(d, int) else -1 for d in value.shape)
        specs.append(TensorSpec(node.name, _datatype(value.dtype), dims))
    return tuple(specs)


def _scripted_specs(module: Any, config: TensorModelConfig, where: str) -> tuple[TensorSpec, ...]:
    """A TorchScript module's inputs: its forward's argument names, typed by the declaration."""
    names = [a.name for a in module.forward.schema.arguments[1:]]
    declared = {d.name: d for d in config.inputs}
    missing = [n for n in names if n not in declared or not declared[n].datatype or not declared[n].dims]
    if missing:
        raise InvalidArgumentError(
            f"{where}: a TorchScript module carries no dtypes or shapes: declare each input in surge.toml as "
            f"[[input]] with name, datatype and dims; missing for: {', '.join(missing)} (forward takes "
            f"{', '.join(names)})")
    lead = (-1,) if config.max_batch_size != 0 else ()
    return tuple(TensorSpec(n, declared[n].datatype, lead + declared[n].dims) for n in names)


class TorchBackend:
    def __init__(self, path: str, config: TensorModelConfig):
        where = path
        exported = path.endswith(".pt2")
        try:
            program = torch.export.load(path) if exported else None
            self.module = program.module() if program is not None else torch.jit.load(path, map_location="cpu").eval()
        except (RuntimeError, ValueError, OSError) as exc:
            raise ModelFormatError(f"{path}: torch cannot load it: {exc}") from exc
        if program is not None:
            inputs = _exported_specs(program)
            self.platform = "pytorch_exported"
        else:
            inputs = _scripted_specs(self.module, config, where)
            self.platform = "pytorch_libtorch"
        self.input_names = [s.name for s in inputs]
        outputs = self._probe_outputs(inputs, config, where)
        self.inputs, self.outputs, self.max_batch_size = resolve_specs(inputs, outputs, config, where)
        self.memory_bytes = os.path.getsize(path)

    def _forward(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = [torch.from_numpy(np.array(inputs[n])) for n in self.input_names]
        with torch.inference_mode():
            result = self.module(*args)
        if isinstance(result, torch.Tensor):
            result = (result,)
        elif isinstance(result, dict):
            result = tuple(result.values())
        if not isinstance(result, (tuple, list)) or not all(isinstance(r, torch.Tensor) for r in result):
            raise ModelFormatError("the module must return a tensor, or a tuple, list or dict of tensors")
        return [r.detach().cpu().numpy() for r in result]

    def _probe_outputs(self, inputs: tuple[TensorSpec, ...], config: TensorModelConfig,
                       where: str) -> tuple[TensorSpec, ...]:
        """Outputs named as declared (or output__i), dtypes and dims from runs on zeros with the
        dynamic dimensions at 2 and then 3: a dimension that follows them is dynamic."""
        runs = []
        for size in (2, 3):
            feed = {s.name: np.zeros([size if d == -1 else d for d in s.dims], dtype=NUMPY_TYPES[s.datatype])
                    for s in inputs}
            try:
                runs.append(self._forward(feed))
            except Exception as exc:  # noqa: BLE001 - any failure of the user's module
                raise InvalidArgumentError(f"{where}: a probe run on zeros failed ({exc}); declare the outputs "
                                           "with datatype and dims") from exc
        first, second = runs
        declared = [d.name for d in config.outputs]
        if declared and len(declared) != len(first):
            raise InvalidArgumentError(f"{where}: {len(declared)} outputs declared; the module returns {len(first)}")
        names = declared or [f"output__{i}" for i in range(len(first))]
        specs = []
        for name, a, b in zip(names, first, second):
            dims = tuple(x if x == y else -1 for x, y in zip(a.shape, b.shape))
            specs.append(TensorSpec(name, datatype_of(a.dtype), dims))
        return tuple(specs)

    def run(self, instance: int, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip((o.name for o in self.outputs), self._forward(inputs)))

    def close(self) -> None:
        self.module = None
