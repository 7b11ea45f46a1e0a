"""Verifying proposed tokens: rejection sampling keeps the target's distribution whatever
proposed the tokens; greedy verification gives plain greedy decoding's tokens."""

from __future__ import annotations

import pytest
import torch

from surge.layers.rejection_sampler import accept_or_resample, residual, verify
from surge.layers.sampler import Sampler, SamplingRow, apply_penalties, inverse_cdf, sampling_probs
from surge.sampling_params import SamplingParams

DRAWS = 1_000_000


def total_variation(tokens: torch.Tensor, p: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=p.numel()).double()
    return 0.5 * float((counts / counts.sum() - p.double()).abs().sum())


@pytest.mark.parametrize("proposer", ["one_hot", "distribution"])
def test_accept_or_resample_draws_from_the_target(proposer: str):
    """10^6 draws: a token proposed from q (or a fixed one-hot proposal), kept or replaced,
    is distributed as p (total variation under 0.01)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.05, 0.3, 0.02, 0.25, 0.0, 0.18, 0.2])
    if proposer == "one_hot":  # an n-gram's proposal: always token 1
        q, draft = None, torch.ones(DRAWS, dtype=torch.long)
    else:  # a draft model's: its own (very different) distribution
        q_row = torch.tensor([0.4, 0.05, 0.3, 0.05, 0.1, 0.05, 0.05])
        draft = torch.multinomial(q_row, DRAWS, replacement=True, generator=gen)
        q = q_row.expand(DRAWS, -1)
    u_accept = torch.rand(DRAWS, generator=gen)
    u_resample = torch.rand(DRAWS, generator=gen)
    accepted, tokens = accept_or_resample(p.expand(DRAWS, -1), draft, u_accept, u_resample, q)
    assert total_variation(tokens, p) < 0.01
    assert int(tokens.eq(4).sum()) == 0  # probability 0 is never drawn, from the residual either
    expected = float(p[1]) if q is None else float(torch.minimum(p, q_row).sum())
    assert float(accepted.float().mean()) == pytest.approx(expected, abs=0.003)


def test_drawing_and_comparing_is_the_one_hot_rejection_sampler():
    """verify's form for a certain proposal d: t ~ p, accepted iff t == d. 10^6 draws: accepted
    with probability p(d), the refused draws distributed as p without d (within 0.01)."""
    gen = torch.Generator().manual_seed(1)
    p = torch.tensor([0.05, 0.3, 0.02, 0.25, 0.0, 0.18, 0.2])
    tokens = inverse_cdf(p.expand(DRAWS, -1), torch.rand(DRAWS, generator=gen))
    accepted = tokens.eq(1)
    assert float(accepted.float().mean()) == pytest.approx(0.3, abs=0.003)
    rest = p.clone()
    rest[1] = 0
    assert total_variation(tokens[~accepted], rest / rest.sum()) < 0.01


def test_verify_draws_the_tokens_plain_sampling_draws():
    """Seeded: the same uniforms in the same order as the sampler, so the same tokens; a refused
    proposal's row gives the token plain sampling gives there."""
    torch.manual_seed(3)
    logits = torch.randn(5, 40) * 3
    params = SamplingParams(max_tokens=32, temperature=0.8, top_p=0.9, seed=21)
    plain, out = [], [4]
    gen = torch.Generator().manual_seed(21)
    for j in range(5):
        token, _ = Sampler()(logits[j:j + 1].clone(), [SamplingRow(params, gen, [1, 2], list(out))])
        plain += token
        out += token
    row = lambda: SamplingRow(params, torch.Generator().manual_seed(21), [1, 2], [4])  # noqa: E731
    assert verify(logits, row(), plain[:4], frozenset()) == plain  # all accepted, the same bonus
    wrong = plain[:2] + [(plain[2] + 1) % 40, plain[3]]
    assert verify(logits, row(), wrong, frozenset()) == plain[:3]  # refused at 2: plain's token there


def test_residual_of_a_certain_proposal_and_of_an_equal_distribution():
    p = torch.tensor([[0.2, 0.5, 0.3]])
    assert torch.equal(residual(p, torch.tensor([1])), torch.tensor([[0.2, 0.0, 0.3]]))
    # p == q leaves no mass: the proposal is always accepted, the (unused) residual is p itself
    assert torch.equal(residual(p, torch.tensor([1]), p.clone()), p)


def sampled_row(seed: int | None = None, **kw) -> SamplingRow:
    params = SamplingParams(max_tokens=64, seed=seed, **kw)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(params, gen, [1, 2, 3], [4])


def test_greedy_verification_accepts_the_argmax_prefix():
    logits = torch.full((4, 10), -5.0)
    for j, best in enumerate([7, 3, 9, 2]):
        logits[j, best] = 5.0
    row = sampled_row(temperature=0.0)
    assert verify(logits, row, [7, 3, 9], frozenset()) == [7, 3, 9, 2]  # all, and the bonus
    assert verify(logits, row, [7, 4, 9], frozenset()) == [7, 3]  # the first refused is replaced
    assert verify(logits, row, [1, 3, 9], frozenset()) == [7]
    assert verify(logits[:1], row, [], frozenset()) == [7]


def test_penalties_count_the_proposals_before_each_row():
    """Row j is processed as plain decoding would process it: with d_1..d_j among the output."""
    logits = torch.zeros(3, 8)
    logits[:, 5] = 1.0  # token 5 the favourite everywhere ...
    logits[:, 6] = 0.9
    row = sampled_row(temperature=0.0, presence_penalty=0.5)
    # ... until it is among the output: row 1 (after proposal 5) prefers 6
    assert verify(logits, row, [5, 5], frozenset()) == [5, 6]
    # and the same rows through the sampler's own penalties, row by row, agree
    expected = []
    for j, prior in enumerate([[], [5]]):
        one = logits[j:j + 1].clone()
        apply_penalties(one, [SamplingRow(row.params, None, row.prompt_ids, row.output_ids + prior)], frozenset())
        expected.append(int(one.argmax()))
    assert expected == [5, 6]


def test_min_tokens_bans_the_end_until_its_row():
    logits = torch.zeros(3, 8)
    logits[:, 0] = 3.0  # the end of sequence would win
    row = SamplingRow(SamplingParams(max_tokens=9, temperature=0.0, min_tokens=3), None, [1], [4])
    # row 0: 1 output token, row 1: 2 (banned still), row 2: 3 (allowed)
    assert verify(logits, row, [1, 1], frozenset({0})) == [1, 1, 0]


def test_seeded_verification_is_reproducible_and_follows_the_target():
    torch.manual_seed(0)
    logits = torch.randn(5, 50) * 2
    draft = [int(t) for t in logits[:4].argmax(-1)]
    runs = [verify(logits, sampled_row(seed=7, temperature=0.8, top_p=0.9), draft, frozenset()) for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]
    # the first token over many seeds: distributed as the target's first row (temperature, top-p)
    params = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9)
    target = sampling_probs(logits[:1], [params])[0]
    firsts = torch.tensor([verify(logits, sampled_row(seed=s, temperature=0.8, top_p=0.9), draft, frozenset())[0]
                           for s in range(4000)])
    assert total_variation(firsts, target) < 0.05


def test_a_row_of_nan_verifies_greedily_as_the_sampler_decodes_it():
    logits = torch.full((3, 6), -30.0)
    logits[:, 2] = 30.0
    logits[1] = float("nan")  # nothing finite: the sampler decodes such a row greedily (a NaN wins)
    assert verify(logits, sampled_row(seed=1, temperature=1.0), [2, 2], frozenset()) == [2, 0]
