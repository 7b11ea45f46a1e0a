"""Token sampling for a batch of requests, each with its own settings and random generator.

Order of operations (vLLM's): logit bias, min-tokens ban, penalties -> greedy argmax, or
temperature -> min-p -> top-k -> top-p -> sample (inverse CDF: one uniform a row, from the
request's own generator when it has a seed). Logprobs are those of the raw model distribution
(before any of it; a grammar's mask comes first, see Sampler).

No accepted setting may produce a NaN or inf probability (a tiny repetition penalty or
temperature overflows float32): scaled logits are clamped to float32's range, the most likely
token always survives the filters, and a row whose distribution still degenerates is decoded
greedily instead of failing the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy
import torch

from surge.core.runner_output import TokenLogprobs
from surge.layers.native import native_ops
from surge.sampling_params import SamplingParams


@dataclass(slots=True)
class SamplingRow:
    """What the sampler needs of one request: its settings and its tokens so far."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt_ids: list[int]
    output_ids: list[int]

    def context(self) -> list[int]:
        """Every known token of the request: its prompt, then its output."""
        return self.prompt_ids + self.output_ids


class DeferredMask(Protocol):
    """A constrained row whose bitmask is computed only on demand (surge.structured.manager)."""

    def allows(self, token: int) -> bool: ...

    def resolve(self, group: list["DeferredMask"]) -> numpy.ndarray: ...  # bitmask rows of `group`


def mask_commutes(params: SamplingParams, vocab: int) -> bool:
    """Whether sampling this row as if free, then keeping the token when the grammar allows it
    and otherwise sampling again from the masked logits, draws from the masked distribution.
    Greedy: the first maximum, when allowed, is the first allowed maximum. Temperature alone:
    p(t) + P(refused) p(t) / Z = p(t) / Z, Z the allowed mass. Top-k/p and min-p choose their
    set from the whole row (masked first, the set differs); logprobs are of the masked row."""
    if params.logprobs is not None:
        return False
    return params.greedy or ((params.top_k == 0 or params.top_k >= vocab) and params.top_p >= 1.0
                             and params.min_p == 0.0)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(-1)` of float32 logits [N, V], the same indices (first maximum, a NaN
    winning). On CPU the native kernel (csrc/sampling.cpp): PyTorch's CPU argmax is a scalar
    loop, ~1.2 ms a step at batch 32 with this vocabulary."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2 \
            and logits.shape[1] > 0 and logits.stride(1) == 1:
        ops = native_ops()
        if ops is not None:
            return ops.argmax_rows(logits)
    return logits.argmax(-1)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """In place: logits[rows[i], t] = -inf where bit t of bitmask[i] (int32 words) is clear. On
    CPU the native kernel (csrc/sampling.cpp); elsewhere the bits unpacked with tensor ops."""
    index = torch.tensor(rows, dtype=torch.long)
    ops = native_ops() if logits.device.type == "cpu" else None
    if ops is not None and logits.dtype == torch.float32 and logits.dim() == 2 and logits.stride(1) == 1:
        ops.apply_token_bitmask(logits, bitmask.contiguous(), index)
        return
    vocab = logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).view(bitmask.shape[0], -1)[:, :vocab].bool()
    if allowed.shape[1] < vocab:  # tokens past the bitmask: not allowed
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))
    index = index.to(logits.device)
    logits[index] = logits[index].masked_fill(~allowed.to(logits.device), float("-inf"))


def token_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, top_n: list[int]) -> list[TokenLogprobs]:
    """For each row: the chosen token's logprob and rank, and the `top_n[row]` best alternatives."""
    chosen = logprobs.gather(1, token_ids.view(-1, 1)).squeeze(1)
    ranks = (logprobs > chosen.unsqueeze(1)).sum(1) + 1
    k = max(top_n, default=0)
    top_vals, top_idx = (logprobs.topk(k, dim=1) if k else (None, None))
    out = []
    chosen_l, ranks_l, ids_l = chosen.tolist(), ranks.tolist(), token_ids.tolist()
    top_vals_l = top_vals.tolist() if top_vals is not None else None
    top_idx_l = top_idx.tolist() if top_idx is not None else None
    for row, n in enumerate(top_n):
        ids, vals = (top_idx_l[row][:n], top_vals_l[row][:n]) if n else ([], [])
        while vals and vals[-1] == float("-inf"):  # a token a grammar rules out is no alternative
            ids, vals = ids[:-1], vals[:-1]
        out.append(TokenLogprobs(ids_l[row], chosen_l[row], ranks_l[row], ids, vals))
    return out


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow], eos_ids: frozenset[int]) -> None:
    """In place: logit bias, min-tokens ban, repetition / presence / frequency penalties."""
    vocab = logits.shape[1]
    for i, row in enumerate(rows):
        p = row.params
        if p.logit_bias:
            ids = torch.tensor([t for t in p.logit_bias if 0 <= t < vocab], dtype=torch.long)
            if ids.numel():
                bias = torch.tensor([p.logit_bias[t] for t in ids.tolist()], dtype=logits.dtype)
                logits[i].index_add_(0, ids, bias)
        if len(row.output_ids) < p.min_tokens:
            banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_ids))
            banned_ids = [t for t in banned if 0 <= t < vocab]
            if banned_ids:
                logits[i, banned_ids] = float("-inf")
        if not p.has_penalties:
            continue
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(row.prompt_ids) | set(row.output_ids)), dtype=torch.long)
            vals = logits[i, seen]
            logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and row.output_ids:
            counts = torch.bincount(torch.tensor(row.output_ids, dtype=torch.long), minlength=vocab)[:vocab]
            counts = counts.to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what min-p, top-k and top-p exclude, row by row; inputs are [R] tensors.

    top_k 0 means no limit. A token is dropped by top-p when the mass of the tokens ranked
    above it already reaches top_p, so the most likely token always stays.
    """
    if bool((min_p > 0).any()):
        probs = logits.softmax(-1)
        floor = min_p.unsqueeze(1) * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    need_k = bool((top_k > 0).any())
    need_p = bool((top_p < 1.0).any())
    if not (need_k or need_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if need_k:
        ranks = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)
        k = torch.where(top_k > 0, top_k, logits.shape[1]).unsqueeze(1)
        drop |= ranks >= k
    if need_p:
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
        drop |= (probs.cumsum(-1) - probs) >= top_p.unsqueeze(1)
    drop[:, 0] = False  # the most likely token stays whatever top_p (0 in float32) or top_k say
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution each row of `logits` [R, V] is sampled from under its settings:
    temperature, then min-p, top-k and top-p (float32; see usable_rows for the degenerate)."""
    vocab = logits.shape[1]
    sub = logits / torch.tensor([p.temperature for p in params]).unsqueeze(1)
    sub = filter_logits(
        finite_logits(sub),
        torch.tensor([min(p.top_k, vocab) for p in params]),  # beyond the vocabulary: all
        torch.tensor([p.top_p for p in params]),
        torch.tensor([p.min_p for p in params]),
    )
    return sub.softmax(-1)


def usable_rows(probs: torch.Tensor) -> torch.Tensor:
    """[R] bool: the rows of sampling_probs that can be sampled (not NaN logits from the model)."""
    total = probs.sum(-1)  # NaN anywhere in a row makes it NaN (softmax gives no inf)
    return torch.isfinite(total) & (total > 0)


def uniform(generator: torch.Generator | None) -> float:
    """One draw in [0, 1), from the request's own stream when it has a seed."""
    return float(torch.rand(1, generator=generator)[0])


CDF_BLOCK = 256  # tokens a block in inverse_cdf


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One draw a row of `probs` [R, V] (non-negative; a row need not sum to 1) from `uniforms`
    [R] in [0, 1): the first token whose running sum exceeds u times the row's total, so a
    token of probability 0 is never drawn. Two levels, the running sums in float64: over the
    blocks of CDF_BLOCK tokens (each block's mass a float32 sum), then over the tokens of the
    chosen block (a float64 copy of the whole row costs more than the rest of sampling;
    torch.multinomial ~1 ms a row for a 49k vocabulary on CPU)."""
    rows, vocab = probs.shape
    pad = (-vocab) % CDF_BLOCK
    blocks = (torch.nn.functional.pad(probs, (0, pad)) if pad else probs.contiguous()).view(
        rows, (vocab + pad) // CDF_BLOCK, CDF_BLOCK)
    cdf = blocks.sum(-1).to(torch.float64).cumsum(-1)  # [R, blocks]
    x = uniforms.to(torch.float32).to(torch.float64) * cdf[:, -1]  # below the total: u < 1
    block = torch.searchsorted(cdf, x.unsqueeze(1), right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)
    before = torch.where(block > 0, cdf.gather(1, (block - 1).clamp(min=0).unsqueeze(1)).squeeze(1), 0.0)
    inner = blocks[torch.arange(rows), block]  # [R, CDF_BLOCK]
    within = torch.searchsorted(inner.to(torch.float64).cumsum(-1), (x - before).unsqueeze(1), right=True).squeeze(1)
    # rounding past the block's end: its last token that can be drawn
    last = torch.where(inner > 0, torch.arange(CDF_BLOCK), -1).max(-1).values
    return block * CDF_BLOCK + torch.minimum(within, last)


def finite_logits(logits: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf (never chosen), +inf -> float32's largest (still the favourite, softmax stays finite)."""
    big = torch.finfo(logits.dtype).max
    return torch.nan_to_num(logits, nan=float("-inf"), posinf=big, neginf=float("-inf"))


def any_penalties(rows: list[SamplingRow]) -> bool:
    return any(r.params.logit_bias or r.params.has_penalties or r.params.min_tokens for r in rows)


class Sampler:
    """Samples one token per row of logits [N, vocab].

    `allowed` (per row, or None): a constrained request's grammar bitmask. It masks the logits
    first, so logprobs are those of the constrained distribution and every filter works on the
    allowed tokens only; where min_tokens would ban the only tokens the grammar allows (its end),
    the grammar wins. A DeferredMask row whose settings commute with the mask (mask_commutes)
    is sampled as if free first and masked only when the grammar refuses its token: the same
    token greedily, the same distribution otherwise, without computing most masks.
    """

    def __call__(
        self, logits: torch.Tensor, rows: list[SamplingRow], eos_ids: frozenset[int] = frozenset(),
        allowed: list[numpy.ndarray | DeferredMask | None] | None = None,
    ) -> tuple[list[int], list[TokenLogprobs | None]]:
        if logits.dtype != torch.float32:
            logits = logits.float()
        deferred = [i for i, a in enumerate(allowed or ()) if a is not None and not isinstance(a, numpy.ndarray)]
        if not deferred:
            return self._sample(logits, rows, eos_ids, allowed)
        assert allowed is not None
        allowed = list(allowed)
        vocab = logits.shape[1]
        late = [i for i in deferred if mask_commutes(rows[i].params, vocab)]
        late_at = {i: j for j, i in enumerate(late)}
        early = [i for i in deferred if i not in late_at]
        if early:  # these need their whole row first
            bits = allowed[early[0]].resolve([allowed[i] for i in early])  # type: ignore[union-attr]
            for j, i in enumerate(early):
                allowed[i] = bits[j]
        lazy = {i: allowed[i] for i in late}
        for i in late:
            allowed[i] = None
        # the first pass may change the logits in place (penalties): keep what a second one needs
        kept = logits[late] if late and any_penalties(rows) else None  # indexing by a list copies
        tokens, logprobs = self._sample(logits, rows, eos_ids, allowed)
        refused = [i for i in late if not lazy[i].allows(tokens[i])]  # type: ignore[union-attr]
        if refused:
            bits = lazy[refused[0]].resolve([lazy[i] for i in refused])  # type: ignore[union-attr]
            again = kept[[late_at[i] for i in refused]] if kept is not None else logits[refused]
            picks, _ = self._sample(again, [rows[i] for i in refused], eos_ids, list(bits))
            for i, token in zip(refused, picks):
                tokens[i] = token
        return tokens, logprobs

    def _sample(
        self, logits: torch.Tensor, rows: list[SamplingRow], eos_ids: frozenset[int],
        allowed: list[numpy.ndarray | DeferredMask | None] | None,
    ) -> tuple[list[int], list[TokenLogprobs | None]]:
        masked = [i for i, a in enumerate(allowed or ()) if a is not None]
        if masked:  # in place: the logits are this step's own
            assert allowed is not None
            rows_bits = [allowed[i] for i in masked]
            bits = numpy.stack(rows_bits) if len(rows_bits) > 1 else rows_bits[0][None]
            apply_token_bitmask(logits, torch.from_numpy(bits), masked)
        want_logprobs = [r.params.logprobs is not None for r in rows]
        raw_logprobs = logits.log_softmax(-1) if any(want_logprobs) else None
        if any_penalties(rows):
            before = logits[masked].clone() if masked else None
            logits = logits if masked else logits.clone()
            apply_penalties(logits, rows, eos_ids)
            if before is not None:
                dead = ~torch.isfinite(logits[masked]).any(-1)
                for j in dead.nonzero().flatten().tolist():
                    logits[masked[j]] = before[j]  # nothing left but what min_tokens banned
        tokens = argmax_rows(logits)
        random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        if random_rows:
            idx = torch.tensor(random_rows, dtype=torch.long)
            chosen = logits if len(random_rows) == len(rows) else logits[idx]  # a new tensor below either way
            probs = sampling_probs(chosen, [rows[i].params for i in random_rows])
            # a row with nothing finite left (NaN logits from the model) keeps its greedy token
            ok = usable_rows(probs)
            if not bool(ok.all()):
                keep = ok.tolist()
                random_rows = [i for i, good in zip(random_rows, keep) if good]
                probs = probs[ok]
                idx = idx[ok]
            if random_rows:
                # one uniform a row; a seeded row draws it from its own stream (the same seed
                # gives the same tokens in any batch)
                uniforms = torch.rand(len(random_rows))
                for j, i in enumerate(random_rows):
                    gen = rows[i].generator
                    if gen is not None:
                        uniforms[j] = uniform(gen)
                tokens[idx] = inverse_cdf(probs, uniforms)
        logprobs: list[TokenLogprobs | None] = [None] * len(rows)
        if raw_logprobs is not None:
            sel = [i for i, w in enumerate(want_logprobs) if w]
            sel_t = torch.tensor(sel, dtype=torch.long)
            infos = token_logprobs(raw_logprobs[sel_t], tokens[sel_t], [rows[i].params.logprobs for i in sel])
            for i, info in zip(sel, infos):
                logprobs[i] = info
        return tokens.tolist(), logprobs
