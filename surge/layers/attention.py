"""Attention over a paged KV cache for a flat batch of tokens from many sequences.

KV cache of one layer: [2, num_blocks, block_size, num_kv_heads, head_dim] (K then V).
A token's K/V is written to its slot = block_id * block_size + offset (the slot mapping);
each sequence reads its context back through its block table:

    block_table[i] = [7, 2, 9]      block_size = 4, seq_len = 10
    context slots  = 7*4+0..3, 2*4+0..3, 9*4+0..1

The flat batch holds each sequence's new tokens back to back (query_start_loc marks the
boundaries), so prefill chunks and single decode tokens mix in one step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step layout of the flat batch; built by the model runner, shared by every layer."""

    slot_mapping: torch.Tensor  # [num_tokens] int64, cache slot of each new token
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64 (padded with 0)
    query_start_loc: list[int]  # [num_seqs + 1] offsets of each sequence's tokens in the batch
    seq_lens: list[int]  # [num_seqs] context length after this step (computed + new)
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store this step's K/V [T, Hk, D] at their slots."""
    num_blocks, block_size = kv_cache.shape[1], kv_cache.shape[2]
    flat = kv_cache.view(2, num_blocks * block_size, *kv_cache.shape[3:])
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of q [T, Hq, D] over each sequence's cached context -> [T, Hq, D].

    Reference implementation: gathers each sequence's blocks and calls SDPA. Query token j of a
    sequence with n new tokens and context length L sits at position L - n + j and sees keys
    0..L-n+j (and only the last `sliding_window` of them when the model has a window).
    """
    out = torch.empty_like(q)
    block_size = meta.block_size
    num_kv_heads, head_dim = kv_cache.shape[3], kv_cache.shape[4]
    for i, seq_len in enumerate(meta.seq_lens):
        start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        n = end - start
        if n == 0:
            continue
        num_blocks = -(-seq_len // block_size)
        blocks = meta.block_tables[i, :num_blocks]
        k = kv_cache[0, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
        v = kv_cache[1, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
        qi = q[start:end].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
        ki = k.transpose(0, 1).unsqueeze(0).to(q.dtype)  # [1, Hk, L, D]
        vi = v.transpose(0, 1).unsqueeze(0).to(q.dtype)
        mask = None
        causal = False
        if sliding_window is not None and seq_len > sliding_window:
            q_pos = torch.arange(seq_len - n, seq_len, device=q.device).unsqueeze(1)
            k_pos = torch.arange(seq_len, device=q.device).unsqueeze(0)
            mask = (k_pos <= q_pos) & (k_pos > q_pos - sliding_window)
        elif n == seq_len:
            causal = n > 1
        elif n > 1:
            q_pos = torch.arange(seq_len - n, seq_len, device=q.device).unsqueeze(1)
            mask = torch.arange(seq_len, device=q.device).unsqueeze(0) <= q_pos
        o = F.scaled_dot_product_attention(
            qi, ki, vi, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=ki.shape[1] != qi.shape[1]
        )
        out[start:end] = o.squeeze(0).transpose(0, 1)
    return out
