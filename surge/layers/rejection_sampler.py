"""Verifying proposed tokens (speculative decoding): how many of a request's proposed tokens
the target model accepts, and the token after them, so that what it outputs is distributed
exactly as without speculation, whatever proposed the tokens.

A request that proposed d_1..d_k brings k + 1 rows of logits: row j is the target's
distribution p_j for the token after d_1..d_j (row 0: after the context). Each row is
processed as the sampler would process it at that point (logit bias, min-tokens ban and
penalties counting the proposals before it; temperature, min-p, top-k, top-p).

  greedy:   d_j accepted while it is row j-1's argmax; the first argmax that differs (or the
            last row's, when all are accepted) is the next token: the tokens plain greedy
            decoding gives.
  sampled:  rejection sampling (Leviathan et al., Chen et al.): d_j accepted with probability
            min(1, p(d_j) / q(d_j)); the first refused one is replaced by a draw from
            norm(max(0, p - q)); when all are accepted a bonus token is drawn from the last row
            (`accept_or_resample`, for proposals drawn from a distribution q).
            N-gram proposals are certain (q one-hot at d_j): accepted with probability p(d_j),
            otherwise a draw from p without d_j. That is exactly "draw t from p_j, accept iff
            t == d_j", which `verify` does with one uniform a token, in order, from the
            request's generator when it is seeded: the tokens plain sampling draws from the
            same logits and the same stream, so a seeded request gives the same tokens with or
            without speculation, in any batch.
"""

from __future__ import annotations

import torch

from surge.layers.sampler import (
    SamplingRow,
    any_penalties,
    apply_penalties,
    argmax_rows,
    inverse_cdf,
    sampling_probs,
    uniform,
    usable_rows,
)


def residual(p: torch.Tensor, draft: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
    """What a refused proposal is replaced from: max(0, p - q) per row (unnormalised; q None:
    p without the proposed token). A row with no mass left (only with a proposal that is
    always accepted) is p itself."""
    if q is None:
        rest = p.scatter(1, draft.view(-1, 1), 0.0)
    else:
        rest = (p - q).clamp_(min=0.0)
    empty = ~(rest.sum(-1) > 0)
    if bool(empty.any()):
        rest[empty] = p[empty]
    return rest


def accept_or_resample(p: torch.Tensor, draft: torch.Tensor, u_accept: torch.Tensor, u_resample: torch.Tensor,
                       q: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One rejection-sampling test per row: p [N, V] the target's probabilities, draft [N] the
    proposed tokens, q [N, V] the proposer's (None: certain proposals), u_* [N] uniforms in
    [0, 1). Returns (accepted [N] bool, token [N]: the draft where accepted, else a draw from
    the normalised residual)."""
    p_draft = p.gather(1, draft.view(-1, 1)).squeeze(1)
    if q is None:
        accepted = u_accept < p_draft
    else:
        accepted = u_accept * q.gather(1, draft.view(-1, 1)).squeeze(1) < p_draft  # u < p / q, not dividing
    return accepted, torch.where(accepted, draft, inverse_cdf(residual(p, draft, q), u_resample))


def verify(logits: torch.Tensor, row: SamplingRow, draft: list[int], eos_ids: frozenset[int]) -> list[int]:
    """The tokens one request gains from its proposed `draft` (k tokens) and its k + 1 rows of
    float32 `logits`: the accepted proposals, then one more (1 to k + 1 tokens)."""
    k = len(draft)
    assert logits.shape[0] == k + 1, (logits.shape, k)
    params = row.params
    rows = [SamplingRow(params, row.generator, row.prompt_ids, row.output_ids + draft[:j]) for j in range(k + 1)]
    if any_penalties(rows):
        logits = logits.clone()
        apply_penalties(logits, rows, eos_ids)
    probs = None
    if not params.greedy:
        probs = sampling_probs(logits, [params] * (k + 1))
        if not bool(usable_rows(probs).all()):  # NaN logits: greedily, as the sampler does
            probs = None
    if probs is None:
        best = argmax_rows(logits).tolist()
        accepted = 0
        while accepted < k and draft[accepted] == best[accepted]:
            accepted += 1
        return draft[:accepted] + [best[accepted]]
    # A certain proposal's rejection test, drawn as plain sampling draws: t ~ p_j (one uniform,
    # inverse CDF), accepted iff t == d_j. P(accept) = p_j(d_j), and a refused row's t is a draw
    # from p_j without d_j, normalised: the residual. One uniform a token, in order, as plain
    # decoding takes them: a seeded request gives the tokens it gives without speculation.
    gen = row.generator
    tokens: list[int] = []
    for j in range(k + 1):
        token = int(inverse_cdf(probs[j:j + 1], torch.tensor([uniform(gen)]))[0])
        tokens.append(token)
        if j == k or token != draft[j]:
            break
    return tokens
