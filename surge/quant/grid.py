"""Quantization grids: each (output row, group of input columns) gets a scale and a zero, fitted
by min-max, a percentile range, or the clipping that minimizes the group's squared error.

    w ~ (c - offset) * scale + zero      c in qmin..qmax
    int4 (asymmetric):          c in 0..15,     offset 8, zero free   (Int4Weight's layout)
    int8, int8-g32 (symmetric): c in -127..127, offset 0, zero 0

Scales and zeros are rounded to fp16 before any code is chosen, so what a checkpoint stores
(fp16) is exactly what the codes were fitted against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surge.errors import InvalidArgumentError
from surge.layers.quantization.formats import (
    Int4Weight,
    Int8GroupWeight,
    Int8Weight,
    QuantizedWeight,
    check_group_size,
)
from surge.layers.quantization.schemes import Scheme

MIN_SCALE = 2.0**-20  # exact in fp16 (a subnormal), so a constant group cannot divide by zero
MSE_STEPS = 40  # clipping ratios tried, from 1 (min-max) down to MSE_MIN_RATIO
MSE_MIN_RATIO = 0.5
DEFAULT_PERCENTILE = 99.9


@dataclass
class Grid:
    """scale / zero [N, groups] float32 (fp16 values); group_size columns share one entry."""

    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int
    kind: str  # "int4" | "int8" | "int8g"

    @property
    def qmin(self) -> int:
        return 0 if self.kind == "int4" else -127

    @property
    def qmax(self) -> int:
        return 15 if self.kind == "int4" else 127

    @property
    def offset(self) -> int:
        return 8 if self.kind == "int4" else 0

    def _expand(self, t: torch.Tensor, cols: slice | None) -> torch.Tensor:
        full = t.repeat_interleave(self.group_size, 1)
        return full if cols is None else full[:, cols]

    def codes(self, w: torch.Tensor, cols: slice | None = None) -> torch.Tensor:
        """Nearest codes of w [N, k] (columns `cols` of the weight; all by default)."""
        scale, zero = self._expand(self.scale, cols), self._expand(self.zero, cols)
        return torch.round((w - zero) / scale + self.offset).clamp(self.qmin, self.qmax)

    def values(self, codes: torch.Tensor, cols: slice | None = None) -> torch.Tensor:
        return (codes - self.offset) * self._expand(self.scale, cols) + self._expand(self.zero, cols)

    def column(self, w: torch.Tensor, col: int) -> torch.Tensor:
        """w [N] of column `col` rounded to the grid (GPTQ's inner loop)."""
        g = col // self.group_size
        scale, zero = self.scale[:, g], self.zero[:, g]
        return (torch.round((w - zero) / scale + self.offset).clamp(self.qmin, self.qmax) - self.offset) * scale + zero

    def weight(self, codes: torch.Tensor) -> QuantizedWeight:
        """The packed-kernel format of these codes."""
        if self.kind == "int4":
            return Int4Weight(codes.to(torch.int32), self.scale.clone(), self.zero.clone(), self.group_size)
        if self.kind == "int8g":
            return Int8GroupWeight(codes.to(torch.int8), self.scale.clone(), self.group_size)
        return Int8Weight(codes.to(torch.int8), self.scale[:, 0].clone())


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).float()


def grid_from_range(lo: torch.Tensor, hi: torch.Tensor, scheme: Scheme, group_size: int) -> Grid:
    """The grid spanning [lo, hi] per group (asymmetric) or [-max(|lo|, |hi|), +] (symmetric)."""
    if scheme.kind == "int4":
        scale = _fp16(((hi - lo) / 15).clamp(min=MIN_SCALE)).clamp(min=MIN_SCALE)
        zero = _fp16(lo + 8 * scale)
    else:
        scale = _fp16((torch.maximum(lo.abs(), hi.abs()) / 127).clamp(min=MIN_SCALE)).clamp(min=MIN_SCALE)
        zero = torch.zeros_like(scale)
    return Grid(scale, zero, group_size, scheme.kind)


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = w.shape
    return w.reshape(n, k // group_size, group_size)


def group_size_of(scheme: Scheme, in_features: int, name: str) -> int:
    """The scheme's group size for this weight (per channel: all its columns), checked."""
    if scheme.kind in ("int8", "w8a8"):
        return in_features
    if scheme.kind == "int8g":
        if in_features % scheme.group_size:
            raise InvalidArgumentError(
                f"{name}: group size {scheme.group_size} does not divide its input dimension {in_features}")
        return scheme.group_size
    check_group_size(scheme.group_size, in_features, name)
    return scheme.group_size


def fit_grid(w: torch.Tensor, scheme: Scheme, method: str = "rtn", importance: torch.Tensor | None = None,
             percentile: float = DEFAULT_PERCENTILE, name: str = "weight") -> Grid:
    """The grid of w [N, K] by `method`: "rtn" / "gptq" min-max, "percentile", or "mse".

    importance [K] (the calibration inputs' mean squares, E[x_k^2]) weights each column's error
    in the MSE search, so the columns that move the output most are clipped least.
    """
    if not scheme.quantized:
        raise ValueError(f"{scheme.name} is not a quantized scheme")
    scheme = scheme.weight_scheme
    w = w.float()
    g = group_size_of(scheme, w.shape[1], name)
    groups = _groups(w, g)
    if method == "percentile":
        if not 50 < percentile <= 100:
            raise InvalidArgumentError(f"percentile must be in (50, 100], got {percentile}")
        q = percentile / 100
        lo, hi = torch.quantile(groups, 1 - q, dim=-1), torch.quantile(groups, q, dim=-1)
        return grid_from_range(lo, hi, scheme, g)
    lo, hi = groups.amin(-1), groups.amax(-1)
    if method != "mse":
        return grid_from_range(lo, hi, scheme, g)
    weights = torch.ones(w.shape[1]) if importance is None else importance.float().clamp(min=0)
    weights = _groups(weights.reshape(1, -1), g)
    best = grid_from_range(lo, hi, scheme, g)
    best_err = _group_error(groups, best, weights)
    for ratio in torch.linspace(1, MSE_MIN_RATIO, MSE_STEPS)[1:].tolist():
        grid = grid_from_range(lo * ratio, hi * ratio, scheme, g)
        err = _group_error(groups, grid, weights)
        better = err < best_err
        best.scale = torch.where(better, grid.scale, best.scale)
        best.zero = torch.where(better, grid.zero, best.zero)
        best_err = torch.minimum(err, best_err)
    return best


def _group_error(groups: torch.Tensor, grid: Grid, weights: torch.Tensor) -> torch.Tensor:
    """Sum over each group of weights * (w - grid(w))^2: [N, groups]."""
    scale, zero = grid.scale.unsqueeze(-1), grid.zero.unsqueeze(-1)
    codes = torch.round((groups - zero) / scale + grid.offset).clamp(grid.qmin, grid.qmax)
    err = (codes - grid.offset) * scale + zero - groups
    return (err * err * weights).sum(-1)


def quantize_weight(w: torch.Tensor, scheme: Scheme, method: str = "rtn", importance: torch.Tensor | None = None,
                    percentile: float = DEFAULT_PERCENTILE, name: str = "weight") -> QuantizedWeight:
    """Round-to-nearest on the grid `method` fits (every method but GPTQ ends here)."""
    grid = fit_grid(w, scheme, method, importance, percentile, name)
    return grid.weight(grid.codes(w.float()))
