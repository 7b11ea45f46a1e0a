"""Mixture-of-experts beyond the float reference (tests/models/test_reference_models.py has
logits, chunked prefill, greedy tokens, prefix hits, preemption and GGUF for each family):
experts quantized under -q int4/int8, the compiled forward, and the errors a user can reach."""

from __future__ import annotations

import json
import shutil

import gguf
import pytest
import torch

from surge import LLM, SamplingParams
from surge.errors import ModelFormatError, UnsupportedArchitectureError
from surge.layers.moe import SparseMoeBlock, TopKRouter
from surge.layers.quantization.quant_linear import QuantLinear
from surge.loader import describe_quantization, load_model
from tests.conftest import build_tiny_model
from tests.gguf_builder import rewrite_gguf, write_gguf_from_hf
from tests.helpers import assert_logits_close, assert_quantize_cli_refuses, surge_logits
from tests.models.test_reference_models import VARIANTS, _prompts

KV = gguf.GGUFValueType


def _tiny(variant, tmp_path_factory, tokenizer_dir):
    kind, overrides = VARIANTS[variant]
    return build_tiny_model(kind, tmp_path_factory.mktemp(variant), tokenizer_dir, **overrides)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory, tiny_tokenizer_dir):
    return _tiny("mixtral", tmp_path_factory, tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def qwen2_moe(tmp_path_factory, tiny_tokenizer_dir):
    return _tiny("qwen2-moe", tmp_path_factory, tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory, tiny_tokenizer_dir):
    return _tiny("qwen3-moe", tmp_path_factory, tiny_tokenizer_dir)


def _float_with_weights_of(path, quant):
    """The float model with every weight replaced by what `quant`'s quantized modules hold."""
    ref = load_model(str(path), "float32", "cpu", "none")
    modules = dict(ref.model.named_modules())
    with torch.no_grad():
        for name, module in quant.model.named_modules():
            if isinstance(module, QuantLinear) and ".expert_linears." not in name:
                modules[name].weight.copy_(module.dequantize())
            elif isinstance(module, SparseMoeBlock):
                experts = modules[name].experts
                for e, (gate_up, down) in enumerate(module.experts.expert_linears):
                    experts.gate_up_proj[e].copy_(gate_up.dequantize())
                    experts.down_proj[e].copy_(down.dequantize())
    return ref


@pytest.mark.parametrize("variant, scheme", [("mixtral", "int8"), ("mixtral", "int4"), ("qwen2-moe", "int8"),
                                             ("qwen3-moe", "int4")])
def test_experts_are_quantized_one_module_each(variant, scheme, mixtral, qwen2_moe, qwen3_moe):
    """-q int8/int4: every expert's gate/up and down become quantized linears (the routers stay
    float32), and the model computes exactly what the float model does with those quantized
    weights: each expert's rows went to its own module, gate and up in their order."""
    path = {"mixtral": mixtral, "qwen2-moe": qwen2_moe, "qwen3-moe": qwen3_moe}[variant]
    quant = load_model(str(path), "float32", "cpu", scheme)
    config = quant.config
    blocks = [m for m in quant.model.modules() if isinstance(m, SparseMoeBlock)]
    assert len(blocks) == sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers)) > 0
    for block in blocks:
        assert type(block.gate) is TopKRouter and block.gate.weight.dtype == torch.float32
        linears = block.experts.expert_linears
        assert linears is not None and len(linears) == config.num_experts and not hasattr(block.experts, "gate_up_proj")
        assert all(isinstance(linear, QuantLinear) for pair in linears for linear in pair)
    quantized = {name for name, m in quant.model.named_modules() if isinstance(m, QuantLinear)}
    float_linears = [name for name, m in quant.model.named_modules()
                     if isinstance(m, torch.nn.Linear) and name.rpartition(".")[0] not in quantized]
    assert float_linears == []  # every linear quantized (a QuantLinear may keep its own dense copy)
    assert describe_quantization(quant.model) != "none"

    ref = _float_with_weights_of(path, quant)
    prompts = _prompts((1, 5, 17, 40))
    for want, got in zip(surge_logits(ref, prompts), surge_logits(quant, prompts)):
        assert_logits_close(got, want, rel=1e-3)


def test_quantized_experts_generate_in_bf16(mixtral):
    """The default dtype with int4 experts serves a mixed batch to the end."""
    llm = LLM(str(mixtral), quantization="int4", kv_cache_memory=8 << 20)
    outs = llm.generate(_prompts((3, 30, 12)), SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outs] == [12, 12, 12]
    assert llm.engine.is_idle_clean()


@pytest.fixture(scope="module")
def k_quant_mixtral_gguf(tmp_path_factory, tiny_tokenizer_dir):
    """A Mixtral wide enough for K-quant rows (256), its expert stacks in three formats: Q4_K
    gate, Q5_0 up (a gate/up pair of two formats), Q6_K down; attention in Q8_0."""
    base = tmp_path_factory.mktemp("kq-mixtral")
    hf = build_tiny_model("mixtral", base / "hf", tiny_tokenizer_dir, hidden_size=256, intermediate_size=256,
                          num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                          initializer_range=0.05, sliding_window=None)
    types = {}
    for layer in range(2):
        types |= {f"blk.{layer}.ffn_gate_exps.weight": gguf.GGMLQuantizationType.Q4_K,
                  f"blk.{layer}.ffn_up_exps.weight": gguf.GGMLQuantizationType.Q5_0,
                  f"blk.{layer}.ffn_down_exps.weight": gguf.GGMLQuantizationType.Q6_K,
                  f"blk.{layer}.attn_q.weight": gguf.GGMLQuantizationType.Q8_0}
    return write_gguf_from_hf(hf, base / "kq-mixtral.gguf", types, arch="llama")


def test_gguf_experts_run_from_their_blocks(k_quant_mixtral_gguf):
    """-q auto in bf16: each expert runs from its own blocks (no stacked float weights left),
    gate and up of two formats as the parts of one linear; its logits are as close to the
    float32 model's as the same weights dequantized to bf16. In float32 (no block kernels) the
    stacks are dequantized, exactly the float model; a stack of the wrong size is named."""
    from surge.layers.linear import ConcatLinear
    from surge.layers.native import linear_ops

    reference = load_model(str(k_quant_mixtral_gguf), "float32", "cpu", "none")
    fallback = load_model(str(k_quant_mixtral_gguf), "float32", "cpu")
    prompts = _prompts((1, 5, 17, 40))
    want = surge_logits(reference, prompts)
    for got, ref in zip(surge_logits(fallback, prompts), want):
        assert torch.equal(got, ref)
    if linear_ops() is None:
        pytest.skip("K-quant and Q5 blocks run on AVX-512 BF16 only")
    blocks = load_model(str(k_quant_mixtral_gguf), "bfloat16", "cpu")
    dense = load_model(str(k_quant_mixtral_gguf), "bfloat16", "cpu", "none")
    for block in [m for m in blocks.model.modules() if isinstance(m, SparseMoeBlock)]:
        experts = block.experts
        assert not hasattr(experts, "gate_up_proj") and not hasattr(experts, "down_proj")
        for gate_up, down in experts.expert_linears:
            assert isinstance(gate_up, ConcatLinear) and [p.kind for p in gate_up.parts] == ["q4_k", "q5"]
            assert isinstance(down, QuantLinear) and down.kind == "q6_k"
    assert "q4_k" in describe_quantization(blocks.model)
    for got, bf16, ref in zip(surge_logits(blocks, prompts), surge_logits(dense, prompts), want):
        assert 0 < (got.float() - ref).abs().max().item() <= 2 * (bf16.float() - ref).abs().max().item()


def test_gguf_expert_stack_of_the_wrong_size_is_named(k_quant_mixtral_gguf, tmp_path):
    """Metadata that disagrees with a quantized expert stack: the tensor and both shapes named."""
    bad = rewrite_gguf(k_quant_mixtral_gguf, tmp_path / "bad.gguf",
                       metadata={"llama.feed_forward_length": (128, KV.UINT32)})
    with pytest.raises(ModelFormatError, match=r"bad\.gguf: tensor 'model\.layers\.0\.mlp\.experts\.down_proj\.weight' "
                                               r"has shape \(1024, 256\), the model expects \(1024, 128\)"):
        load_model(str(bad))


@pytest.mark.slow
def test_compiled_moe_forward_equals_eager(qwen2_moe):
    """The experts run as one opaque op inside the compiled graph: same greedy tokens and
    logprobs as eager, for batch sizes whose expert assignment differs step to step."""
    kwargs = dict(dtype="float32", quantization="none", kv_cache_memory=8 << 20, max_num_seqs=4)
    eager = LLM(str(qwen2_moe), **kwargs)
    compiled = LLM(str(qwen2_moe), compile=True, **kwargs)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=2)
    for batch in (_prompts((7,)), _prompts((3, 20, 9, 33))):
        for w, g in zip(eager.generate(batch, params), compiled.generate(batch, params)):
            assert g.outputs[0].token_ids == w.outputs[0].token_ids
            for wl, gl in zip(w.outputs[0].logprobs, g.outputs[0].logprobs):
                for tid, lp in wl.items():
                    assert gl[tid].logprob == pytest.approx(lp.logprob, abs=1e-4)


# ---- errors ------------------------------------------------------------------------------------

def _edited(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("changes, error, match", [
    ({"scoring_func": "sigmoid"}, UnsupportedArchitectureError, "router scoring_func='sigmoid' is not supported"),
    ({"num_experts_per_tok": 5}, ModelFormatError, r"config.json: .*num_experts_per_tok \(5\) must be between 1 and num_experts \(4\)"),
    ({"num_experts_per_tok": None}, ModelFormatError, "missing or invalid field"),
])
def test_bad_moe_config_is_refused(mixtral, tmp_path, changes, error, match):
    bad = _edited(mixtral, tmp_path / "bad", **changes)
    with pytest.raises(error, match=match):
        load_model(str(bad))


def test_checkpoint_whose_experts_do_not_match_its_config(mixtral, tmp_path):
    """More experts in the config than in the weights: the router's shape is named; an expert
    the config does not have, or one missing from the weights, is named by its number."""
    from safetensors.torch import load_file, save_file

    more = _edited(mixtral, tmp_path / "more", num_local_experts=5)
    with pytest.raises(ModelFormatError, match=r"block_sparse_moe\.gate\.weight' has shape \(4, 64\), the model expects \(5, 64\)"):
        load_model(str(more))
    state = load_file(mixtral / "model.safetensors")
    extra = _edited(mixtral, tmp_path / "extra")
    state["model.layers.1.block_sparse_moe.experts.7.w1.weight"] = state["model.layers.1.block_sparse_moe.experts.0.w1.weight"].clone()
    save_file(state, extra / "model.safetensors")
    with pytest.raises(ModelFormatError, match=r"experts\.7\.w1\.weight' is expert 7, the model has 4"):
        load_model(str(extra))
    del state["model.layers.1.block_sparse_moe.experts.7.w1.weight"]
    del state["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    missing = _edited(mixtral, tmp_path / "missing")
    save_file(state, missing / "model.safetensors")
    with pytest.raises(ModelFormatError, match=r"missing weights model\.layers\.1\.mlp\.experts\.gate_up_proj\[1\] \(expert 2\)"):
        load_model(str(missing))


@pytest.fixture(scope="module")
def qwen2_moe_gguf(qwen2_moe):
    return write_gguf_from_hf(qwen2_moe, qwen2_moe.parent / "tiny-moe.gguf", arch="qwen2moe")


@pytest.mark.parametrize("metadata, drop, error, match", [
    ({"qwen2moe.expert_gating_func": (2, KV.UINT32)}, (), UnsupportedArchitectureError,
     "expert gating function 2 is not supported"),
    ({}, ("qwen2moe.expert_used_count",), ModelFormatError, "expert_count but no qwen2moe.expert_used_count"),
    ({"qwen2moe.expert_count": (6, KV.UINT32)}, (), ModelFormatError, "mlp.experts"),
])
def test_bad_moe_gguf_is_refused(qwen2_moe_gguf, tmp_path, metadata, drop, error, match):
    bad = rewrite_gguf(qwen2_moe_gguf, tmp_path / "bad.gguf", metadata=metadata, drop=drop)
    with pytest.raises(error, match=match):
        load_model(str(bad))


def test_gguf_with_one_tensor_per_expert_is_refused_by_name(mixtral, tmp_path):
    old = write_gguf_from_hf(mixtral, tmp_path / "old-mixtral.gguf", arch="llama", stack_experts=False)
    with pytest.raises(UnsupportedArchitectureError, match=r"one tensor each \(blk\.N\.ffn_gate\.E\.weight"):
        load_model(str(old))


def test_quantize_refuses_an_moe_model_and_writes_nothing(mixtral, tmp_path, capsys):
    assert_quantize_cli_refuses(tmp_path, mixtral, capsys, ["--scheme", "int4-g32"],
                                "does not write mixture-of-experts checkpoints; serve the model with -q int4")
