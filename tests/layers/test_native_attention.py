"""The native paged decode kernel (csrc/paged_attention.cpp) against a dense float64 reference:
every group size it specializes, head sizes on and off its vector path, contexts split into
several partitions, sliding windows, mixed dtypes, a strided query; and its input checks."""

from __future__ import annotations

import os

import pytest
import torch

from surge.layers.native import native_ops

BS = 16


@pytest.fixture(scope="module")
def ops():
    built = native_ops()
    if os.environ.get("SURGE_NATIVE_KERNELS") == "0":
        pytest.skip("native kernels disabled by SURGE_NATIVE_KERNELS=0")
    assert built is not None, "the native kernels did not build (see the log: compiler, ninja)"
    return built


def make(batch: int, hq: int, hk: int, d: int, lens: list[int], q_dtype, kv_dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    width = max(-(-n // BS) for n in lens)
    num_blocks = batch * width + 3
    cache = torch.randn(2, num_blocks, BS, hk, d, generator=gen).to(kv_dtype)
    tables = torch.randperm(num_blocks, generator=gen)[: batch * width].view(batch, width)
    q = torch.randn(batch, hq, d, generator=gen).to(q_dtype)
    return q, cache, tables, torch.tensor(lens, dtype=torch.int64)


def reference(q, cache, tables, lens, scale, window):
    b, hq, d = q.shape
    hk = cache.shape[3]
    out = torch.empty(b, hq, d, dtype=torch.float64)
    for i in range(b):
        n = int(lens[i])
        first = n - window if window >= 0 and n > window else 0
        k = cache[0, tables[i]].reshape(-1, hk, d)[first:n].double().repeat_interleave(hq // hk, 1)
        v = cache[1, tables[i]].reshape(-1, hk, d)[first:n].double().repeat_interleave(hq // hk, 1)
        p = (torch.einsum("hd,lhd->hl", q[i].double(), k) * scale).softmax(-1)
        out[i] = torch.einsum("hl,lhd->hd", p, v)
    return out


@pytest.mark.parametrize("group", [1, 2, 3, 4, 5, 6, 7, 8, 12])  # 12: beyond the specialized sizes
# 96 (Phi-3), 256 (Gemma 3): vector loops without a fixed kernel; 40: not a multiple of the vector width
@pytest.mark.parametrize("head_dim", [64, 128, 96, 256, 40])
def test_group_and_head_sizes(ops, group, head_dim):
    hk = 2
    q, cache, tables, lens = make(3, hk * group, hk, head_dim, [1, 37, 70], torch.float32, torch.float32)
    scale = head_dim**-0.5
    out = ops.paged_decode_attention(q, cache, tables, lens, scale, -1)
    torch.testing.assert_close(out.double(), reference(q, cache, tables, lens, scale, -1), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("window", [-1, 1, 50, 700])
def test_long_contexts_in_partitions_and_windows(ops, window):
    # 3000 tokens is several partitions of one sequence; the others end inside a partition.
    lens = [3000, 513, 17, 1200]
    q, cache, tables, lens_t = make(4, 9, 3, 64, lens, torch.float32, torch.float32, seed=1)
    out = ops.paged_decode_attention(q, cache, tables, lens_t, 0.125, window)
    torch.testing.assert_close(out.double(), reference(q, cache, tables, lens_t, 0.125, window), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_same_result_on_any_thread_count(ops, threads):
    q, cache, tables, lens = make(5, 9, 3, 64, [900, 1, 300, 64, 1000], torch.bfloat16, torch.bfloat16, seed=2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = ops.paged_decode_attention(q, cache, tables, lens, 0.125, -1)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out.double(), reference(q, cache, tables, lens, 0.125, -1), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("q_dtype,kv_dtype", [
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
    (torch.float32, torch.bfloat16),
])
@pytest.mark.parametrize("head_dim", [64, 256])
def test_dtypes(ops, q_dtype, kv_dtype, head_dim):
    q, cache, tables, lens = make(3, 9, 3, head_dim, [5, 200, 64], q_dtype, kv_dtype, seed=3)
    out = ops.paged_decode_attention(q, cache, tables, lens, 0.125, -1)
    assert out.dtype == q_dtype and out.shape == q.shape
    # Exact float32 math on the stored values: only the output's rounding to q's dtype remains.
    torch.testing.assert_close(out.double(), reference(q, cache, tables, lens, 0.125, -1), atol=8e-3, rtol=8e-3)


def test_strided_query_and_table_rows(ops):
    # q as the model has it: a view of the fused QKV projection; table rows a slice of a wider table.
    q, cache, tables, lens = make(3, 9, 3, 64, [40, 2, 90], torch.float32, torch.float32, seed=4)
    qkv = torch.cat([q.reshape(3, -1), torch.randn(3, 2 * 3 * 64)], dim=1)
    q_view = qkv[:, : 9 * 64].view(3, 9, 64)
    assert not q_view.is_contiguous()
    wide = torch.cat([tables, torch.zeros(3, 4, dtype=torch.int64)], dim=1)
    out = ops.paged_decode_attention(q_view, cache, wide, lens, 0.125, -1)
    torch.testing.assert_close(out.double(), reference(q, cache, tables, lens, 0.125, -1), atol=2e-5, rtol=2e-5)
    # A query strided along the head dimension takes the element-by-element load.
    q_cols = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert q_cols.stride(2) != 1
    out = ops.paged_decode_attention(q_cols, cache, tables, lens, 0.125, -1)
    torch.testing.assert_close(out.double(), reference(q, cache, tables, lens, 0.125, -1), atol=2e-5, rtol=2e-5)


def test_empty_batch(ops):
    q, cache, tables, lens = make(1, 9, 3, 64, [4], torch.float32, torch.float32)
    out = ops.paged_decode_attention(q[:0], cache, tables[:0], lens[:0], 0.125, -1)
    assert out.shape == (0, 9, 64)


@pytest.mark.parametrize("case,message", [
    ("short_table", "block table too short"),
    ("zero_len", "seq_len must be >= 1"),
    ("heads", "multiple of KV heads"),
    ("head_dim", "head sizes differ"),
    ("int_table", "block_tables must be int64"),
    ("lens_count", "seq_lens must be int64"),
    ("int8_rows_without_scales", "head sizes differ"),  # int8 rows are D values and a 2-byte scale
    ("int16_cache", "unsupported dtype"),
])
def test_bad_inputs_raise_clear_errors(ops, case, message):
    q, cache, tables, lens = make(2, 9, 3, 64, [20, 40], torch.float32, torch.float32)
    if case == "short_table":
        lens = torch.tensor([20, 40 + BS * 10])
    elif case == "zero_len":
        lens = torch.tensor([0, 40])
    elif case == "heads":
        q = torch.randn(2, 8, 64)
    elif case == "head_dim":
        q = torch.randn(2, 9, 32)
    elif case == "int_table":
        tables = tables.int()
    elif case == "lens_count":
        lens = lens[:1]
    elif case == "int8_rows_without_scales":
        cache = cache.to(torch.int8)
    elif case == "int16_cache":
        cache = cache.to(torch.int16)
    with pytest.raises(RuntimeError, match=message):
        ops.paged_decode_attention(q, cache, tables, lens, 0.125, -1)


def _new_kv(kind: str):
    """This step's K and V [3, 3, 64] as the callers hand them over."""
    gen = torch.Generator().manual_seed(6)
    if kind == "float32":  # converted to the bf16 cache element by element
        return torch.randn(3, 3, 64, generator=gen), torch.randn(3, 3, 64, generator=gen)
    if kind == "fused_views":  # the model's case: bf16 views of the fused QKV output, copied row by row
        qkv = torch.randn(3, (9 + 2 * 3) * 64, generator=gen).bfloat16()
        k, v = qkv[:, 9 * 64: 12 * 64].view(3, 3, 64), qkv[:, 12 * 64:].view(3, 3, 64)
        assert not k.is_contiguous()
        return k, v
    # bf16 with a non-unit stride along the head dimension
    k, v = (torch.randn(3, 64, 3, generator=gen).bfloat16().transpose(1, 2) for _ in range(2))
    assert k.stride(2) != 1
    return k, v


@pytest.mark.parametrize("kind", ["float32", "fused_views", "strided_head_dim"])
def test_decode_step_writes_kv_then_attends(ops, kind):
    # Each sequence's new K/V lands at its slot (converted to the cache dtype) and is attended.
    q, cache, tables, lens = make(3, 9, 3, 64, [1, 20, 33], torch.bfloat16, torch.bfloat16, seed=5)
    k_new, v_new = _new_kv(kind)
    last = lens - 1
    slots = tables[torch.arange(3), last // BS] * BS + last % BS
    expected_cache = cache.clone().view(2, -1, 3, 64)
    expected_cache[0, slots] = k_new.bfloat16()
    expected_cache[1, slots] = v_new.bfloat16()
    out = ops.paged_decode_step(q, k_new, v_new, cache, slots, tables, lens, 0.125, -1)
    assert torch.equal(cache.view(2, -1, 3, 64), expected_cache)
    torch.testing.assert_close(out.double(), reference(q, cache, tables, lens, 0.125, -1), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("case,message", [
    ("slot_outside", "outside the cache"),
    ("kv_shapes", "k and v must be"),
    ("kv_heads", "match the cache"),
    ("slot_count", "slot_mapping must be int64"),
])
def test_decode_step_bad_inputs(ops, case, message):
    q, cache, tables, lens = make(2, 9, 3, 64, [20, 40], torch.float32, torch.float32)
    k, v = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    slots = torch.tensor([19, 39])
    if case == "slot_outside":
        slots = torch.tensor([19, cache.shape[1] * BS])
    elif case == "kv_shapes":
        v = torch.randn(2, 3, 32)
    elif case == "kv_heads":
        k, v = torch.randn(2, 2, 64), torch.randn(2, 2, 64)
    elif case == "slot_count":
        slots = slots[:1]
    before = cache.clone()
    with pytest.raises(RuntimeError, match=message):
        ops.paged_decode_step(q, k, v, cache, slots, tables, lens, 0.125, -1)
    assert torch.equal(cache, before)  # checked before anything is written


def test_ninja_found_without_the_venv_on_path(monkeypatch):
    # `.venv/bin/surge serve` from a shell where the venv is not activated: the builder still finds ninja.
    import ninja

    from surge.layers import native

    monkeypatch.setenv("PATH", "/nonexistent")
    native._ninja_on_path()
    assert os.environ["PATH"].split(os.pathsep)[0] == ninja.BIN_DIR
    assert native.shutil.which("ninja") is not None


@pytest.mark.parametrize("case", ["no_compiler", "disabled"])
def test_without_the_kernel_surge_keeps_the_torch_path(monkeypatch, caplog, case):
    from surge.layers import attention, native

    monkeypatch.setattr(native, "_state", {})  # forget the loaded kernel for this test only
    if case == "no_compiler":
        def fail() -> None:
            raise RuntimeError("Error building extension 'surge_native'\nc++: command not found")

        monkeypatch.setattr(native, "_build", fail)
    else:
        monkeypatch.setenv("SURGE_NATIVE_KERNELS", "0")
    with caplog.at_level("INFO", logger="surge.layers.native"):
        assert native.native_ops() is None
    assert ("c++: command not found" in caplog.text) if case == "no_compiler" else ("disabled" in caplog.text)
    assert not attention.native_decode(torch.zeros(2, 1, BS, 3, 64))


def test_a_lowered_aten_capability_turns_the_avx512_kernels_off(monkeypatch):
    # ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU: the kernels are built for AVX2 then, so the
    # linears, the W8A8 kernel and the prompt-chunk kernel must not be chosen (they would raise
    # "this build has no AVX-512 BF16" in the first step)
    from surge.layers import attention, native

    monkeypatch.setattr(native.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not native.has_avx512_bf16() and not native.has_avx512_vnni()
    assert native.linear_ops() is None and native.w8a8_ops() is None
    assert not attention.native_prefill(torch.zeros(2, 1, BS, 1, 64, dtype=torch.bfloat16))
    assert "-mavx512bf16" not in native._isa_flags()
