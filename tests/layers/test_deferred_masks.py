"""Deferred grammar masks in the sampler: a constrained row is sampled as if free and masked
only when the grammar refuses its token. Greedy rows must pick exactly the masked token, rows
sampled at a temperature must draw from exactly the masked distribution, and rows whose
settings choose from the whole row (logprobs, top-k/p, min-p) get their mask first."""

from __future__ import annotations

import numpy
import pytest
import torch

from surge.layers.sampler import Sampler, SamplingRow, mask_commutes
from surge.sampling_params import SamplingParams

EOS = 1


def bitmask(allowed: numpy.ndarray) -> numpy.ndarray:
    """int32 words of a boolean row (bit b of word w: token 32 w + b)."""
    words = (len(allowed) + 31) // 32
    bits = numpy.zeros(words * 32, numpy.uint8)
    bits[: len(allowed)] = allowed
    return numpy.packbits(bits, bitorder="little").view(numpy.int32)


class Deferred:
    """A DeferredMask over a fixed row; counts what the sampler asked."""

    def __init__(self, allowed: numpy.ndarray, log: dict[str, int]):
        self.allowed, self.log = allowed, log

    def allows(self, token: int) -> bool:
        self.log["allows"] += 1
        return bool(self.allowed[token])

    def resolve(self, group: list[Deferred]) -> numpy.ndarray:
        self.log["resolved"] += len(group)
        self.log["resolve_calls"] += 1
        return numpy.stack([bitmask(d.allowed) for d in group])


def row(**kw) -> SamplingRow:
    seed = kw.get("seed")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(SamplingParams(**kw), gen, [5, 6, 7], [8, 9])


def masks(rng: numpy.random.Generator, n: int, vocab: int) -> list[numpy.ndarray]:
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:  # a forced token
            a = numpy.zeros(vocab, bool)
            a[rng.integers(vocab)] = True
        elif kind == 1:  # only the end of sequence
            a = numpy.zeros(vocab, bool)
            a[EOS] = True
        else:  # sparse or dense
            a = rng.random(vocab) < (0.05 if kind == 2 else 0.9)
            a[rng.integers(vocab)] = True
        out.append(a)
    return out


GREEDY_SETTINGS = [
    {}, {"logit_bias": {3: 5.0, 4: -100.0}}, {"repetition_penalty": 1.3},
    {"presence_penalty": 0.5, "frequency_penalty": 0.3}, {"min_tokens": 5},
]


@pytest.mark.parametrize("with_eager_rows", [False, True])
def test_greedy_rows_take_exactly_the_masked_token(with_eager_rows):
    """Against masks computed up front, over random logits and masks (forced tokens, end of
    sequence only where min_tokens bans it, sparse, dense), with penalties and logit bias, and
    beside rows masked up front and free rows (which change the logits in place)."""
    vocab, n = 300, 40
    rng = numpy.random.default_rng(0)
    for trial in range(10):
        logits = torch.from_numpy(rng.normal(size=(n, vocab)).astype(numpy.float32) * 3)
        allowed = masks(rng, n, vocab)
        rows = [row(temperature=0, **GREEDY_SETTINGS[i % len(GREEDY_SETTINGS)]) for i in range(n)]
        want, _ = Sampler()(logits.clone(), rows, frozenset({EOS}), [bitmask(a) for a in allowed])
        log = {"allows": 0, "resolved": 0, "resolve_calls": 0}
        given: list = [Deferred(a, log) for a in allowed]
        if with_eager_rows:
            for i in range(0, n, 3):
                given[i] = bitmask(allowed[i])
            for i in range(1, n, 7):
                given[i] = None  # free
        got, _ = Sampler()(logits.clone(), rows, frozenset({EOS}), given)
        free = [i for i, g in enumerate(given) if g is None]
        if free:  # a free row takes its own argmax (with its penalties): what an unmasked run picks
            unmasked, _ = Sampler()(logits.clone(), rows, frozenset({EOS}), None)
            for i in free:
                want[i] = unmasked[i]
        assert got == want, trial
        for i, g in enumerate(given):
            if isinstance(g, Deferred):
                assert g.allowed[got[i]]
        deferred = sum(isinstance(g, Deferred) for g in given)
        assert log["allows"] == deferred and log["resolve_calls"] <= 1  # refused rows' masks together
        assert log["resolved"] < deferred  # dense masks mostly allow the free choice


def test_rows_that_choose_from_the_whole_row_get_their_mask_first():
    """logprobs, top-k, top-p and min-p: masked before sampling, exactly as with masks computed
    up front (same tokens for the same seeds, same logprobs)."""
    vocab, n = 200, 8
    rng = numpy.random.default_rng(1)
    logits = torch.from_numpy(rng.normal(size=(n, vocab)).astype(numpy.float32) * 2)
    allowed = masks(rng, n, vocab)
    settings = [{"temperature": 0, "logprobs": 3}, {"temperature": 0.8, "top_k": 5, "seed": 1},
                {"temperature": 1.0, "top_p": 0.7, "seed": 2}, {"temperature": 1.0, "min_p": 0.2, "seed": 3},
                {"temperature": 0.7, "logprobs": 2, "seed": 4}]
    for k in range(3):
        rows = [row(**settings[i % len(settings)]) for i in range(n)]
        want, want_lp = Sampler()(logits.clone(), rows, frozenset({EOS}), [bitmask(a) for a in allowed])
        rows = [row(**settings[i % len(settings)]) for i in range(n)]  # fresh generators
        log = {"allows": 0, "resolved": 0, "resolve_calls": 0}
        got, got_lp = Sampler()(logits.clone(), rows, frozenset({EOS}), [Deferred(a, log) for a in allowed])
        assert got == want and got_lp == want_lp, k
        assert log == {"allows": 0, "resolved": n, "resolve_calls": 1}
    assert not mask_commutes(SamplingParams(temperature=0, logprobs=0), vocab)
    assert mask_commutes(SamplingParams(temperature=0.5, top_k=vocab), vocab)
    assert mask_commutes(SamplingParams(temperature=0, top_p=0.5), vocab)  # greedy: the filters do not matter


@pytest.mark.parametrize("temperature, repetition_penalty, draws, tv", [(1.0, 1.0, 200_000, 0.01),
                                                                     (0.6, 1.2, 40_000, 0.02)])
def test_temperature_rows_draw_from_the_masked_distribution(temperature, repetition_penalty, draws, tv):
    """Over 200,000 draws, the empirical distribution of a row whose likeliest tokens the grammar
    refuses is within total variation 0.01 of the masked softmax (sample as if free, keep an
    allowed token, otherwise sample again from the masked row); with a repetition penalty (its
    logits kept for the second draw), 40,000 draws within 0.02."""
    vocab = 24
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(vocab, generator=gen) * 2
    allowed = numpy.zeros(vocab, bool)
    order = base.argsort(descending=True).numpy()
    allowed[order[2:12]] = True  # the two likeliest refused: about half the first draws are
    params = {"temperature": temperature, "repetition_penalty": repetition_penalty}
    rows = [row(**params) for _ in range(draws)]
    log = {"allows": 0, "resolved": 0, "resolve_calls": 0}
    torch.manual_seed(0)
    tokens, _ = Sampler()(base.expand(draws, vocab).clone(), rows, frozenset(), [Deferred(allowed, log)] * draws)
    counts = numpy.bincount(tokens, minlength=vocab) / draws
    # the reference: the same penalties and temperature, masked, softmax
    ref_logits = base.clone()
    if repetition_penalty != 1.0:
        seen = torch.tensor([5, 6, 7, 8, 9])
        vals = ref_logits[seen]
        ref_logits[seen] = torch.where(vals > 0, vals / repetition_penalty, vals * repetition_penalty)
    ref_logits[torch.from_numpy(~allowed)] = float("-inf")
    want = (ref_logits / temperature).softmax(-1).numpy()
    assert counts[~allowed].sum() == 0
    assert 0.5 * numpy.abs(counts - want).sum() < tv
    assert 0.2 * draws < log["resolved"] < 0.9 * draws  # both branches taken often


def test_seeded_deferred_rows_give_the_same_tokens_in_any_batch():
    vocab = 100
    rng = numpy.random.default_rng(2)
    steps = [torch.from_numpy(rng.normal(size=(6, vocab)).astype(numpy.float32) * 2) for _ in range(20)]
    allowed = masks(rng, 6, vocab)

    def run(batch: list[int]) -> list[int]:
        rows = {i: row(temperature=0.9, seed=10 + i) for i in batch}
        out = []
        for logits in steps:
            log = {"allows": 0, "resolved": 0, "resolve_calls": 0}
            tokens, _ = Sampler()(logits[batch].clone(), [rows[i] for i in batch], frozenset(),
                                  [Deferred(allowed[i], log) for i in batch])
            out.append(tokens[batch.index(3)])
        return out

    assert run([3]) == run([0, 1, 2, 3, 4, 5]) == run([5, 3])
