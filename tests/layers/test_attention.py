"""Paged attention against a dense float64 reference: a lone decoding sequence, several decoding
together, and prefill chunks, with grouped heads and a sliding window, in float32 and bf16; each
path a step can take (the decode kernel's rows, the prompt-chunk kernel, SDPA, PyTorch)."""

from __future__ import annotations

import pytest
import torch

from surge.layers import attention
from surge.layers.attention import AttentionMetadata, paged_attention

HQ, HK, D, BS = 9, 3, 16, 4


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_len: int, window: int | None) -> torch.Tensor:
    """q [n, Hq, D] at the last n positions of a context k, v [seq_len, Hk, D]."""
    n = q.shape[0]
    rep = HQ // HK
    kk, vv = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    scores = torch.einsum("nhd,lhd->hnl", q.double(), kk) * q.shape[-1] ** -0.5
    q_pos = torch.arange(seq_len - n, seq_len)[:, None]
    k_pos = torch.arange(seq_len)[None, :]
    keep = k_pos <= q_pos
    if window is not None:
        keep &= k_pos > q_pos - window
    scores = scores.masked_fill(~keep[None], float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), vv)


@pytest.mark.parametrize("native", [True, "native_prefill", "native_sdpa_prompts", False],
                         ids=["native", "native_prefill", "native_sdpa_prompts", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("layout", [
    [(1, 1)],  # one sequence, one token: the lone-decode path
    [(1, 19)],
    [(1, 40)],
    [(1, 5), (1, 23), (1, 2)],  # several decoding together
    [(7, 7), (1, 30)],  # a prompt beside one decoding sequence
    [(3, 12), (5, 40), (1, 9), (1, 18)],  # chunks and decodes mixed
    [(20, 20), (1, 30)],  # a prompt longer than the prompt-chunk kernel's threshold
    [(12, 40), (9, 9), (3, 14), (1, 3)],  # chunks on both sides of it, and a decode
])
def test_paged_attention_matches_dense_reference(layout, window, dtype, native, monkeypatch):
    if not native:  # the PyTorch path, as on GPUs or where the kernel cannot be built
        monkeypatch.setattr(attention, "native_decode", lambda kv_cache: False)
    if native == "native_sdpa_prompts":  # prompt chunks with more context than the limit take SDPA
        monkeypatch.setattr(attention, "NATIVE_PREFILL_MAX_CONTEXT", 20)
    prefill_kernel = native == "native_prefill" and attention.native_prefill(torch.empty(1, 64, dtype=dtype))
    if native == "native_prefill" and dtype == torch.bfloat16:
        assert prefill_kernel, "the prompt-chunk kernel should serve a bf16 cache of head size 64 here"
    d = 64 if native == "native_prefill" else D  # the prompt-chunk kernel takes multiples of 32
    gen = torch.Generator().manual_seed(0)
    num_blocks = 64
    cache = torch.zeros(2, num_blocks, BS, HK, d, dtype=dtype)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables, qs, contexts, starts, seq_lens = [], [], [], [0], []
    for n, seq_len in layout:
        blocks = [free.pop() for _ in range(-(-seq_len // BS))]
        k = torch.randn(seq_len, HK, d, generator=gen).to(dtype)
        v = torch.randn(seq_len, HK, d, generator=gen).to(dtype)
        for p in range(seq_len):
            cache[0, blocks[p // BS], p % BS] = k[p]
            cache[1, blocks[p // BS], p % BS] = v[p]
        tables.append(blocks)
        qs.append(torch.randn(n, HQ, d, generator=gen).to(dtype))
        contexts.append((k, v))
        starts.append(starts[-1] + n)
        seq_lens.append(seq_len)
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(starts[-1], dtype=torch.int64),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        query_start_loc=starts, seq_lens=seq_lens, block_size=BS,
    )
    meta.split_decode(native=bool(native), native_prefill=prefill_kernel)
    assert (meta.prefill_spans is not None) == (prefill_kernel and any(n > attention.NATIVE_ROWS_MAX_NEW for n, _ in layout))
    out = paged_attention(torch.cat(qs), cache, meta, d**-0.5, window)
    assert out.dtype == dtype and out.shape == (starts[-1], HQ, d)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for i, (q, (k, v)) in enumerate(zip(qs, contexts)):
        expected = reference(q, k, v, seq_lens[i], window)
        torch.testing.assert_close(out[starts[i]:starts[i + 1]].double(), expected, atol=tol, rtol=tol)


def test_decode_batch_only_for_decode_only_steps():
    def meta(layout: list[tuple[int, int]]) -> AttentionMetadata:
        starts = [0]
        for n, _ in layout:
            starts.append(starts[-1] + n)
        m = AttentionMetadata(slot_mapping=torch.arange(starts[-1]), block_tables=torch.arange(12).view(3, 4)[: len(layout)],
                              query_start_loc=starts, seq_lens=[s for _, s in layout], block_size=BS)
        m.split_decode(native=True)
        return m

    assert meta([(3, 12), (1, 9)]).decode_batch() is None  # a prompt chunk in the step
    batch = meta([(1, 3), (1, 2)]).decode_batch()  # one block each: padded to two columns
    assert batch is not None and batch.block_tables.tolist() == [[0, 0], [4, 0]]
    assert batch.seq_lens.tolist() == [3, 2] and batch.slot_mapping.tolist() == [0, 1]
    wide = meta([(1, 9), (1, 11), (1, 5)]).decode_batch()  # the longest needs 3 blocks of 4
    assert wide is not None and wide.block_tables.tolist() == [[0, 1, 2], [4, 5, 6], [8, 9, 10]]
    assert meta([(1, 5)]).decode_batch() is not None  # a lone decoding sequence too
    lone = meta([(1, 5)])
    lone.split_decode(native=False)  # without the kernel a lone one keeps the float32 matmul path
    assert lone.decode_batch() is None


def test_short_prompt_chunks_become_rows_of_the_native_kernel(monkeypatch):
    # A chunk of 3 tokens ending at position 11 and a decoding sequence at 9: four rows, each
    # with its own context length and its sequence's block table.
    tables = torch.arange(12).view(3, 4)[:2]
    meta = AttentionMetadata(slot_mapping=torch.arange(4), block_tables=tables, query_start_loc=[0, 3, 4],
                             seq_lens=[12, 9], block_size=BS)
    meta.split_decode(native=True)
    assert meta.prefill_seqs == [] and meta.decode_batch() is None  # not a decode-only step
    assert meta.decode_rows.tolist() == [0, 1, 2, 3] and meta.decode_seq_lens.tolist() == [10, 11, 12, 9]
    assert meta.decode_tables.tolist() == [[0, 1, 2], [0, 1, 2], [0, 1, 2], [4, 5, 6]]
    # Past the limit the chunk goes to SDPA; without the kernel every chunk does.
    monkeypatch.setattr(attention, "NATIVE_PREFILL_MAX_CONTEXT", 11)
    meta.split_decode(native=True)
    assert meta.prefill_seqs == [0] and meta.decode_rows.tolist() == [3] and meta.decode_seq_lens.tolist() == [9]
    meta.split_decode(native=False)
    assert meta.prefill_seqs == [0, 1] and meta.decode_rows is None
    # With the prompt-chunk kernel a chunk of a few tokens stays rows (a verification of
    # proposed tokens attends as plain decoding does); a longer one goes to it, whatever its
    # context: (first row, new tokens, context length) and its block table.
    monkeypatch.setattr(attention, "NATIVE_PREFILL_MAX_CONTEXT", 1024)
    meta.split_decode(native=True, native_prefill=True)
    assert meta.prefill_seqs == [] and meta.prefill_spans is None and meta.decode_rows.tolist() == [0, 1, 2, 3]
    monkeypatch.setattr(attention, "NATIVE_ROWS_MAX_NEW", 2)
    meta.split_decode(native=True, native_prefill=True)
    assert meta.prefill_seqs == [0] and meta.decode_rows.tolist() == [3]
    assert meta.prefill_spans.tolist() == [[0, 3, 12]] and meta.prefill_tables.tolist() == [[0, 1, 2]]
    meta.split_decode(native=True)  # a later split without it clears them
    assert meta.prefill_spans is None and meta.prefill_tables is None
