"""Micro-benchmark of decode attention over the paged KV cache, one query token per sequence.

Three implementations on the same random cache and block tables (the default model's heads:
9 query heads, 3 KV heads, head size 64; block size 16):

  gather+sdpa   per sequence: gather its blocks, F.scaled_dot_product_attention (the baseline)
  gather+bmm    all sequences: one gathered copy [B, L, Hk, D], masked, two batched einsums
                (surge's batched decode path before the native kernel)
  native        surge_native.paged_decode_attention: reads the blocks in place (csrc/)

With --kv-int8, the native kernel on a bf16 cache against the same values quantized into the
int8 cache (`--kv-cache-dtype int8`: rows of D int8 values and an fp16 scale), errors of both
against float64 on the unquantized values.

With --prefill, prompt chunks instead (S sequences of n new tokens after c cached ones), through
surge's `paged_attention` three ways: gather + SDPA per sequence (the path, without the
prompt-chunk kernel, for chunks with more than NATIVE_PREFILL_MAX_CONTEXT tokens of context),
the chunk's tokens as rows of the native decode kernel, each row attending its own prefix, and
the prompt-chunk kernel (csrc/prefill_attention.cpp: bf16 only). --heads HQ,HK,D picks other
head shapes (Gemma 3 270M: 4,1,256; Qwen2.5-1.5B: 12,2,128).

    python benchmarks/paged_attention.py [--threads 2] [--dtype bfloat16] [--prefill [--heads 9,3,64] | --kv-int8]
                                         [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
import torch.nn.functional as F

from surge.layers import attention
from surge.layers.attention import AttentionMetadata, gathered_decode_attention, paged_attention, quantize_kv
from surge.layers.native import native_ops

HQ, HK, D, BS = 9, 3, 64, 16
SHAPES = [(1, 128), (1, 512), (1, 2048), (8, 128), (8, 1024), (32, 256), (32, 1024)]
PREFILL_SHAPES = [(32, 48, 0), (8, 128, 0), (1, 512, 0), (1, 1024, 0), (1, 2048, 0), (1, 256, 512)]  # (S, n, c)


def make_case(batch: int, context: int, dtype: torch.dtype, gen: torch.Generator):
    blocks_per_seq = -(-context // BS)
    num_blocks = batch * blocks_per_seq + 8
    cache = torch.randn(2, num_blocks, BS, HK, D, generator=gen).to(dtype)
    tables = torch.randperm(num_blocks, generator=gen)[: batch * blocks_per_seq].view(batch, blocks_per_seq)
    # Lengths spread over the last quarter of the context, as in a serving batch.
    lens = torch.randint(max(1, context * 3 // 4), context + 1, (batch,), generator=gen)
    q = torch.randn(batch, HQ, D, generator=gen).to(dtype)
    return q, cache, tables, lens


def gather_sdpa(q, cache, tables, lens, scale):
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        n = int(lens[i])
        blocks = tables[i, : -(-n // BS)]
        k = cache[0, blocks].reshape(-1, HK, D)[:n].transpose(0, 1).unsqueeze(0)
        v = cache[1, blocks].reshape(-1, HK, D)[:n].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(q[i][None, :, None], k, v, scale=scale, enable_gqa=True)
        out[i] = o[0, :, 0]
    return out


def gather_bmm(q, cache, tables, lens, scale):
    width = int(lens.max())
    return gathered_decode_attention(q, cache, tables[:, : -(-width // BS)], lens, width, scale)


def native(q, cache, tables, lens, scale):
    return native_ops().paged_decode_attention(q, cache, tables, lens, scale, -1)


def reference(q, cache, tables, lens, scale):
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(q.shape[0]):
        n = int(lens[i])
        blocks = tables[i, : -(-n // BS)]
        k = cache[0, blocks].reshape(-1, HK, D)[:n].double().repeat_interleave(HQ // HK, 1)
        v = cache[1, blocks].reshape(-1, HK, D)[:n].double().repeat_interleave(HQ // HK, 1)
        p = (torch.einsum("hd,lhd->hl", q[i].double(), k) * scale).softmax(-1)
        out[i] = torch.einsum("hl,lhd->hd", p, v)
    return out


def time_us(fn, *args, min_time: float = 0.3) -> float:
    fn(*args)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_time or n < 3:
        fn(*args)
        n += 1
    return (time.perf_counter() - start) / n * 1e6


def prefill_case(seqs: int, new: int, cached: int, dtype: torch.dtype, gen: torch.Generator):
    """A step of `seqs` prompt chunks of `new` tokens after `cached` ones: q, cache, metadata."""
    blocks = -(-(cached + new) // BS)
    num_blocks = seqs * blocks + 8
    cache = torch.randn(2, num_blocks, BS, HK, D, generator=gen).to(dtype)
    tables = torch.randperm(num_blocks, generator=gen)[: seqs * blocks].view(seqs, blocks)
    q = torch.randn(seqs * new, HQ, D, generator=gen).to(dtype)
    meta = AttentionMetadata(slot_mapping=torch.zeros(seqs * new, dtype=torch.int64), block_tables=tables,
                             query_start_loc=[i * new for i in range(seqs + 1)], seq_lens=[cached + new] * seqs,
                             block_size=BS)
    return q, cache, meta


def with_limit(meta: AttentionMetadata, limit: int, chunk_kernel: bool = False) -> AttentionMetadata:
    """The step split as it is with NATIVE_PREFILL_MAX_CONTEXT = limit (and the prompt-chunk
    kernel, or not)."""
    saved = attention.NATIVE_PREFILL_MAX_CONTEXT
    attention.NATIVE_PREFILL_MAX_CONTEXT = limit
    try:
        meta.split_decode(native=True, native_prefill=chunk_kernel)
        return dataclasses.replace(meta)
    finally:
        attention.NATIVE_PREFILL_MAX_CONTEXT = saved


def prefill_reference(q, cache, meta, scale):
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(meta.num_seqs):
        start, end, n = meta.query_start_loc[i], meta.query_start_loc[i + 1], meta.seq_lens[i]
        blocks = meta.block_tables[i, : -(-n // BS)]
        k = cache[0, blocks].reshape(-1, HK, D)[:n].double().repeat_interleave(HQ // HK, 1)
        v = cache[1, blocks].reshape(-1, HK, D)[:n].double().repeat_interleave(HQ // HK, 1)
        scores = torch.einsum("thd,lhd->htl", q[start:end].double(), k) * scale
        keep = torch.arange(n)[None, :] <= torch.arange(n - (end - start), n)[:, None]
        out[start:end] = torch.einsum("htl,lhd->thd", scores.masked_fill(~keep, float("-inf")).softmax(-1), v)
    return out


def run_prefill(dtype: torch.dtype, gen: torch.Generator) -> list[dict]:
    scale = D**-0.5
    rows = []
    chunk_kernel = dtype == torch.bfloat16 and attention.native_prefill(torch.empty(1, D, dtype=dtype))
    print(f"heads {HQ} / {HK}, head size {D}: us per call (max abs error against float64)")
    print(f"{'S x n after c':>18} {'gather+sdpa':>20} {'native rows':>20} {'chunk kernel':>20}")
    for seqs, new, cached in PREFILL_SHAPES:
        q, cache, meta = prefill_case(seqs, new, cached, dtype, gen)
        ref = prefill_reference(q, cache, meta, scale)
        metas = {"gather_sdpa": with_limit(meta, 0), "native_rows": with_limit(meta, 1 << 30)}
        if chunk_kernel:
            metas["chunk_kernel"] = with_limit(meta, 1 << 30, chunk_kernel=True)
        errs = {k: (paged_attention(q, cache, m, scale).double() - ref).abs().max().item() for k, m in metas.items()}
        t = {k: time_us(paged_attention, q, cache, m, scale) for k, m in metas.items()}
        rows.append({"seqs": seqs, "new": new, "cached": cached, "us": t, "max_abs_err": errs})
        cells = [f"{t[k]:>9.0f} ({errs[k]:.1e})" if k in t else f"{'-':>20}"
                 for k in ("gather_sdpa", "native_rows", "chunk_kernel")]
        print(f"{seqs:>5} x {new:<4} after {cached:<4} " + " ".join(f"{c:>20}" for c in cells))
    return rows


def main() -> None:
    global HQ, HK, D
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--prefill", action="store_true", help="prompt chunks instead of decoding sequences")
    ap.add_argument("--heads", default=f"{HQ},{HK},{D}", help="with --prefill: query heads, KV heads, head size")
    ap.add_argument("--kv-int8", action="store_true", help="the native kernel on bf16 against int8 caches")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if native_ops() is None:
        raise SystemExit("the native kernels could not be built (see the warning above)")
    gen = torch.Generator().manual_seed(0)
    if args.prefill:
        try:
            HQ, HK, D = (int(x) for x in args.heads.split(","))
        except ValueError:
            raise SystemExit(f"--heads {args.heads!r}: expected three integers, e.g. 9,3,64") from None
        if HQ % HK or D <= 0:
            raise SystemExit(f"--heads {args.heads!r}: query heads must be a multiple of KV heads")
        rows = run_prefill(dtype, gen)
    elif args.kv_int8:
        rows = run_kv_int8(gen)
    else:
        rows = run_decode(dtype, gen)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "dtype": args.dtype, "prefill": args.prefill, "kv_int8": args.kv_int8,
                       "heads": [HQ, HK, D],
                       "rows": rows}, f, indent=2)


def run_decode(dtype: torch.dtype, gen: torch.Generator) -> list[dict]:
    scale = D**-0.5
    rows = []
    print(f"{'batch x context':>16} {'gather+sdpa us':>15} {'gather+bmm us':>14} {'native us':>10} "
          f"{'vs sdpa':>8} {'vs bmm':>7} {'native err':>10} {'sdpa err':>8}")
    for batch, context in SHAPES:
        case = make_case(batch, context, dtype, gen)
        ref = reference(*case, scale)
        # Error of each against float64; the native kernel computes in float32 like gather+bmm.
        errs = {fn.__name__: (fn(*case, scale).double() - ref).abs().max().item() for fn in (gather_sdpa, gather_bmm, native)}
        err = errs["native"]
        t = {fn.__name__: time_us(fn, *case, scale) for fn in (gather_sdpa, gather_bmm, native)}
        rows.append({"batch": batch, "context": context, "us": t, "max_abs_err": errs})
        print(f"{batch:>7} x {context:<6} {t['gather_sdpa']:>15.0f} {t['gather_bmm']:>14.0f} {t['native']:>10.0f} "
              f"{t['gather_sdpa'] / t['native']:>7.1f}x {t['gather_bmm'] / t['native']:>6.1f}x {err:>10.1e} {errs['gather_sdpa']:>8.1e}")
    return rows


def run_kv_int8(gen: torch.Generator) -> list[dict]:
    scale = D**-0.5
    rows = []
    print(f"{'batch x context':>16} {'bf16 us':>9} {'int8 us':>9} {'ratio':>7} {'bf16 err':>9} {'int8 err':>9}")
    for batch, context in SHAPES:
        q, cache, tables, lens = make_case(batch, context, torch.float32, gen)
        ref = reference(q, cache, tables, lens, scale)
        cases = {"bf16": (q.bfloat16(), cache.bfloat16()), "int8": (q.bfloat16(), quantize_kv(cache))}
        t = {k: time_us(native, qq, c, tables, lens, scale) for k, (qq, c) in cases.items()}
        errs = {k: (native(qq, c, tables, lens, scale).double() - ref).abs().max().item() for k, (qq, c) in cases.items()}
        rows.append({"batch": batch, "context": context, "us": t, "max_abs_err": errs})
        print(f"{batch:>7} x {context:<6} {t['bf16']:>9.0f} {t['int8']:>9.0f} {t['bf16'] / t['int8']:>6.2f}x "
              f"{errs['bf16']:>9.1e} {errs['int8']:>9.1e}")
    return rows


if __name__ == "__main__":
    main()
