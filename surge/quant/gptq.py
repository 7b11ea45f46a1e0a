"""GPTQ (Frantar et al., 2022): quantize a weight one input column at a time and spread each
column's rounding error over the columns not yet quantized, weighted by the inverse Hessian
of the layer's calibration inputs (H = E[x x^T]), so the layer's *output* error stays small.

    for each block of B columns (B a multiple of the group size):
        for each column j of the block:
            q_j   = grid(w_j)                         the group's grid fitted when j starts a group
            e_j   = (w_j - q_j) / U[j, j]             U = upper Cholesky factor of H^-1
            w_j+1.. -= e_j U[j, j+1..]                within the block, now
        w_after_block -= E_block U[block, after]      the rest, once per block

act_order quantizes the columns of largest H[j, j] first; the group grids are then fitted on
the original weight up front ("static groups"), so groups stay contiguous as the packed
kernels require.
"""

from __future__ import annotations

import torch

from surge.errors import InvalidArgumentError
from surge.quant.grid import (
    DEFAULT_PERCENTILE,
    Grid,
    QuantizedWeight,
    fit_grid,
    group_size_of,
)
from surge.layers.quantization.schemes import Scheme

BLOCK = 128  # a multiple of every group size, so a group never straddles two blocks
DEFAULT_DAMP = 0.01  # of the mean diagonal, added to H: keeps the Cholesky stable


def gptq(w: torch.Tensor, hessian: torch.Tensor, scheme: Scheme, act_order: bool = False,
         damp: float = DEFAULT_DAMP, grid_method: str = "rtn", percentile: float = DEFAULT_PERCENTILE,
         name: str = "weight", static_groups: bool = False) -> QuantizedWeight:
    """w [N, K] quantized to `scheme` with error compensation under H [K, K]; each group's grid
    is fitted by `grid_method` (rtn: min-max, percentile, mse)."""
    if not 0 < damp < 1:
        raise InvalidArgumentError(f"GPTQ damping must be in (0, 1), got {damp}")
    scheme = scheme.weight_scheme
    W = w.float().clone()
    n, k = W.shape
    if hessian.shape != (k, k):
        raise ValueError(f"{name}: Hessian {tuple(hessian.shape)} does not match the weight's {k} columns")
    g = group_size_of(scheme, k, name)
    H = hessian.double().clone()
    dead = torch.diagonal(H) == 0  # inputs that were always zero: their columns do not matter
    H[dead, dead] = 1
    W[:, dead] = 0
    importance = torch.diagonal(H).float()

    static = static_groups or act_order or g == k
    if static:
        grid = fit_grid(W, scheme, grid_method, importance, percentile, name)
    else:
        groups = k // g
        grid = Grid(torch.empty(n, groups), torch.empty(n, groups), g, scheme.kind)
    perm = torch.argsort(torch.diagonal(H), descending=True) if act_order else torch.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.diagonal(H).mean() * torch.eye(k, dtype=H.dtype)
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    except torch.linalg.LinAlgError as exc:
        raise InvalidArgumentError(f"{name}: the calibration Hessian is not positive definite even with "
                                   f"damping {damp}; use more calibration text or a larger damping") from exc
    order = perm.tolist()
    Q = torch.empty_like(W)
    for b0 in range(0, k, BLOCK):
        b1 = min(b0 + BLOCK, k)
        Wb, Ub = W[:, b0:b1].clone(), U[b0:b1, b0:b1]
        Eb = torch.empty_like(Wb)
        for i in range(b1 - b0):
            col = order[b0 + i]
            if not static and col % g == 0:  # without act_order, col == b0 + i
                part = fit_grid(Wb[:, i : i + g], scheme, grid_method, importance[col : col + g], percentile, name)
                grid.scale[:, col // g], grid.zero[:, col // g] = part.scale[:, 0], part.zero[:, 0]
            wj = Wb[:, i]
            qj = grid.column(wj, col)
            Q[:, b0 + i] = qj
            err = (wj - qj) / Ub[i, i]
            Wb[:, i + 1 :] -= err.unsqueeze(1) * Ub[i, i + 1 :].unsqueeze(0)
            Eb[:, i] = err
        W[:, b1:] -= Eb @ U[b0:b1, b1:]
    Q = Q[:, torch.argsort(perm)]
    return grid.weight(grid.codes(Q))
