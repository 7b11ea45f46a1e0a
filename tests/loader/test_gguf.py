"""GGUF loading: every supported tensor type, llama.cpp's Q/K permutation, the default model's tensors."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from surge.loader import load_model
from surge.loader.gguf import open_gguf
from surge.loader.gguf.weights import SUPPORTED_TYPES, unpermute_qk
from surge.models.llama import LlamaForCausalLM

hf_name = LlamaForCausalLM.gguf_names.hf_name
from tests.conftest import build_tiny_model
from tests.gguf_builder import permute_qk, write_gguf_from_hf
from tests.helpers import assert_logits_close, hf_weight, surge_logits

T = gguf.GGMLQuantizationType

# Each supported type on at least one tensor of a 2-layer model (K-quants need rows of 256).
MIXED_TYPES = {
    "token_embd.weight": T.Q8_0,
    "output.weight": T.Q6_K,
    "blk.0.attn_q.weight": T.F16,
    "blk.0.attn_k.weight": T.BF16,
    "blk.0.attn_v.weight": T.Q4_0,
    "blk.0.attn_output.weight": T.Q4_1,
    "blk.0.ffn_gate.weight": T.Q5_0,
    "blk.0.ffn_up.weight": T.Q5_1,
    "blk.0.ffn_down.weight": T.Q2_K,
    "blk.1.attn_q.weight": T.Q3_K,
    "blk.1.attn_k.weight": T.Q4_K,
    "blk.1.attn_v.weight": T.Q5_K,
    "blk.1.attn_output.weight": T.Q6_K,
    "blk.1.ffn_gate.weight": T.Q8_0,
    "blk.1.ffn_up.weight": T.Q4_K,
    "blk.1.ffn_down.weight": T.F32,
}


def test_every_supported_type_is_covered():
    assert set(MIXED_TYPES.values()) == set(SUPPORTED_TYPES)


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory, tiny_tokenizer_dir):
    base = tmp_path_factory.mktemp("mixed")
    hf = build_tiny_model("llama", base / "hf", tiny_tokenizer_dir, hidden_size=256, intermediate_size=512,
                          num_attention_heads=4, num_key_value_heads=2, initializer_range=0.05)
    return write_gguf_from_hf(hf, base / "mixed.gguf", MIXED_TYPES)


def test_dequantized_tensors_equal_gguf_py(mixed_gguf):
    """Each parameter equals gguf-py's dequantization of its tensor (Q/K rows restored)."""
    loaded = load_model(str(mixed_gguf), "float32", "cpu", quantization="none")
    reader = open_gguf(str(mixed_gguf))
    cfg = loaded.config
    for tensor in reader.tensors:
        want = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
        want = torch.from_numpy(np.array(want, dtype=np.float32)).reshape(
            [int(d) for d in reversed(tensor.shape)])
        name = hf_name(tensor.name)
        if tensor.name.endswith("attn_q.weight"):
            want = unpermute_qk(want, cfg.num_attention_heads)
        elif tensor.name.endswith("attn_k.weight"):
            want = unpermute_qk(want, cfg.num_key_value_heads)
        assert torch.equal(hf_weight(loaded.model, name), want), tensor.name


def test_bf16_runs_the_blocks_on_the_native_kernels(mixed_gguf):
    """In bf16 (the default dtype on AVX-512 BF16) each K-quant and Q5 tensor runs from its
    blocks, a fusion of two formats as its parts (blk.0's Q5_0 gate with its Q5_1 up; blk.1's
    Q8_0 gate with its Q4_K up), one with a float shard (blk.1's Q3_K q) dequantized, the Q8_0
    embedding looked up from its rows; the logits are as close to float32's as those of the same
    weights dequantized to bf16."""
    from surge.layers.linear import ConcatLinear
    from surge.layers.native import linear_ops
    from surge.layers.quantization.quant_embedding import QuantEmbedding
    from surge.layers.quantization.quant_linear import QuantLinear

    if linear_ops() is None:
        pytest.skip("K-quant and Q5 blocks run on AVX-512 BF16 only")
    blocks = load_model(str(mixed_gguf), "bfloat16", "cpu")
    dense = load_model(str(mixed_gguf), "bfloat16", "cpu", quantization="none")
    reference = load_model(str(mixed_gguf), "float32", "cpu", quantization="none")
    layers = blocks.model.model.layers
    kinds = lambda m: [p.kind for p in m.parts]  # noqa: E731
    assert isinstance(layers[0].mlp.gate_up_proj, ConcatLinear) and kinds(layers[0].mlp.gate_up_proj) == ["q5", "q5"]
    assert isinstance(layers[1].mlp.gate_up_proj, ConcatLinear) and kinds(layers[1].mlp.gate_up_proj) == ["int8g", "q4_k"]
    assert isinstance(layers[1].self_attn.o_proj, QuantLinear) and layers[1].self_attn.o_proj.kind == "q6_k"
    assert not isinstance(layers[1].self_attn.qkv_proj, (QuantLinear, ConcatLinear))  # its q came in float
    assert blocks.model.lm_head.kind == "q6_k" and isinstance(blocks.model.model.embed_tokens, QuantEmbedding)
    prompts = [[5, 9, 77, 120, 3], list(range(10, 40))]
    for got, bf16, want in zip(surge_logits(blocks, prompts), surge_logits(dense, prompts),
                               surge_logits(reference, prompts)):
        bound = (bf16.float() - want).abs().max().item()
        assert 0 < (got.float() - want).abs().max().item() <= 2 * bound


def test_fused_projection_of_mixed_block_types_runs_quantized(mixed_gguf):
    """blk.0's q/k are float and its v Q4_0 (as the Qwen2.5 0.5B GGUF mixes Q5_0 q/k with Q8_0 v):
    the fused QKV loads under the default quantization and gives the float model's logits."""
    quantized = load_model(str(mixed_gguf), "float32", "cpu")
    reference = load_model(str(mixed_gguf), "float32", "cpu", quantization="none")
    prompts = [[5, 9, 77, 120, 3], list(range(10, 40))]
    for got, want in zip(surge_logits(quantized, prompts), surge_logits(reference, prompts)):
        assert_logits_close(got, want)


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(12 * 3, dtype=np.float32).reshape(12, 3)
    for heads in (1, 2, 3):
        assert np.array_equal(unpermute_qk(torch.from_numpy(permute_qk(w, heads)), heads).numpy(), w)


def test_mixed_type_gguf_matches_transformers(mixed_gguf):
    """Same file through transformers' own GGUF dequantization and un-permutation: same logits."""
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(
        mixed_gguf.parent, gguf_file=mixed_gguf.name, dtype=torch.float32).eval()
    loaded = load_model(str(mixed_gguf), "float32", "cpu", quantization="none")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 384, (n,), generator=g).tolist() for n in (3, 20, 50)]
    for ids, got in zip(prompts, surge_logits(loaded, prompts)):
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits[0]
        assert_logits_close(got, want)


def test_default_model_tensors_equal_gguf_py(default_llm, default_gguf_path):
    """The embedded Q4_1/Q8_0 model: surge's float weights are gguf-py's dequantized values."""
    reader = open_gguf(default_gguf_path)
    cfg = default_llm.engine.model_config
    checked = 0
    for tensor in reader.tensors:
        if not (tensor.name.startswith(("blk.0.", "blk.29.", "token_embd", "output_norm"))):
            continue
        want = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
        want = torch.from_numpy(np.array(want, dtype=np.float32)).reshape(
            [int(d) for d in reversed(tensor.shape)])
        if tensor.name.endswith("attn_q.weight"):
            want = unpermute_qk(want, cfg.num_attention_heads)
        elif tensor.name.endswith("attn_k.weight"):
            want = unpermute_qk(want, cfg.num_key_value_heads)
        assert torch.equal(hf_weight(default_llm.engine.core.executor.worker.model, hf_name(tensor.name)), want), tensor.name
        checked += 1
    assert checked == 20
    model = default_llm.engine.core.executor.worker.model
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied


def test_gguf_file_reads_what_gguf_py_reads(default_gguf_path):
    """surge's one-pass GGUF parser: the same metadata values, tensor table and data as gguf-py."""
    ours, theirs = open_gguf(default_gguf_path), gguf.GGUFReader(default_gguf_path)
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}  # gguf-py's header
    assert set(ours.metadata) == set(fields)
    for key, field in fields.items():
        assert ours.metadata[key] == field.contents(), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.tensor_type, a.data_offset, a.n_bytes, a.n_elements) == (b.tensor_type, b.data_offset, b.n_bytes, b.n_elements)
        assert a.shape.tolist() == b.shape.tolist() and a.data.shape == b.data.shape and a.data.dtype == b.data.dtype
        assert np.array_equal(a.data, b.data), a.name


def test_phi3_fused_tensors_quantized_whole_split_into_their_shards(tmp_path, tiny_tokenizer_dir):
    """Phi-3 GGUFs store q/k/v as one attn_qkv and gate/up as one ffn_up: in Q8_0 / Q4_0 / Q4_1
    they run quantized from their blocks, and give the dequantized model's logits."""
    from surge.layers.quantization.quant_linear import QuantLinear

    hf = build_tiny_model("phi3", tmp_path / "hf", tiny_tokenizer_dir)
    types = {"blk.0.attn_qkv.weight": T.Q8_0, "blk.0.ffn_up.weight": T.Q4_0,
             "blk.1.attn_qkv.weight": T.Q4_1, "blk.1.ffn_up.weight": T.Q8_0}
    path = write_gguf_from_hf(hf, tmp_path / "phi3.gguf", types, arch="phi3")
    quantized = load_model(str(path), "float32", "cpu")
    reference = load_model(str(path), "float32", "cpu", quantization="none")
    for layer in quantized.model.model.layers:
        assert isinstance(layer.self_attn.qkv_proj, QuantLinear) and isinstance(layer.mlp.gate_up_proj, QuantLinear)
    prompts = [[5, 9, 77, 120, 3], list(range(10, 40)), [7]]
    for got, want in zip(surge_logits(quantized, prompts), surge_logits(reference, prompts)):
        assert_logits_close(got, want, rel=1e-3)
    # a file whose metadata disagrees with its fused tensor: the tensor and both row counts named
    from surge.errors import ModelFormatError
    from tests.gguf_builder import rewrite_gguf

    kv = {"phi3.attention.head_count_kv": (1, gguf.GGUFValueType.UINT32)}
    bad = rewrite_gguf(path, tmp_path / "bad.gguf", metadata=kv)
    with pytest.raises(ModelFormatError, match=r"'model.layers.0.self_attn.qkv_proj.weight' has 128 rows, the model expects 96"):
        load_model(str(bad))
    bad_float = rewrite_gguf(write_gguf_from_hf(hf, tmp_path / "f32.gguf", arch="phi3"), tmp_path / "bad32.gguf",
                             metadata=kv)
    with pytest.raises(ModelFormatError, match=r"qkv_proj.weight' has shape \(128, 64\), the model expects \(96, 64\)"):
        load_model(str(bad_float))
