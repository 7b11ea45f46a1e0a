"""The prompt-chunk attention kernel (csrc/prefill_attention.cpp) against a dense float64
reference: head sizes and group sizes, several chunks in one call with earlier context in the
cache (chunked prefill, a prefix-cache hit), sliding windows shorter than a chunk, scores large
enough to need the running maximum, a strided query, the same bits on any thread count, rows
outside the chunks untouched; and its input checks."""

from __future__ import annotations

import os

import pytest
import torch

from surge.layers.native import has_avx512_bf16, native_ops

BS = 16
UNTOUCHED = 7.0  # out's rows outside every chunk keep this


@pytest.fixture(scope="module")
def ops():
    if os.environ.get("SURGE_NATIVE_KERNELS") == "0":
        pytest.skip("native kernels disabled by SURGE_NATIVE_KERNELS=0")
    if not has_avx512_bf16():
        pytest.skip("the prompt-chunk kernel needs AVX-512 BF16")
    built = native_ops()
    assert built is not None, "the native kernels did not build (see the log: compiler, ninja)"
    return built


def make(hq: int, hk: int, d: int, chunks: list[tuple[int, int]], seed: int = 0, magnitude: float = 1.0):
    """A cache holding each chunk's context (n new tokens ending a context of length L) in
    shuffled blocks, q with a spare row before and after the chunks, spans and tables."""
    gen = torch.Generator().manual_seed(seed)
    width = max(-(-length // BS) for _, length in chunks)
    num_blocks = len(chunks) * width + 3
    cache = (torch.randn(2, num_blocks, BS, hk, d, generator=gen) * magnitude).bfloat16()
    tables = torch.randperm(num_blocks, generator=gen)[: len(chunks) * width].view(len(chunks), width)
    rows = sum(n for n, _ in chunks) + 2
    q = (torch.randn(rows, hq, d, generator=gen) * magnitude).bfloat16()
    spans, row = [], 1
    for n, length in chunks:
        spans.append([row, n, length])
        row += n
    return q, cache, tables, torch.tensor(spans, dtype=torch.int64)


def reference(q, cache, tables, spans, scale: float, window: int) -> torch.Tensor:
    hq, d = q.shape[1], q.shape[2]
    hk = cache.shape[3]
    out = torch.full(q.shape, UNTOUCHED, dtype=torch.float64)
    for c, (row, n, length) in enumerate(spans.tolist()):
        k = cache[0, tables[c]].reshape(-1, hk, d)[:length].double().repeat_interleave(hq // hk, 1)
        v = cache[1, tables[c]].reshape(-1, hk, d)[:length].double().repeat_interleave(hq // hk, 1)
        for j in range(n):
            pos = length - n + j
            lo = max(0, pos + 1 - window) if window >= 0 else 0
            p = (torch.einsum("hd,lhd->hl", q[row + j].double(), k[lo:pos + 1]) * scale).softmax(-1)
            out[row + j] = torch.einsum("hl,lhd->hd", p, v[lo:pos + 1])
    return out


def run(ops, q, cache, tables, spans, window: int = -1) -> torch.Tensor:
    out = torch.full(q.shape, UNTOUCHED, dtype=torch.bfloat16)
    ops.prefill_attention(q, cache, tables, spans, q.shape[-1] ** -0.5, window, out)
    return out


def check(out, expected) -> None:
    # bf16 inputs and output: the output's own rounding (2^-9 relative) dominates
    torch.testing.assert_close(out.double(), expected, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 256])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_head_and_group_sizes(ops, head_dim, group):
    # a whole prompt, a chunk after 37 tokens of context, a chunk of two tokens
    q, cache, tables, spans = make(2 * group, 2, head_dim, [(70, 70), (33, 70), (2, 5)], seed=group)
    check(run(ops, q, cache, tables, spans), reference(q, cache, tables, spans, head_dim**-0.5, -1))


@pytest.mark.parametrize("window", [1, 5, 40, 100, 1000])
def test_sliding_windows(ops, window):
    q, cache, tables, spans = make(4, 1, 256, [(90, 90), (50, 120)])
    scale = 256**-0.5
    check(run(ops, q, cache, tables, spans, window), reference(q, cache, tables, spans, scale, window))


def test_large_scores_keep_the_running_maximum(ops):
    # scores in the hundreds: a softmax without its maximum subtracted overflows
    q, cache, tables, spans = make(4, 2, 64, [(100, 130)], magnitude=6.0)
    expected = reference(q, cache, tables, spans, 64**-0.5, -1)
    out = run(ops, q, cache, tables, spans)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, atol=5e-2, rtol=1e-2)


def test_strided_query_and_output(ops):
    # q a view of a fused QKV row (heads then K and V), out a view of a wider buffer
    q, cache, tables, spans = make(6, 2, 64, [(40, 60)])
    fused = torch.zeros(q.shape[0], 10, 64, dtype=torch.bfloat16)
    fused[:, :6] = q
    wide = torch.full((q.shape[0], 8, 64), UNTOUCHED, dtype=torch.bfloat16)
    ops.prefill_attention(fused[:, :6], cache, tables, spans, 64**-0.5, -1, wide[:, 1:7])
    check(wide[:, 1:7], reference(q, cache, tables, spans, 64**-0.5, -1))
    assert (wide[:, 0] == UNTOUCHED).all() and (wide[:, 7] == UNTOUCHED).all()


@pytest.mark.parametrize("threads", [1, 3])
def test_same_bits_on_any_thread_count(ops, threads):
    q, cache, tables, spans = make(9, 3, 64, [(200, 200), (20, 45)])
    expected = run(ops, q, cache, tables, spans)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = run(ops, q, cache, tables, spans)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out, expected)


def test_no_chunks_is_a_no_op(ops):
    q, cache, tables, _ = make(2, 1, 32, [(3, 3)])
    out = run(ops, q, cache, tables[:0], torch.zeros(0, 3, dtype=torch.int64))
    assert (out == UNTOUCHED).all()


def _bad(case: str):
    q, cache, tables, spans = make(4, 2, 64, [(10, 20)])
    out = torch.empty_like(q)
    if case == "q_float32":
        q = q.float()
    elif case == "out_shape":
        out = out[:-1]
    elif case == "cache_float32":
        cache = cache.float()
    elif case == "head_size_48":
        q, cache, out = q[..., :48], cache[..., :48].contiguous(), out[..., :48]
    elif case == "head_sizes_differ":
        cache = torch.cat([cache, cache], -1)
    elif case == "heads":
        q, out = q[:, :3], out[:, :3]
    elif case == "span_past_q":
        spans = torch.tensor([[q.shape[0] - 3, 10, 20]])
    elif case == "context_shorter_than_chunk":
        spans = torch.tensor([[0, 10, 9]])
    elif case == "table_too_short":
        tables = tables[:, :1]
    elif case == "block_outside_cache":
        tables = tables.clone()
        tables[0, 0] = cache.shape[1]
    elif case == "spans_shape":
        spans = spans[:, :2].contiguous()
    elif case == "one_table_per_span":
        tables = torch.cat([tables, tables])
    return q, cache, tables, spans, out


@pytest.mark.parametrize("case, message", [
    ("q_float32", "q must be bf16"),
    ("out_shape", "out must be bf16 of q's shape"),
    ("cache_float32", "kv_cache must be contiguous bf16"),
    ("head_size_48", "must be a multiple of 32"),
    ("head_sizes_differ", "head sizes differ"),
    ("heads", "multiple of KV heads"),
    ("span_past_q", "does not fit q's"),
    ("context_shorter_than_chunk", "does not fit q's"),
    ("table_too_short", "too short"),
    ("block_outside_cache", "outside the cache"),
    ("spans_shape", "spans must be contiguous int64 [P, 3]"),
    ("one_table_per_span", "one per span"),
])
def test_bad_inputs_raise_clear_errors(ops, case, message):
    q, cache, tables, spans, out = _bad(case)
    with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ops.prefill_attention(q, cache, tables, spans, 0.125, -1, out)


def test_default_model_agrees_with_float_as_closely_as_the_rows_do(ops, monkeypatch):
    """Teacher-forced over 512 tokens in one prompt: the default model in bf16 with the kernel,
    and with prompt chunks as rows of the decode kernel, each against the same weights in
    float32 (bf16 probabilities and another order of sums move single near-ties, as any change
    of the bf16 path does: the two are held to the same bar, not to each other)."""
    from pathlib import Path

    from surge.loader import load_model
    from surge.worker import model_runner
    from tests.helpers import surge_logits

    text = (Path(__file__).resolve().parents[2] / "tests" / "data" / "gpl-3.0.txt").read_text()
    reference = load_model(None, "float32", "cpu")
    ids = reference.tokenizer.encode(text)[:512]
    (want,) = surge_logits(reference, [ids])
    want = torch.log_softmax(want.float(), -1)
    loaded = load_model(None, "bfloat16", "cpu")
    scores = {}
    for kernel in (True, False):
        monkeypatch.setattr(model_runner, "native_prefill", lambda kv_cache, on=kernel: on)
        (got,) = surge_logits(loaded, [ids])
        got = torch.log_softmax(got.float(), -1)
        top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
        kld = (want.exp() * (want - got)).sum(-1).mean().item()
        scores[kernel] = (top1, kld)
    (top1, kld), (rows_top1, rows_kld) = scores[True], scores[False]
    assert top1 >= 0.95 and top1 >= rows_top1 - 0.02, scores
    assert kld <= 1.5 * rows_kld, scores
