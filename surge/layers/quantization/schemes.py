"""Weight schemes a module can be stored in, and the calibration methods that pick their grids.

    int4-g32 | int4-g64 | int4-g128   asymmetric int4 per group of G input columns (scale + zero)
    int8                              symmetric int8 per output channel
    int8-g32                          symmetric int8 per group of 32 (GGUF's Q8_0)
    w8a8                              int8 weights per output channel and int8 activations with a
                                      static per-tensor scale from calibration (int8 GEMMs)
    bf16 | fp16 | fp32                unquantized, stored in that dtype
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surge.errors import InvalidArgumentError
from surge.layers.quantization.formats import INT4_GROUP_SIZES

FLOAT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SCHEMES = tuple(f"int4-g{g}" for g in INT4_GROUP_SIZES) + ("int8", "int8-g32", "w8a8") + tuple(FLOAT_DTYPES)
# rtn: min-max round-to-nearest; percentile: the grid spans a percentile range of each group;
# mse: the clipping range minimizing each group's (activation-weighted) squared error;
# gptq: Hessian-based error compensation (needs calibration text)
METHODS = ("rtn", "percentile", "mse", "gptq")
SCALE_BYTES = 2  # scales and zeros are stored as fp16 (as GGUF and GPTQ checkpoints do)


@dataclass(frozen=True)
class Scheme:
    name: str
    kind: str  # "int4" | "int8" | "int8g" | "w8a8" | "float"
    group_size: int = 0  # 0: per output channel (int8) or not quantized
    dtype: torch.dtype | None = None  # float schemes

    @property
    def quantized(self) -> bool:
        return self.kind != "float"

    @property
    def activations_quantized(self) -> bool:
        """The module's inputs are quantized too (calibrated activation scales)."""
        return self.kind == "w8a8"

    @property
    def weight_scheme(self) -> "Scheme":
        """The scheme its weight alone is stored in (w8a8: int8 per channel)."""
        return parse_scheme("int8") if self.kind == "w8a8" else self

    def bytes(self, rows: int, cols: int) -> int:
        """Stored size of a [rows, cols] weight in this scheme (codes, scales, zeros)."""
        if self.kind == "float":
            assert self.dtype is not None
            return rows * cols * self.dtype.itemsize
        if self.kind == "int4":
            return rows * cols // 2 + rows * (cols // self.group_size) * 2 * SCALE_BYTES
        groups = cols // self.group_size if self.group_size else 1
        smoothing = 4 * (cols + 1) if self.kind == "w8a8" else 0  # float32 smoothing factors, input scale
        return rows * cols + rows * groups * SCALE_BYTES + smoothing


def parse_scheme(name: str) -> Scheme:
    """A scheme from its name, or a clear error listing the ones there are."""
    if name in FLOAT_DTYPES:
        return Scheme(name, "float", dtype=FLOAT_DTYPES[name])
    if name == "int8":
        return Scheme(name, "int8")
    if name == "int8-g32":
        return Scheme(name, "int8g", 32)
    if name == "w8a8":
        return Scheme(name, "w8a8")
    if name.startswith("int4-g") and name.removeprefix("int4-g").isdigit():
        group = int(name.removeprefix("int4-g"))
        if group in INT4_GROUP_SIZES:
            return Scheme(name, "int4", group)
    raise InvalidArgumentError(f"unknown weight scheme {name!r}: choose one of {', '.join(SCHEMES)}")


def check_method(method: str) -> str:
    if method not in METHODS:
        raise InvalidArgumentError(f"unknown quantization method {method!r}: choose one of {', '.join(METHODS)}")
    return method
