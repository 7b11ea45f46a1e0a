"""The model contract: per-layer attention specs, GGUF names, generic weight loading and its
errors, quantization applied from outside, attention reading the forward context."""

from __future__ import annotations

import json

import pytest
import torch

from surge.config import ModelConfig
from surge.errors import InvalidArgumentError, ModelFormatError, UnsupportedArchitectureError
from surge.layers.attention_layer import Attention
from surge.layers.quantization.apply import quantize_linears
from surge.layers.quantization.quant_linear import QuantLinear
from surge.loader import build_meta_model
from surge.loader.hf_config import config_from_hf_dir
from surge.models.interfaces import attention_specs
from surge.models.qwen2 import Qwen2ForCausalLM
from surge.models.registry import architecture_of_gguf, get_architecture, get_model_class
from surge.loader.weight_loading import fused_name, load_weights
from tests.conftest import build_tiny_model

TINY = dict(architecture="LlamaForCausalLM", hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128, vocab_size=96)


def tiny_model(**overrides) -> torch.nn.Module:
    config = ModelConfig(**{**TINY, **overrides})
    model = build_meta_model(config).to_empty(device="cpu")
    model.tie_weights()
    return model


def checkpoint(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters under checkpoint names (q/k/v, gate/up split apart)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, param in model.named_parameters():
        sizes = model.shard_sizes(name)
        parts = {0: name} if not sizes else {
            index: name.replace(fused, part) for part, (fused, index) in model.packed_modules.items() if fused in name}
        for index, ckpt_name in parts.items():
            rows = sizes[index] if sizes else param.shape[0]
            out[ckpt_name] = torch.randn((rows, *param.shape[1:]), generator=g)
    return out


def test_attention_specs_follow_layer_types():
    config = ModelConfig(**{**TINY, "sliding_window": 8,
                            "layer_types": ("full_attention", "sliding_attention", "full_attention")})
    assert [s.sliding_window for s in attention_specs(config)] == [None, 8, None]
    model = tiny_model(sliding_window=8, layer_types=("full_attention", "sliding_attention", "full_attention"))
    assert [layer.self_attn.attn.sliding_window for layer in model.model.layers] == [None, 8, None]
    assert [layer.self_attn.attn.layer_index for layer in model.model.layers] == [0, 1, 2]
    # no layer_types: a window applies to every layer
    assert [s.sliding_window for s in attention_specs(ModelConfig(**{**TINY, "sliding_window": 8}))] == [8, 8, 8]


def test_sliding_layers_get_their_own_rope():
    """A local RoPE (Gemma's rope_local_base_freq) applies to the sliding layers only; the model
    keeps one table per distinct RoPE and still runs."""
    from surge.config import RopeConfig
    from surge.layers.attention import AttentionMetadata
    from surge.layers.forward_context import ForwardContext, set_forward_context

    types = ("sliding_attention", "full_attention", "sliding_attention")
    local = RopeConfig(theta=10.0)
    specs = attention_specs(ModelConfig(**{**TINY, "sliding_window": 4, "layer_types": types, "local_rope": local}))
    assert [s.rope.theta for s in specs] == [10.0, 10000.0, 10.0]
    model = tiny_model(sliding_window=4, layer_types=types, local_rope=local)
    load_weights(model, checkpoint(model).items())
    assert [r.rope.theta for r in model.model.rotaries] == [10.0, 10000.0] and model.model.layer_rope == [0, 1, 0]
    caches = [torch.zeros(2, 2, 16, 2, 16) for _ in range(3)]
    meta = AttentionMetadata(slot_mapping=torch.arange(16, 22), block_tables=torch.tensor([[1]]),
                             query_start_loc=[0, 6], seq_lens=[6], block_size=16)
    meta.split_decode(native=False)
    with torch.no_grad(), set_forward_context(ForwardContext(caches, meta)):
        hidden = model(torch.arange(6), torch.arange(6))
    assert hidden.shape == (6, 64) and torch.isfinite(hidden).all()
    assert caches[2][0, 1, :6].abs().sum() > 0  # every layer wrote its K/V into its own cache


@pytest.mark.parametrize("layer_types, window", [
    (("full_attention",), None),  # one entry for three layers
    (("full_attention", "global", "full_attention"), None),  # an unknown kind
    (("full_attention", "sliding_attention", "full_attention"), None),  # sliding without a window
])
def test_bad_layer_types_are_refused(layer_types, window):
    with pytest.raises(InvalidArgumentError, match="layer_types|sliding_window"):
        ModelConfig(**{**TINY, "layer_types": layer_types, "sliding_window": window})


def test_qwen2_window_layers_from_config_json(tmp_path, tiny_tokenizer_dir):
    """Qwen2's use_sliding_window + max_window_layers: layers from max_window_layers on slide."""
    path = build_tiny_model("qwen2", tmp_path / "q", tiny_tokenizer_dir, num_hidden_layers=3,
                            use_sliding_window=True, sliding_window=16, max_window_layers=1)
    raw = json.loads((path / "config.json").read_text())
    raw.pop("layer_types", None)  # older configs do not list them: the rule derives them
    (path / "config.json").write_text(json.dumps(raw))
    config = config_from_hf_dir(str(path))
    assert config.layer_types == ("full_attention", "sliding_attention", "sliding_attention")
    assert config.attention_bias  # the registry's Qwen2 default


def test_registry_knows_each_architecture_once():
    assert get_model_class("Qwen2ForCausalLM") is Qwen2ForCausalLM
    assert architecture_of_gguf("qwen2").name == "Qwen2ForCausalLM"
    assert architecture_of_gguf("gemma3").name == "Gemma3ForCausalLM"
    assert architecture_of_gguf("mamba") is None
    assert get_architecture("MistralForCausalLM").model_type == "mistral"
    with pytest.raises(UnsupportedArchitectureError, match="MambaForCausalLM.*surge runs"):
        get_model_class("MambaForCausalLM")


def test_gguf_names_and_permutation():
    llama = get_model_class("LlamaForCausalLM")
    assert llama.gguf_names.hf_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert llama.gguf_names.hf_name("output.weight") == "lm_head.weight"
    assert llama.gguf_names.hf_name("blk.0.unknown.weight") is None
    assert llama.gguf_names.permuted_qk and not Qwen2ForCausalLM.gguf_names.permuted_qk
    assert Qwen2ForCausalLM.gguf_names.blocks == llama.gguf_names.blocks


def test_generic_loading_fills_fused_rows():
    model = tiny_model()
    weights = checkpoint(model)
    assert load_weights(model, weights.items()) == {}
    qkv = model.model.layers[1].self_attn.qkv_proj.weight
    assert torch.equal(qkv[64:96], weights["model.layers.1.self_attn.k_proj.weight"])
    assert fused_name(model, "model.layers.0.mlp.up_proj.weight") == ("model.layers.0.mlp.gate_up_proj.weight", 1)


def test_wrong_shape_names_the_tensor():
    model = tiny_model()
    weights = checkpoint(model)
    weights["model.layers.2.self_attn.v_proj.weight"] = torch.zeros(31, 64)
    with pytest.raises(ModelFormatError, match=r"'model.layers.2.self_attn.v_proj.weight' has shape \(31, 64\).*"
                                               r"expects \(32, 64\)"):
        load_weights(model, weights.items(), "ckpt")


def test_quantized_embedding_is_dequantized_in_slices_and_checked():
    """A quantized embedding table fills its float fallback a slice of rows at a time, equal to
    the whole table dequantized; a table of the wrong size is named with both sizes."""
    from surge.layers.quantization.formats import quantize_int8_groups
    from surge.loader import weight_loading

    model = tiny_model()
    weights = checkpoint(model)
    table = quantize_int8_groups(weights["model.embed_tokens.weight"])
    weights["model.embed_tokens.weight"] = table
    pending = weight_loading.load_weights(model, weights.items(), "ckpt")
    assert pending["model.embed_tokens"][0] is table
    assert torch.equal(model.model.embed_tokens.weight, table.dequantize())
    target = torch.empty_like(model.model.embed_tokens.weight)
    weight_loading._dequantize_into(target, table, "t", values_per_slice=7 * target.shape[1])  # uneven slices
    assert torch.equal(target, table.dequantize())
    weights["model.embed_tokens.weight"] = quantize_int8_groups(torch.zeros(5, 64))
    with pytest.raises(ModelFormatError, match=r"ckpt: tensor 'model.embed_tokens.weight' has 5 rows, the model "
                                               r"expects \d+"):
        load_weights(tiny_model(), weights.items(), "ckpt")
    weights["model.embed_tokens.weight"] = quantize_int8_groups(torch.zeros(target.shape[0], 32))
    with pytest.raises(ModelFormatError, match=r"has rows of 32 values, the model expects 64"):
        load_weights(tiny_model(), weights.items(), "ckpt")


def test_missing_shard_is_named():
    model = tiny_model()
    weights = checkpoint(model)
    del weights["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(ModelFormatError, match=r"ckpt: missing weights model.layers.0.mlp.gate_up_proj.weight\[1\]"):
        load_weights(model, weights.items(), "ckpt")


def test_tied_head_needs_no_weight_of_its_own():
    model = tiny_model(tie_word_embeddings=True)
    weights = checkpoint(model)
    assert "lm_head.weight" not in weights
    load_weights(model, weights.items())
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_quantization_is_applied_from_outside():
    model = tiny_model()
    load_weights(model, checkpoint(model).items())
    quantize_linears(model, {}, "int8", output_head=model.output_head)
    kinds = {name: m.kind for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert kinds["lm_head"] == "int8g" and kinds["model.layers.0.self_attn.qkv_proj"] == "int8"
    plain = tiny_model()
    load_weights(plain, checkpoint(plain).items())
    quantize_linears(plain, {}, "none")
    assert not any(isinstance(m, QuantLinear) for m in plain.modules())


def test_attention_outside_a_forward_context_says_so():
    layer = Attention(0, 4, 2, 16)
    q, kv = torch.zeros(1, 4, 16), torch.zeros(1, 2, 16)
    with pytest.raises(RuntimeError, match="outside set_forward_context"):
        layer(q, kv, kv)


def test_forward_contexts_are_per_thread():
    """Two engines step on two threads of one process (a server switching versions): each
    thread's layers see its own caches and metadata."""
    import threading

    from surge.layers.forward_context import ForwardContext, get_forward_context, set_forward_context

    barrier = threading.Barrier(2)
    seen: dict[int, list] = {}

    def step(i: int) -> None:
        caches = [torch.full((1,), float(i))]
        with set_forward_context(ForwardContext(caches, None)):
            barrier.wait()  # both contexts are set now
            seen[i] = get_forward_context().kv_caches
            barrier.wait()

    threads = [threading.Thread(target=step, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert [float(seen[i][0]) for i in range(2)] == [0.0, 1.0]
    with pytest.raises(RuntimeError, match="outside set_forward_context"):
        get_forward_context()
