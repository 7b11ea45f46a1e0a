"""Token sampling for a batch of requests, each with its own settings and random generator."""

from __future__ import annotations

import torch

from surge.sampling_params import SamplingParams


def apply_top_k_top_p_min_p(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens outside top-k, the top-p nucleus and the min-p floor of one row."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


class Sampler:
    """Samples one token per row of logits [N, vocab]; rows with seeds use their own generator."""

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> list[int]:
        tokens: list[int] = []
        greedy = logits.argmax(-1).tolist()
        for row, (p, gen) in enumerate(zip(params, generators)):
            if p.greedy:
                tokens.append(greedy[row])
                continue
            scaled = apply_top_k_top_p_min_p(logits[row].float() / p.temperature, p.top_k, p.top_p, p.min_p)
            probs = scaled.softmax(-1)
            tokens.append(int(torch.multinomial(probs, 1, generator=gen)))
        return tokens
