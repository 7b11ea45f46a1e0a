"""The onnxruntime backend: an ONNX file run by `instance_count` InferenceSessions.

Inputs and outputs (names, element types, shapes with symbolic dimensions as -1) are read
from the model. The graph is optimised at the configured level (constant folding, node
fusions) and the optimised graph cached on disk beside surge's other caches, keyed by the
file's contents, the level and the onnxruntime version, so a restart loads it as it is.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from typing import Any

import numpy as np

from surge.errors import InvalidArgumentError, ModelFormatError
from surge.tensor.config import TensorModelConfig, TensorSpec
from surge.tensor.specs import resolve_specs

logger = logging.getLogger("surge.tensor")

# onnxruntime's element types -> KServe datatypes
ONNX_TYPES = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64", "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32",
    "tensor(int64)": "INT64", "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def require_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise InvalidArgumentError('the onnxruntime backend needs onnxruntime: pip install "surge[onnx]"') from exc
    return onnxruntime


def cache_dir() -> str:
    base = os.environ.get("SURGE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "surge")
    return os.path.join(base, "onnx")


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:20]


def _spec(arg: Any, what: str) -> TensorSpec:
    datatype = ONNX_TYPES.get(arg.type)
    if datatype is None:
        raise ModelFormatError(f"{what} '{arg.name}' has type {arg.type}, which the KServe protocol cannot carry")
    dims = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
    return TensorSpec(arg.name, datatype, dims)


class OnnxBackend:
    platform = "onnxruntime_onnx"

    def __init__(self, path: str, config: TensorModelConfig):
        ort = require_onnxruntime()
        self.path = path
        level = config.optimization_level or "all"
        levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        # the file is read once for its digest only when there is an optimised graph to cache
        cached = os.path.join(cache_dir(), f"{_digest(path)}-{level}-ort{ort.__version__}.onnx") \
            if level != "disable" else ""
        self.sessions = []
        for _ in range(config.instance_count):
            options = ort.SessionOptions()
            options.log_severity_level = 3  # errors only: its warnings about the cached graph are expected
            options.intra_op_num_threads = config.intra_op_threads
            # idle threads sleep instead of spinning: on a small box spinning takes the cores the
            # server's event loop needs to receive the next batch's requests
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
            source = path
            if cached and os.path.isfile(cached):
                source = cached  # optimised already
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            else:
                options.graph_optimization_level = levels[level]
                if cached and not self.sessions:
                    os.makedirs(cache_dir(), exist_ok=True)
                    fd, partial = tempfile.mkstemp(suffix=".onnx", dir=cache_dir())
                    os.close(fd)
                    options.optimized_model_filepath = partial
            try:
                session = ort.InferenceSession(source, options, providers=providers)
            except Exception as exc:  # noqa: BLE001 - onnxruntime's own error types
                if options.optimized_model_filepath and os.path.exists(options.optimized_model_filepath):
                    os.unlink(options.optimized_model_filepath)  # no half-written graph left in the cache
                raise ModelFormatError(f"{path}: onnxruntime cannot load it: {exc}") from exc
            if options.optimized_model_filepath:
                self._keep(options.optimized_model_filepath, cached)
            self.sessions.append(session)
        first = self.sessions[0]
        model_inputs = tuple(_spec(a, "input") for a in first.get_inputs())
        model_outputs = tuple(_spec(a, "output") for a in first.get_outputs())
        self.inputs, self.outputs, self.max_batch_size = resolve_specs(model_inputs, model_outputs, config, path)
        self.memory_bytes = os.path.getsize(path) * config.instance_count

    @staticmethod
    def _keep(partial: str, cached: str) -> None:
        """Move the optimised graph into the cache; a failure only costs the next load its optimisation."""
        try:
            if os.path.getsize(partial) > 0:
                os.replace(partial, cached)
                logger.info("cached the optimised graph at %s", cached)
        except OSError as exc:
            logger.warning("could not cache the optimised graph: %s", exc)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)

    def run(self, instance: int, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.outputs]
        results = self.sessions[instance].run(names, inputs)
        return dict(zip(names, results))

    def close(self) -> None:
        self.sessions = []
