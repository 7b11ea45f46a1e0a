"""Sampler filters against a reference computation on fixed logits; seeded reproducibility."""

from __future__ import annotations

import torch

from surge.layers.sampler import Sampler, apply_top_k_top_p_min_p
from surge.sampling_params import SamplingParams

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0, -2.0, 1.5])


def _kept(masked: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(masked)).flatten().tolist())


def test_top_k():
    assert _kept(apply_top_k_top_p_min_p(LOGITS, 3, 1.0, 0.0)) == {5, 0, 7}


def test_top_p_reference():
    probs = LOGITS.softmax(-1)
    order = torch.argsort(probs, descending=True).tolist()
    kept, mass = set(), 0.0
    for i in order:  # smallest set whose mass reaches top_p
        kept.add(i)
        mass += probs[i].item()
        if mass >= 0.8:
            break
    assert _kept(apply_top_k_top_p_min_p(LOGITS, 0, 0.8, 0.0)) == kept


def test_min_p_reference():
    probs = LOGITS.softmax(-1)
    want = {i for i in range(8) if probs[i] >= 0.2 * probs.max()}
    assert _kept(apply_top_k_top_p_min_p(LOGITS, 0, 1.0, 0.2)) == want


def test_greedy_and_seeded_sampling():
    sampler = Sampler()
    logits = LOGITS.repeat(3, 1)
    greedy = SamplingParams(temperature=0)
    hot = SamplingParams(temperature=1.5, seed=7)

    assert sampler(logits, [greedy] * 3, [None] * 3) == [5, 5, 5]
    gen_a, gen_b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    seq_a = [sampler(logits[:1], [hot], [gen_a])[0] for _ in range(20)]
    seq_b = [sampler(logits[:2], [greedy, hot], [None, gen_b])[1] for _ in range(20)]
    assert seq_a == seq_b  # the same seed gives the same tokens whatever else is in the batch
    assert len(set(seq_a)) > 1
