"""A served tensor model: its backend (onnxruntime or torch) behind a dynamic batcher, and the
check of a request's tensors against the model's inputs and outputs.

The server (server/kserve_tensor.py) hands it named numpy arrays and gets named arrays back;
every error a request can cause is an InferInputError naming the tensor and what is wrong.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np

from surge.errors import InvalidArgumentError
from surge.tensor.batcher import DynamicBatcher
from surge.tensor.config import NUMPY_TYPES, TensorModelConfig, TensorSpec, datatype_of, model_file
from surge.tensor.embedding import Embedder

logger = logging.getLogger("surge.tensor")


class InferInputError(InvalidArgumentError):
    """A request's tensors do not fit the model: a 400 with this message."""


def load_backend(path: str, config: TensorModelConfig) -> Any:
    """The backend object serving `path` (a version directory or the model file itself)."""
    file = model_file(path, config.backend) if os.path.isdir(path) else path
    if config.backend == "onnxruntime":
        from surge.tensor.onnx_backend import OnnxBackend

        return OnnxBackend(file, config)
    from surge.tensor.torch_backend import TorchBackend

    return TorchBackend(file, config)


class TensorModel:
    def __init__(self, backend: Any, config: TensorModelConfig, name: str = "model",
                 observe: Callable[[int, list[float], float], None] | None = None, path: str | None = None):
        self.backend = backend
        self.config = config
        self.inputs: tuple[TensorSpec, ...] = backend.inputs
        self.outputs: tuple[TensorSpec, ...] = backend.outputs
        self.max_batch_size: int = backend.max_batch_size
        self.embedder: Embedder | None = None
        pads: dict[str, float | int] = {}
        if config.embedding is not None:
            if path is None or not os.path.isdir(path):
                raise InvalidArgumentError("an embedding model is served from a version directory (its tokenizer)")
            self.embedder = Embedder(config.embedding, path, self.inputs, self.outputs, self.batched)
            pads.update(self.embedder.pad_values())
        pads.update({s.name: s.pad_value for s in self.inputs if s.pad_value is not None})
        self.batcher = DynamicBatcher(backend.run, config.instance_count, self.max_batch_size,
                                      config.preferred_batch_sizes, config.max_queue_delay_us,
                                      config.max_queue_size, config.default_timeout_us, pads, observe, name)

    @classmethod
    def load(cls, path: str, config: TensorModelConfig, name: str = "model",
             observe: Callable[[int, list[float], float], None] | None = None) -> "TensorModel":
        start = time.perf_counter()
        backend = load_backend(path, config)
        try:
            model = cls(backend, config, name, observe, path)
        except BaseException:
            backend.close()
            raise
        logger.info("loaded %s (%s) in %.2fs: inputs %s, outputs %s, max_batch_size %d, %d instance(s)", name,
                    model.platform, time.perf_counter() - start, [s.metadata(model.batched) for s in model.inputs],
                    [s.metadata(model.batched) for s in model.outputs], model.max_batch_size, config.instance_count)
        return model

    @property
    def batched(self) -> bool:
        return self.max_batch_size > 0

    @property
    def platform(self) -> str:
        return str(self.backend.platform)

    @property
    def memory_bytes(self) -> int:
        return int(self.backend.memory_bytes)

    def metadata(self) -> dict[str, Any]:
        return {"platform": self.platform,
                "inputs": [s.metadata(self.batched) for s in self.inputs],
                "outputs": [s.metadata(self.batched) for s in self.outputs]}

    def check(self, inputs: dict[str, np.ndarray], outputs: list[str] | None) -> None:
        """InferInputError unless the tensors are exactly the model's inputs, each of its
        datatype and shape, with one batch size within max_batch_size, and every output asked
        for is the model's."""
        names = [s.name for s in self.inputs]
        unknown = sorted(set(inputs) - set(names))
        if unknown:
            raise InferInputError(f"unknown input(s) {', '.join(unknown)}; the model takes {', '.join(names)}")
        missing = [n for n in names if n not in inputs]
        if missing:
            raise InferInputError(f"missing input(s) {', '.join(missing)}; the model takes {', '.join(names)}")
        batch = None
        for spec in self.inputs:
            array = inputs[spec.name]
            if array.dtype != np.dtype(NUMPY_TYPES[spec.datatype]):
                raise InferInputError(f"input '{spec.name}' is {datatype_of(array.dtype)}; the model takes "
                                      f"{spec.datatype}")
            shape = list(array.shape)
            expected = ([-1] if self.batched else []) + list(spec.dims)
            if len(shape) != len(expected) or any(e != -1 and e != d for e, d in zip(expected, shape)):
                raise InferInputError(f"input '{spec.name}' has shape {shape}; the model takes {expected}")
            if self.batched:
                if batch is not None and shape[0] != batch:
                    raise InferInputError(f"input '{spec.name}' has batch size {shape[0]}, another input {batch}")
                batch = shape[0]
                if not 1 <= batch <= self.max_batch_size:
                    raise InferInputError(f"input '{spec.name}' has batch size {batch}; this model takes 1 to "
                                          f"{self.max_batch_size} (max_batch_size)")
            if array.size == 0:
                raise InferInputError(f"input '{spec.name}' is empty")
        known = {s.name for s in self.outputs}
        for name in outputs or ():
            if name not in known:
                raise InferInputError(f"unknown output '{name}'; the model gives {', '.join(s.name for s in self.outputs)}")

    def submit(self, inputs: dict[str, np.ndarray], timeout_us: int | None = None) -> Future:
        """Queue checked inputs; the future gets every output. QueueFullError when full."""
        return self.batcher.submit(inputs, timeout_us)

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Check, queue and wait: the outputs asked for (all by default)."""
        self.check(inputs, outputs)
        result = self.submit(inputs).result()
        return {k: v for k, v in result.items() if outputs is None or k in outputs}

    def close(self) -> None:
        self.batcher.close()
        self.backend.close()
