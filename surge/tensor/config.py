"""A tensor model's configuration: its backend, inputs and outputs, and how requests are batched.

Read from the same `surge.toml` files as an LLM's settings (the model's, then the version's),
in Triton's terms:

    backend = "onnxruntime"        # or "torch"; detected from the files when absent
    max_batch_size = 8             # 0: the model has no batch dimension, requests run as they are
    preferred_batch_sizes = [4, 8] # run at once when this many items are waiting
    max_queue_delay_us = 2000      # how long the first waiting item may wait for others
    max_queue_size = 64            # items waiting beyond this are refused (429)
    default_timeout_us = 0         # an item still queued after this fails (0: no limit)
    instance_count = 1             # copies of the model running batches in parallel
    optimization_level = "all"     # onnxruntime: "disable" | "basic" | "extended" | "all"
    intra_op_threads = 0           # onnxruntime threads per instance (0: its default)

    [[input]]                      # the model's own description where the format carries one;
    name = "input_ids"             # required for TorchScript (it carries no dtypes or shapes)
    datatype = "INT64"
    dims = [-1]                    # without the batch dimension when max_batch_size > 0
    pad_value = 0                  # variable dims of this input may be padded to batch requests

    [[output]]
    name = "logits"                # names (and, for TorchScript, types) of the outputs

No torch here: the backends (onnx_backend.py, torch_backend.py) build on this.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from surge.errors import InvalidArgumentError

BACKENDS = ("llm", "onnxruntime", "torch")
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
# the KServe v2 datatypes and their numpy types (BYTES: Python bytes objects)
NUMPY_TYPES: dict[str, Any] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
}
DATATYPES = tuple(NUMPY_TYPES)


def datatype_of(dtype: np.dtype) -> str:
    """The KServe datatype of a numpy dtype."""
    for name, kind in NUMPY_TYPES.items():
        if np.dtype(kind) == dtype:
            return name
    raise InvalidArgumentError(f"no KServe datatype for {dtype}")
# model files, in the order detection looks for them
ONNX_FILE, TORCHSCRIPT_FILE, EXPORTED_FILE = "model.onnx", "model.pt", "model.pt2"
DEFAULT_MAX_BATCH_SIZE = 8  # where the model's batch dimension is dynamic and no size is given


@dataclass(frozen=True)
class TensorSpec:
    """An input or output: name, KServe datatype, and dims (-1 where any size goes), without the
    batch dimension when the model batches."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    pad_value: float | int | None = None  # inputs only: padding allowed on the -1 dims

    def metadata(self, batched: bool) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": ([-1] if batched else []) + list(self.dims)}


@dataclass(frozen=True)
class TensorModelConfig:
    backend: str
    max_batch_size: int | None = None  # None: decided from the model (its batch dimension)
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    max_queue_size: int = 0  # 0: unbounded
    default_timeout_us: int = 0
    instance_count: int = 1
    optimization_level: str | None = None  # onnxruntime only; None: "all"
    intra_op_threads: int = 0
    inputs: tuple[TensorSpec, ...] = ()  # declared; the backend fills in what the model carries
    outputs: tuple[TensorSpec, ...] = ()
    embedding: Any = None  # an EmbeddingConfig (embedding.py): the model serves /v1/embeddings


SETTINGS = {f.name for f in dataclasses.fields(TensorModelConfig)} - {"inputs", "outputs", "embedding"}


def _int(source: str, key: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidArgumentError(f"{source}: {key} must be an integer >= {low}, not {value!r}")
    return value


def _spec(source: str, kind: str, table: Any, is_input: bool) -> TensorSpec:
    if not isinstance(table, Mapping) or not isinstance(table.get("name"), str) or not table["name"]:
        raise InvalidArgumentError(f"{source}: each [[{kind}]] needs a name")
    name = table["name"]
    known = {"name", "datatype", "dims"} | ({"pad_value"} if is_input else set())
    unknown = set(table) - known
    if unknown:
        raise InvalidArgumentError(f"{source}: [[{kind}]] {name}: unknown key(s) {', '.join(sorted(unknown))} "
                                   f"(known: {', '.join(sorted(known))})")
    datatype = table.get("datatype", "")
    if datatype and datatype not in DATATYPES:
        raise InvalidArgumentError(f"{source}: [[{kind}]] {name}: datatype {datatype!r} is not one of "
                                   f"{', '.join(DATATYPES)}")
    dims = table.get("dims", None)
    if dims is not None and (not isinstance(dims, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and (d > 0 or d == -1) for d in dims)):
        raise InvalidArgumentError(f"{source}: [[{kind}]] {name}: dims must be a list of positive integers or -1")
    pad = table.get("pad_value")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, (int, float))):
        raise InvalidArgumentError(f"{source}: [[{kind}]] {name}: pad_value must be a number")
    return TensorSpec(name, datatype, tuple(dims) if dims is not None else (), pad)


def tensor_config(settings: Mapping[str, Any], backend: str, source: str) -> TensorModelConfig:
    """The checked configuration of a tensor model from its (merged) surge.toml settings."""
    unknown = set(settings) - SETTINGS - {"input", "output", "embedding"}
    if unknown:
        raise InvalidArgumentError(
            f"{source}: unknown setting(s) for the {backend} backend: {', '.join(sorted(unknown))}; known: "
            f"{', '.join(sorted(SETTINGS | {'input', 'output', 'embedding'}))}")
    kwargs: dict[str, Any] = {"backend": backend}
    if "embedding" in settings:
        from surge.tensor.embedding import embedding_config

        kwargs["embedding"] = embedding_config(settings["embedding"], source)
    if "max_batch_size" in settings:
        kwargs["max_batch_size"] = _int(source, "max_batch_size", settings["max_batch_size"], 0)
    for key, low in (("max_queue_delay_us", 0), ("max_queue_size", 0), ("default_timeout_us", 0),
                     ("instance_count", 1), ("intra_op_threads", 0)):
        if key in settings:
            kwargs[key] = _int(source, key, settings[key], low)
    if "preferred_batch_sizes" in settings:
        sizes = settings["preferred_batch_sizes"]
        if not isinstance(sizes, list):
            raise InvalidArgumentError(f"{source}: preferred_batch_sizes must be a list of integers")
        kwargs["preferred_batch_sizes"] = tuple(sorted({_int(source, "preferred_batch_sizes", s, 1) for s in sizes}))
    level = settings.get("optimization_level")
    if level is not None and level not in OPTIMIZATION_LEVELS:
        raise InvalidArgumentError(f"{source}: optimization_level must be one of {', '.join(OPTIMIZATION_LEVELS)}")
    for key in ("optimization_level", "intra_op_threads"):
        if key in settings and backend != "onnxruntime":
            raise InvalidArgumentError(f"{source}: {key} is an onnxruntime setting; this model's backend is {backend}")
    kwargs["optimization_level"] = level
    for kind, is_input in (("input", True), ("output", False)):
        tables = settings.get(kind, [])
        if not isinstance(tables, list):
            raise InvalidArgumentError(f"{source}: {kind} must be an array of tables ([[{kind}]])")
        specs = tuple(_spec(source, kind, t, is_input) for t in tables)
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise InvalidArgumentError(f"{source}: an {kind} name appears twice")
        kwargs[kind + "s"] = specs
    config = TensorModelConfig(**kwargs)
    cap = config.max_batch_size
    if cap is not None and config.preferred_batch_sizes and max(config.preferred_batch_sizes) > max(cap, 1):
        raise InvalidArgumentError(f"{source}: preferred_batch_sizes {list(config.preferred_batch_sizes)} exceed "
                                   f"max_batch_size {cap}")
    return config


def model_file(path: str, backend: str) -> str:
    """The file a `backend` version directory is served from."""
    names = {"onnxruntime": (ONNX_FILE,), "torch": (TORCHSCRIPT_FILE, EXPORTED_FILE)}[backend]
    for name in names:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    if backend == "onnxruntime":
        found = sorted(f for f in os.listdir(path) if f.endswith(".onnx"))
        if len(found) == 1:
            return os.path.join(path, found[0])
    raise InvalidArgumentError(f"{path}: a {backend} model needs {' or '.join(names)} in its version directory")


def detect_backend(path: str | None) -> str:
    """The backend a version directory's files call for: ONNX, TorchScript / exported program, or an LLM."""
    if path is None or not os.path.isdir(path):
        return "llm"
    files = set(os.listdir(path))
    if ONNX_FILE in files or any(f.endswith(".onnx") for f in files):
        return "onnxruntime"
    if TORCHSCRIPT_FILE in files or EXPORTED_FILE in files:
        return "torch"
    return "llm"
