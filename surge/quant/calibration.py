"""Calibration statistics: each linear's input second moments H = E[x x^T] and per-column
ranges max |x_k| over a text, gathered by running the float model over the text's windows
through the engine's own layers.

GPTQ needs the whole H; the MSE clipping search weighs each input column by its diagonal
E[x_k^2] (the same statistic as llama.cpp's importance matrix); W8A8's smoothing factors come
from the column ranges (surge/quant/activations.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from surge.errors import InvalidArgumentError
from surge.quant.evaluate import WindowRunner, _progress, plan_windows


@dataclass
class Calibration:
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)  # module path -> [K, K] float64 sums
    channel_max: dict[str, torch.Tensor] = field(default_factory=dict)  # module path -> [K] max |x_k|
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


def observe_inputs(runner: WindowRunner, ids: list[int], modules: dict[str, nn.Module],
                   observe: Callable[[str, torch.Tensor], None], progress: bool = False) -> int:
    """Run the model over windows of runner.ctx tokens of `ids`, calling observe(path, x [T, K])
    with the inputs of every module in `modules` ("lm_head": the final hidden states); returns
    the tokens run."""
    def hook(path: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def pre(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            observe(path, args[0].reshape(-1, args[0].shape[-1]))
        return pre

    handles = [m.register_forward_pre_hook(hook(p)) for p, m in modules.items() if p != "lm_head"]
    tokens = 0
    try:
        for w in _progress(plan_windows(len(ids), runner.ctx), progress):
            hidden = runner.hidden(ids[w.start : w.end])
            if "lm_head" in modules:
                observe("lm_head", hidden)
            tokens += w.end - w.start
    finally:
        for h in handles:
            h.remove()
    return tokens


def calibrate(runner: WindowRunner, ids: list[int], modules: dict[str, nn.Module], progress: bool = False,
              hessians: Iterable[str] | None = None, ranges: Iterable[str] = ()) -> Calibration:
    """Sum x x^T of the inputs of the modules in `hessians` (default: all of `modules`, path ->
    nn.Linear of the float model) and max |x_k| of those in `ranges`, over windows of
    runner.ctx tokens of `ids`; "lm_head" gets the final hidden states."""
    need = min_calibration_tokens(getattr(m, "in_features", 1) for m in modules.values())
    if len(ids) < need:
        raise InvalidArgumentError(
            f"the calibration text has {len(ids)} tokens; at least {need} are needed (as many as the widest "
            "quantized linear has inputs, or its input statistics are rank-deficient)")
    calib = Calibration()
    for path in modules if hessians is None else hessians:
        k = modules[path].in_features  # type: ignore[union-attr]
        calib.hessians[path] = torch.zeros(k, k, dtype=torch.float64)
    for path in ranges:
        calib.channel_max[path] = torch.zeros(modules[path].in_features)  # type: ignore[union-attr]

    def observe(path: str, x: torch.Tensor) -> None:
        if path in calib.hessians:
            xd = x.double()
            calib.hessians[path].addmm_(xd.t(), xd)
        if path in calib.channel_max:
            torch.maximum(calib.channel_max[path], x.detach().abs().amax(0).float(), out=calib.channel_max[path])

    watched = {p: m for p, m in modules.items() if p in calib.hessians or p in calib.channel_max}
    calib.tokens = observe_inputs(runner, ids, watched, observe, progress)
    return calib
