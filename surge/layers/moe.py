"""Mixture-of-experts MLP: a router picks top-k experts per token, and only the experts that
received tokens run, each on its own tokens.

The experts' weights are one stacked tensor per projection, the layout expert parallelism
shards along its first dimension:

    gate_up_proj  [E, 2 I, H]   rows 0..I-1 the gate, I..2I-1 the up projection
    down_proj     [E, H, I]

Quantization (surge/layers/quantization/apply.py) replaces them with one linear module per
expert and projection (`use_expert_linears`); this module knows nothing of their formats.
"""

from __future__ import annotations

import itertools
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from surge.layers.activation import get_activation


class FloatLinear(nn.Module):
    """y = x W^T in float32, for the small matrices whose outputs decide rather than compute
    (the router's logits, a shared expert's gate): never quantized, never in bf16."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())


class TopKRouter(FloatLinear):
    """Softmax over the experts' logits, the top k kept (ties to the lower index, as
    torch.topk), renormalised to sum to 1 where the model does (Mixtral, Qwen3-MoE)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, renormalize: bool):
        super().__init__(hidden_size, num_experts)
        self.top_k, self.renormalize = top_k, renormalize

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] float32, expert ids [T, k])."""
        probs = torch.softmax(self(x), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids


# torch.compile cannot trace the loop over the experts that received tokens (its trip count is
# data): compiled graphs call it as an opaque op that finds the module by a handle.
_MODULES: dict[int, "weakref.ref[FusedExperts]"] = {}
_handles = itertools.count()


@torch.library.custom_op("surge::moe_experts", mutates_args=())
def moe_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, handle: torch.Tensor) -> torch.Tensor:
    module = _MODULES[int(handle)]()
    assert module is not None
    return module.run(x, weights, ids)


@moe_experts.register_fake
def _moe_experts_fake(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, handle: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class FusedExperts(nn.Module):
    """E gated MLPs (act(x G^T) * x U^T) D^T with stacked weights; forward runs the experts
    that received tokens and sums their outputs weighted by the router."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, act: str, dtype: torch.dtype | None = None,
                 first_expert: int = 0, router_experts: int | None = None):
        super().__init__()
        # experts first_expert.. first_expert + num_experts - 1 of the router's (expert parallelism:
        # a rank's share; the tokens routed elsewhere are another rank's)
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.first_expert = first_expert
        self.partial = router_experts not in (None, num_experts)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, dtype=dtype))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, dtype=dtype))
        self.act = get_activation(act)
        self.expert_linears: nn.ModuleList | None = None  # [(gate_up, down)] per expert once quantized
        self._key = next(_handles)
        _MODULES[self._key] = weakref.ref(self)
        weakref.finalize(self, _MODULES.pop, self._key, None)
        self.register_buffer("handle", torch.tensor(self._key), persistent=False)

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202
        # a model built on the meta device is moved with to_empty: write the handle again
        module = super()._apply(fn, recurse)
        if self.handle.device.type != "meta":
            with torch.no_grad():
                self.handle.fill_(self._key)
        return module

    def use_expert_linears(self, gate_up: list[nn.Module], down: list[nn.Module]) -> None:
        """Run expert e through gate_up[e] and down[e] (modules taking x [n, H] and [n, I])
        instead of the stacked float weights, which are dropped."""
        assert len(gate_up) == len(down) == self.num_experts
        self.expert_linears = nn.ModuleList(nn.ModuleList(pair) for pair in zip(gate_up, down))
        del self.gate_up_proj, self.down_proj

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.expert_linears is not None:
            gate_up, down = self.expert_linears[e]
            gate, up = gate_up(x).split(self.intermediate_size, dim=-1)
            return down(self.act(gate) * up)
        gate, up = F.linear(x, self.gate_up_proj[e]).split(self.intermediate_size, dim=-1)
        return F.linear(self.act(gate) * up, self.down_proj[e])

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], router weights and expert ids [T, k] -> [T, H] in x's dtype."""
        if torch.compiler.is_compiling():
            return torch.ops.surge.moe_experts(x, weights, ids, self.handle)
        return self.run(x, weights, ids)

    def run(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        top_k = ids.shape[1]
        flat = ids.reshape(-1)
        if self.partial:
            flat = flat - self.first_expert
            flat = torch.where((flat >= 0) & (flat < self.num_experts), flat, self.num_experts)  # others: last bin
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()[: self.num_experts]
        pair_weights = weights.reshape(-1)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            pairs = order[start:start + n]
            start += n
            tokens = pairs // top_k
            y = self._expert(e, x[tokens]).float() * pair_weights[pairs].unsqueeze(1)
            out.index_add_(0, tokens, y)
        return out.to(x.dtype)


class SparseMoeBlock(nn.Module):
    """Router + experts, and optionally a shared expert every token runs through, scaled by
    sigmoid(x g) (Qwen2-MoE). `shared_expert` is any MLP module (the model's own)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int, act: str,
                 renormalize: bool, shared_expert: nn.Module | None = None,
                 expert_range: tuple[int, int] | None = None):
        super().__init__()
        self.gate = TopKRouter(hidden_size, num_experts, top_k, renormalize)
        first, end = expert_range or (0, num_experts)
        self.experts = FusedExperts(end - first, hidden_size, intermediate_size, act, first_expert=first,
                                    router_experts=num_experts)
        self.shared_expert = shared_expert
        self.shared_expert_gate = FloatLinear(hidden_size, 1) if shared_expert is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate.route(x)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None:
            shared = self.shared_expert(x).float() * torch.sigmoid(self.shared_expert_gate(x))
            out = (out.float() + shared).to(x.dtype)
        return out
