"""Attention over a paged KV cache for a flat batch of tokens from many sequences.

KV cache of one layer: [2, num_blocks, block_size, num_kv_heads, head_dim] (K then V).
A token's K/V is written to its slot = block_id * block_size + offset (the slot mapping);
each sequence reads its context back through its block table:

    block_table[i] = [7, 2, 9]      block_size = 4, seq_len = 10
    context slots  = 7*4+0..3, 2*4+0..3, 9*4+0..1

The flat batch holds each sequence's new tokens back to back (query_start_loc marks the
boundaries), so prefill chunks and single decode tokens mix in one step.

An int8 cache (`--kv-cache-dtype int8`) has rows of head_dim + 2 bytes: each token's head is
quantized on its own when written (symmetric, scale = max|x| / 127), its scale stored as fp16
in the last two bytes; attention dequantizes as it reads. 66 bytes a row against 128 in bf16
for head_dim 64: 1.94x the tokens in the same memory.

    row = [ q_0 q_1 ... q_{D-1} | scale (fp16, 2 bytes) ]     x_i = q_i * scale
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from surge.layers.native import has_avx512_bf16, native_ops

_NATIVE_CACHE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.int8)
INT8_SCALE_BYTES = 2  # an int8 cache row ends with its scale as fp16
# Without the prompt-chunk kernel (float32 or int8 caches, head sizes it does not take, no
# AVX-512 BF16): prompt chunks whose context is at most this many tokens are attended a token
# per row by the decode kernel; longer ones by SDPA, whose matmuls win on the quadratic work
# (measured crossover, docs/performance.md).
NATIVE_PREFILL_MAX_CONTEXT = 1024
# With the prompt-chunk kernel, chunks of at most this many new tokens (and context within the
# limit above) still go a token per row: as fast there (the kernel's tiles pay off over more
# rows), and a verification of a few proposed tokens then attends with the decode kernel's
# arithmetic, as plain decoding does.
NATIVE_ROWS_MAX_NEW = 8


def native_decode(kv_cache: torch.Tensor) -> bool:
    """True where surge_native.paged_decode_attention serves this cache (CPU, float dtypes, built)."""
    return kv_cache.device.type == "cpu" and kv_cache.dtype in _NATIVE_CACHE_DTYPES and native_ops() is not None


def native_prefill(kv_cache: torch.Tensor) -> bool:
    """True where surge_native.prefill_attention attends prompt chunks from this cache: bf16 on
    a CPU with AVX-512 BF16, a head size that is a multiple of 32 (at most 512)."""
    head_dim = kv_cache.shape[-1]
    return (kv_cache.device.type == "cpu" and kv_cache.dtype == torch.bfloat16 and head_dim % 32 == 0
            and head_dim <= 512 and has_avx512_bf16() and native_ops() is not None)


def quantize_kv(x: torch.Tensor) -> torch.Tensor:
    """[..., D] float -> [..., D + 2] int8 cache rows (the layout above; the native kernel's
    write computes the same bytes)."""
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / 127).half()
    s = scale.float()
    q = torch.where(s > 0, torch.round(xf / s), 0.0).clamp(-127, 127).to(torch.int8)
    return torch.cat([q, scale.view(torch.int8)], dim=-1)


def dequantize_kv(rows: torch.Tensor) -> torch.Tensor:
    """[..., D + 2] int8 cache rows -> [..., D] float32."""
    d = rows.shape[-1] - INT8_SCALE_BYTES
    return rows[..., :d].float() * rows[..., d:].contiguous().view(torch.float16).float()


def read_kv(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cache rows as `dtype` values (int8 rows dequantized)."""
    return (dequantize_kv(rows) if rows.dtype == torch.int8 else rows).to(dtype)


class DecodeBatch(NamedTuple):
    """A step in which every sequence has exactly one new token, as tensors only: all the native
    kernel needs (`surge_native.paged_decode_step`), and all a compiled graph may depend on."""

    slot_mapping: torch.Tensor  # [B] int64
    block_tables: torch.Tensor  # [B, >= 2 blocks] int64 (never one column: a compiled graph would specialize on it)
    seq_lens: torch.Tensor  # [B] int64


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step layout of the flat batch; built by the model runner, shared by every layer."""

    slot_mapping: torch.Tensor  # [num_tokens] int64, cache slot of each new token
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64 (padded with 0)
    query_start_loc: list[int]  # [num_seqs + 1] offsets of each sequence's tokens in the batch
    seq_lens: list[int]  # [num_seqs] context length after this step (computed + new)
    block_size: int
    # Rows attended one query token at a time, all in one batched op: the decoding sequences'
    # tokens and, with the native kernel, the tokens of short prompt chunks (each row sees its
    # sequence's context up to its own position).
    decode_seqs: torch.Tensor | None = None  # [S] the sequences whose rows these are
    decode_rows: torch.Tensor | None = None  # [R] their token rows in the flat batch, in order
    decode_seq_lens: torch.Tensor | None = None  # [R] each row's context length (its position + 1)
    decode_tables: torch.Tensor | None = None  # [R, blocks to cover the longest] each row's block table
    decode_width: int = 0  # the longest context among them
    all_decode: bool = False  # every sequence has exactly one new token, all in these rows
    prefill_seqs: list[int] | None = None  # the other sequences, looped over
    # With the prompt-chunk kernel, those other sequences in one call: [P, 3] int64 (first row,
    # new tokens, context length) and their block tables [P, blocks to cover the longest]
    prefill_spans: torch.Tensor | None = None
    prefill_tables: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    def split_decode(self, native: bool = False, native_prefill: bool = False) -> None:
        """Fill the per-row / per-sequence split from query_start_loc and seq_lens.

        With the native kernel every decoding sequence takes the per-row path, and so does every
        prompt chunk whose context is at most NATIVE_PREFILL_MAX_CONTEXT tokens (there one SDPA
        call per sequence costs more than attending its tokens one by one), unless the
        prompt-chunk kernel serves the cache (`native_prefill`): then chunks of more than
        NATIVE_ROWS_MAX_NEW tokens, whatever their context, go to it, all in one call. Without
        the native kernel a lone decoding sequence is faster through `single_decode_attention`
        than through the gathered batch.
        """
        starts, lens = self.query_start_loc, self.seq_lens
        self.decode_seqs = self.decode_rows = self.decode_seq_lens = self.decode_tables = None
        self.prefill_spans = self.prefill_tables = None
        self.decode_width, self.all_decode = 0, False
        new = [starts[i + 1] - starts[i] for i in range(self.num_seqs)]
        if native:
            most = NATIVE_ROWS_MAX_NEW if native_prefill else None
            chosen = [i for i in range(self.num_seqs) if new[i] == 1 or (
                new[i] > 1 and lens[i] <= NATIVE_PREFILL_MAX_CONTEXT and (most is None or new[i] <= most))]
        else:
            chosen = [i for i in range(self.num_seqs) if new[i] == 1]
            if len(chosen) < 2:
                chosen = []
        if len(chosen) == self.num_seqs and all(n == 1 for n in new):  # a decode-only step: no gathers
            self.set_decode_only(torch.tensor(lens, dtype=torch.int64, device=self.block_tables.device))
            return
        picked = set(chosen)
        self.prefill_seqs = [i for i in range(self.num_seqs) if new[i] > 0 and i not in picked]
        if native and native_prefill and self.prefill_seqs:
            dev = self.block_tables.device
            chunks = self.prefill_seqs
            self.prefill_spans = torch.tensor([[starts[i], new[i], lens[i]] for i in chunks], dtype=torch.int64,
                                              device=dev)
            blocks = -(-max(lens[i] for i in chunks) // self.block_size)
            self.prefill_tables = self.block_tables[torch.tensor(chunks, dtype=torch.int64, device=dev), :blocks]
        if not chosen:
            return
        rows: list[int] = []
        row_lens: list[int] = []
        row_seqs: list[int] = []
        for i in chosen:
            rows.extend(range(starts[i], starts[i + 1]))
            row_lens.extend(range(lens[i] - new[i] + 1, lens[i] + 1))
            row_seqs.extend([i] * new[i])
        dev = self.block_tables.device
        self.decode_seqs = torch.tensor(chosen, dtype=torch.int64, device=dev)
        self.decode_rows = torch.tensor(rows, dtype=torch.int64, device=dev)
        self.decode_seq_lens = torch.tensor(row_lens, dtype=torch.int64, device=dev)
        self.decode_width = max(row_lens)
        blocks = -(-self.decode_width // self.block_size)
        index = self.decode_seqs if len(rows) == len(chosen) else torch.tensor(row_seqs, dtype=torch.int64, device=dev)
        self.decode_tables = self.block_tables[index, :blocks]
        self.all_decode = not self.prefill_seqs and len(rows) == len(chosen) == self.num_seqs

    def set_decode_only(self, seq_lens: torch.Tensor) -> None:
        """The split of a step in which every sequence has exactly one new token (`seq_lens`:
        this step's lengths as a tensor): every row attended by the per-row path, the block
        tables as they are."""
        self.decode_seqs = self.decode_rows = _arange(self.num_seqs, seq_lens.device)
        self.decode_seq_lens = seq_lens
        self.decode_width = max(self.seq_lens)
        blocks = -(-self.decode_width // self.block_size)
        tables = self.block_tables
        self.decode_tables = tables if tables.shape[1] == blocks else tables[:, :blocks]
        self.prefill_seqs, self.all_decode = [], True

    def decode_batch(self) -> DecodeBatch | None:
        """The step as a DecodeBatch when every sequence decodes (after split_decode), else None."""
        if not self.all_decode:
            return None
        tables = self.decode_tables
        if tables.shape[1] < 2:
            tables = F.pad(tables, (0, 2 - tables.shape[1]))
        return DecodeBatch(self.slot_mapping, tables, self.decode_seq_lens)


_ARANGES: dict[tuple[int, str], torch.Tensor] = {}


def _arange(n: int, device: torch.device) -> torch.Tensor:
    """0..n-1 as int64 (read-only, shared: each op on a step's path costs microseconds)."""
    key = (n, str(device))
    if key not in _ARANGES:
        _ARANGES[key] = torch.arange(n, device=device)
    return _ARANGES[key]


def decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, batch: DecodeBatch,
                scale: float, sliding_window: int | None) -> torch.Tensor:
    """Write the step's K/V and attend, one native call per layer (a DecodeBatch exists only
    where the native kernel serves the cache)."""
    window = -1 if sliding_window is None else sliding_window
    return torch.ops.surge_native.paged_decode_step(q, k, v, kv_cache, batch.slot_mapping, batch.block_tables,
                                                    batch.seq_lens, scale, window)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store this step's K/V [T, Hk, D] at their slots."""
    num_blocks, block_size = kv_cache.shape[1], kv_cache.shape[2]
    flat = kv_cache.view(2, num_blocks * block_size, *kv_cache.shape[3:])
    if kv_cache.dtype == torch.int8:
        k, v = quantize_kv(k), quantize_kv(v)
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    tables: torch.Tensor,
    seq_lens: torch.Tensor,
    width: int,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """One query token per sequence, all sequences at once: q [B, Hq, D] -> [B, Hq, D].

    On CPU the native kernel reads the blocks in place (csrc/paged_attention.cpp): 13-36x
    faster than gather + SDPA per sequence and 7-30x than the gathered path
    (benchmarks/paged_attention.py). Elsewhere `gathered_decode_attention`.
    """
    if native_decode(kv_cache):
        window = sliding_window if sliding_window is not None else -1
        return native_ops().paged_decode_attention(q, kv_cache, tables, seq_lens, scale, window)
    return gathered_decode_attention(q, kv_cache, tables, seq_lens, width, scale, sliding_window)


def gathered_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    tables: torch.Tensor,
    seq_lens: torch.Tensor,
    width: int,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The PyTorch decode path: gather each sequence's blocks (`tables` [B, ceil(width /
    block_size)]) into [B, width, Hk, D], mask the slots past its length, and attend with
    grouped heads (Hq = G * Hk) in two batched matmuls.
    """
    b, hq, d = q.shape
    hk, row = kv_cache.shape[3], kv_cache.shape[4]
    dtype = q.dtype if kv_cache.dtype == torch.int8 else kv_cache.dtype
    k = read_kv(kv_cache[0][tables].reshape(b, -1, hk, row)[:, :width], dtype)  # [B, L, Hk, D]
    v = read_kv(kv_cache[1][tables].reshape(b, -1, hk, row)[:, :width], dtype)
    qg = q.view(b, hk, hq // hk, d).to(k.dtype)
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k).float() * scale
    pos = torch.arange(width, device=q.device)
    keep = pos.unsqueeze(0) < seq_lens.unsqueeze(1)
    if sliding_window is not None:
        keep &= pos.unsqueeze(0) > (seq_lens.unsqueeze(1) - 1 - sliding_window)
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1).to(v.dtype)
    return torch.einsum("bhgl,blhd->bhgd", probs, v).reshape(b, hq, d).to(q.dtype)


def single_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    blocks: torch.Tensor,
    seq_len: int,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """One query token of one sequence over its cached context: q [1, Hq, D] -> [1, Hq, D].

    Two float32 matmuls over the gathered blocks, grouped heads as a batch: 2.5-3x faster than
    SDPA for this shape on CPU at 512+ tokens of context (378 vs 150 us per layer at 512,
    bf16 cache), and exact in float32 where SDPA rounds its scores to bf16.
    """
    _, hq, d = q.shape
    hk, row = kv_cache.shape[3], kv_cache.shape[4]
    first = seq_len - sliding_window if sliding_window is not None and seq_len > sliding_window else 0
    k = read_kv(kv_cache[0].index_select(0, blocks).view(-1, hk, row)[first:seq_len], torch.float32)  # [L, Hk, D]
    v = read_kv(kv_cache[1].index_select(0, blocks).view(-1, hk, row)[first:seq_len], torch.float32)
    scores = torch.matmul(q.view(hk, hq // hk, d).float(), k.permute(1, 2, 0)) * scale  # [Hk, G, L]
    out = torch.matmul(scores.softmax(-1), v.transpose(0, 1))  # [Hk, G, D]
    return out.reshape(1, hq, d).to(q.dtype)


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of q [T, Hq, D] over each sequence's cached context -> [T, Hq, D].

    Decoding sequences (one new token) and, with the native kernel, short prompt chunks go
    through `paged_decode_attention` together, a row per token (a lone decoding sequence
    without it through `single_decode_attention`); the other chunks through the prompt-chunk
    kernel in one call where it serves the cache (`meta.prefill_spans`), else each gathers its
    blocks and calls SDPA. Query token j of a sequence with n new tokens and context length L sits at
    position L - n + j and sees keys 0..L-n+j (and only the last `sliding_window` of them
    when the model has a window).
    """
    if meta.decode_seqs is not None:
        decode = (kv_cache, meta.decode_tables, meta.decode_seq_lens, meta.decode_width, scale, sliding_window)
        if not meta.prefill_seqs:
            return paged_decode_attention(q, *decode)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        out[meta.decode_rows] = paged_decode_attention(q[meta.decode_rows], *decode)
    else:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if (meta.prefill_spans is not None and q.dtype == torch.bfloat16 and q.stride(-1) == 1
            and native_prefill(kv_cache)):  # this layer's cache too (a model's layers could differ)
        window = sliding_window if sliding_window is not None else -1
        native_ops().prefill_attention(q, kv_cache, meta.prefill_tables, meta.prefill_spans, scale, window, out)
        return out
    block_size = meta.block_size
    num_kv_heads, row = kv_cache.shape[3], kv_cache.shape[4]
    for i in meta.prefill_seqs or ():
        seq_len = meta.seq_lens[i]
        start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        n = end - start
        num_blocks = -(-seq_len // block_size)
        blocks = meta.block_tables[i, :num_blocks]
        if n == 1:  # a lone decoding sequence
            out[start:end] = single_decode_attention(q[start:end], kv_cache, blocks, seq_len, scale, sliding_window)
            continue
        k = read_kv(kv_cache[0, blocks].reshape(-1, num_kv_heads, row)[:seq_len], q.dtype)
        v = read_kv(kv_cache[1, blocks].reshape(-1, num_kv_heads, row)[:seq_len], q.dtype)
        qi = q[start:end].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
        ki = k.transpose(0, 1).unsqueeze(0)  # [1, Hk, L, D]
        vi = v.transpose(0, 1).unsqueeze(0)
        mask = None
        windowed = sliding_window is not None and seq_len > sliding_window
        causal = not windowed and n == seq_len and n > 1
        if windowed or (n > 1 and n < seq_len):
            q_pos = torch.arange(seq_len - n, seq_len, device=q.device).unsqueeze(1)
            k_pos = torch.arange(seq_len, device=q.device).unsqueeze(0)
            mask = k_pos <= q_pos
            if windowed:
                mask &= k_pos > q_pos - sliding_window
        o = F.scaled_dot_product_attention(
            qi, ki, vi, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=ki.shape[1] != qi.shape[1]
        )
        out[start:end] = o.squeeze(0).transpose(0, 1)
    return out
