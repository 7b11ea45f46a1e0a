"""Calibration statistics: each linear's input second moments H = E[x x^T] over a text, gathered
by running the float model over the text's windows through the engine's own layers.

GPTQ needs the whole H; the MSE clipping search weighs each input column by its diagonal
E[x_k^2] (the same statistic as llama.cpp's importance matrix).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from surge.errors import InvalidArgumentError
from surge.quant.evaluate import WindowRunner, _progress, plan_windows


@dataclass
class Calibration:
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)  # module path -> [K, K] float64 sums
    tokens: int = 0

    def hessian(self, path: str) -> torch.Tensor:
        """E[x x^T] of the inputs of `path`."""
        return (self.hessians[path] / max(self.tokens, 1)).float()

    def importance(self, path: str) -> torch.Tensor:
        return torch.diagonal(self.hessians[path]).float() / max(self.tokens, 1)


def min_calibration_tokens(widths: Iterable[int]) -> int:
    """Fewer tokens than a linear has inputs leave its H rank-deficient: GPTQ then only
    compensates errors within the span the text happened to reach."""
    return max(widths, default=1)


def calibrate(runner: WindowRunner, ids: list[int], modules: dict[str, nn.Module],
              progress: bool = False) -> Calibration:
    """Sum x x^T of the inputs of every module in `modules` (path -> nn.Linear of the float
    model) over windows of runner.ctx tokens of `ids`; "lm_head" gets the final hidden states."""
    need = min_calibration_tokens(getattr(m, "in_features", 1) for m in modules.values())
    if len(ids) < need:
        raise InvalidArgumentError(
            f"the calibration text has {len(ids)} tokens; at least {need} are needed (as many as the widest "
            "quantized linear has inputs, or its input statistics are rank-deficient)")
    calib = Calibration()
    for path, module in modules.items():
        k = module.in_features  # type: ignore[union-attr]
        calib.hessians[path] = torch.zeros(k, k, dtype=torch.float64)

    def hook(path: str):
        def accumulate(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            calib.hessians[path].addmm_(x.t(), x)
        return accumulate

    handles = [m.register_forward_pre_hook(hook(p)) for p, m in modules.items() if p != "lm_head"]
    try:
        for w in _progress(plan_windows(len(ids), runner.ctx), progress):
            hidden = runner.hidden(ids[w.start : w.end])
            if "lm_head" in modules:
                x = hidden.double()
                calib.hessians["lm_head"].addmm_(x.t(), x)
            calib.tokens += w.end - w.start
    finally:
        for h in handles:
            h.remove()
    return calib
