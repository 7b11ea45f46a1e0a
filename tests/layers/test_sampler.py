"""Sampler: every filter and penalty against a plain reference computation on fixed logits."""

from __future__ import annotations

import math

import pytest
import torch

from surge.layers.native import native_ops
from surge.layers.sampler import Sampler, SamplingRow, apply_penalties, argmax_rows, filter_logits, inverse_cdf
from surge.sampling_params import SamplingParams

LOGITS = [2.0, 1.0, 0.5, 0.0, -1.0, 3.0, -2.0, 1.5, 0.25, -0.5]
V = len(LOGITS)


def softmax(xs):
    m = max(x for x in xs if x != -math.inf)
    e = [math.exp(x - m) if x != -math.inf else 0.0 for x in xs]
    s = sum(e)
    return [v / s for v in e]


def reference_keep(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """Indices kept after temperature -> min-p -> top-k -> top-p, computed the obvious way."""
    xs = [x / temperature for x in logits]
    keep = set(range(len(xs)))
    if min_p > 0:
        probs = softmax(xs)
        keep = {i for i in keep if probs[i] >= min_p * max(probs)}
    order = sorted(keep, key=lambda i: -xs[i])
    if top_k:
        order = order[:top_k]
    if top_p < 1.0:
        probs = softmax([xs[i] if i in order else -math.inf for i in range(len(xs))])
        kept, mass = [], 0.0
        for i in order:
            if mass >= top_p:
                break
            kept.append(i)
            mass += probs[i]
        order = kept
    return set(order)


def kept(masked: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(masked)).flatten().tolist())


@pytest.mark.parametrize("top_k, top_p, min_p", [
    (3, 1.0, 0.0), (0, 0.8, 0.0), (0, 0.5, 0.0), (0, 1.0, 0.2), (4, 0.7, 0.0), (5, 0.9, 0.05), (1, 1.0, 0.0),
    (0, 0.01, 0.0), (20, 1.0, 0.0),
])
def test_filters_match_reference(top_k, top_p, min_p):
    rows = torch.tensor([LOGITS, [x * 0.5 for x in LOGITS]])
    out = filter_logits(rows, torch.tensor([top_k, 0]), torch.tensor([top_p, 1.0]), torch.tensor([min_p, 0.0]))
    assert kept(out[0]) == reference_keep(LOGITS, top_k=top_k, top_p=top_p, min_p=min_p)
    assert kept(out[1]) == set(range(V))  # a row without filters in the same batch is untouched


def _row(prompt=(), output=(), **kw) -> SamplingRow:
    return SamplingRow(SamplingParams(**kw), None, list(prompt), list(output))


def test_penalties_and_bias_match_reference():
    prompt, output = [0, 1, 1], [1, 5, 5, 5, 7]
    params = dict(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.25, logit_bias={3: 2.0, 9: -1.0})
    logits = torch.tensor([LOGITS])
    apply_penalties(logits, [_row(prompt, output, **params)], frozenset())
    want = list(LOGITS)
    want[3] += 2.0
    want[9] -= 1.0
    for t in set(prompt) | set(output):  # repetition: divide positive logits, multiply negative ones
        want[t] = want[t] / 1.3 if want[t] > 0 else want[t] * 1.3
    for t in set(output):  # OpenAI presence / frequency on generated tokens only
        want[t] -= 0.25 * output.count(t) + 0.4
    assert torch.allclose(logits[0], torch.tensor(want), atol=1e-6)


def test_min_tokens_bans_eos_and_stop_tokens():
    logits = torch.tensor([LOGITS, LOGITS])
    rows = [_row(output=[1], min_tokens=3, stop_token_ids=[7]), _row(output=[1, 2, 3], min_tokens=3)]
    apply_penalties(logits, rows, frozenset({5}))
    assert logits[0, 5] == -math.inf and logits[0, 7] == -math.inf
    assert torch.equal(logits[1], torch.tensor(LOGITS))  # reached min_tokens: nothing banned


def test_greedy_uses_penalised_logits():
    sampler = Sampler()
    tokens, _ = sampler(torch.tensor([LOGITS] * 2), [_row(temperature=0), _row(temperature=0, logit_bias={2: 10.0})])
    assert tokens == [5, 2]


def test_seeded_sampling_is_per_request():
    sampler = Sampler()
    logits = torch.tensor([LOGITS] * 3)

    def seeded(seed):
        return SamplingRow(SamplingParams(temperature=1.0, seed=seed), torch.Generator().manual_seed(seed), [], [])

    a, b = seeded(7), seeded(7)
    alone = [sampler(logits[:1], [a])[0][0] for _ in range(30)]
    mixed = [sampler(logits, [_row(temperature=0.7), b, _row(temperature=0)])[0][1] for _ in range(30)]
    assert alone == mixed and len(set(alone)) > 2


def test_sampling_frequencies_follow_filtered_distribution():
    sampler = Sampler()
    row = SamplingRow(SamplingParams(temperature=0.8, top_k=4, top_p=0.9), torch.Generator().manual_seed(0), [], [])
    counts = torch.zeros(V)
    n = 4000
    for t in sampler(torch.tensor([LOGITS] * n), [row] * n)[0]:
        counts[t] += 1
    keep = reference_keep(LOGITS, 0.8, 4, 0.9)
    probs = softmax([x / 0.8 if i in keep else -math.inf for i, x in enumerate(LOGITS)])
    assert set(torch.nonzero(counts).flatten().tolist()) <= keep
    assert torch.allclose(counts / n, torch.tensor(probs), atol=0.03)


def test_logprobs_are_raw_with_ranks():
    sampler = Sampler()
    tokens, lps = sampler(torch.tensor([LOGITS]), [_row(temperature=0, logprobs=3, logit_bias={2: 10.0})])
    raw = torch.tensor(LOGITS).log_softmax(-1)
    info = lps[0]
    assert tokens == [2] and info.token_id == 2
    assert info.logprob == pytest.approx(raw[2].item())
    assert info.rank == 1 + sum(1 for x in LOGITS if x > LOGITS[2])
    assert info.top_ids == [5, 0, 7]
    assert info.top_logprobs == pytest.approx(raw[[5, 0, 7]].tolist())


def _argmax_cases() -> list[torch.Tensor]:
    """Logits whose argmax is easy to get wrong: ties inside a lane, across lanes and across the
    pieces a row is split into; NaN early, late, in the tail; all -inf; +inf; odd lengths."""
    gen = torch.Generator().manual_seed(0)
    cases = [torch.randn(n, v, generator=gen) for n, v in [(1, 1), (1, 15), (1, 16), (2, 17), (3, 49152), (32, 49152),
                                                          (1, 3 * 4096 + 5), (5, 1000)]]
    tie = torch.zeros(4, 20000)
    tie[0, [7, 23, 19000]] = 5.0  # same lane (7, 23), another piece (19000)
    tie[1, [19000, 19001]] = 5.0  # only in the second half
    tie[2] = -math.inf  # all -inf: index 0
    tie[3, [100, 9000]] = math.inf
    cases.append(tie)
    nan = torch.randn(4, 20000, generator=gen)
    nan[0, 3] = math.nan
    nan[1, [12000, 50]] = math.nan  # the first NaN wins, wherever the maximum is
    nan[1, 7] = 100.0
    nan[2, 19999] = math.nan  # in the tail after the vector loop
    nan[3, 15000] = math.nan  # in the second piece only
    cases.append(nan)
    cases.append(torch.randn(3, 1100, generator=gen)[:, 50:1050])  # rows of a wider tensor
    return cases


@pytest.mark.parametrize("threads", [1, 2])
def test_argmax_rows_equals_torch_argmax(threads):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for logits in _argmax_cases():
            assert torch.equal(argmax_rows(logits), logits.argmax(-1)), logits.shape
    finally:
        torch.set_num_threads(before)


def test_argmax_rows_falls_back_where_the_kernel_does_not_apply():
    logits = torch.randn(40, 6)
    columns = logits.t()  # stride along V is not 1: PyTorch's argmax
    assert torch.equal(argmax_rows(columns), columns.argmax(-1))
    half = torch.randn(3, 50).bfloat16()
    assert torch.equal(argmax_rows(half), half.argmax(-1))
    assert argmax_rows(torch.empty(0, 10)).shape == (0,)


@pytest.mark.parametrize("case,message", [
    ("dtype", "float32"),
    ("dims", "float32 \\[N, V\\]"),
    ("empty_rows", "must not be empty"),
])
def test_argmax_rows_kernel_rejects_bad_inputs(case, message):
    ops = native_ops()
    if ops is None:
        pytest.skip("native kernels unavailable")
    logits = {"dtype": torch.zeros(2, 8, dtype=torch.float64), "dims": torch.zeros(8),
              "empty_rows": torch.zeros(2, 0)}[case]
    with pytest.raises(RuntimeError, match=message):
        ops.argmax_rows(logits)


def test_inverse_cdf_draws_from_the_row():
    """200,000 draws a row from rows whose mass sits in a few blocks (a vocabulary that is not
    a whole number of blocks, zeros between): within total variation 0.01 of the row, never a
    token of probability 0, the end points of u at the first and last token that can be drawn."""
    gen = torch.Generator().manual_seed(0)
    vocab, draws = 1000, 200_000
    probs = torch.zeros(3, vocab)
    probs[0, [3, 255, 256, 700, 999]] = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])
    probs[1] = torch.rand(vocab, generator=gen) ** 4 * (torch.rand(vocab, generator=gen) < 0.03)
    probs[2, 512] = 1e-30  # one tiny token alone
    for r in range(3):
        picks = inverse_cdf(probs[r].expand(draws, vocab), torch.rand(draws, generator=gen))
        counts = torch.bincount(picks, minlength=vocab)
        assert int(counts[probs[r] == 0].sum()) == 0
        want = probs[r].double() / probs[r].double().sum()
        assert 0.5 * (counts.double() / draws - want).abs().sum() < 0.01
    nonzero = [torch.nonzero(p).flatten() for p in probs]
    ends = inverse_cdf(probs, torch.zeros(3)).tolist(), inverse_cdf(probs, torch.full((3,), 1 - 2**-24)).tolist()
    assert ends == ([int(n[0]) for n in nonzero], [int(n[-1]) for n in nonzero])
