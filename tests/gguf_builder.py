"""Write small GGUF files the way llama.cpp's converter does, for loader tests."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import gguf
import numpy as np
import torch

T = gguf.GGMLQuantizationType
# gguf-py can quantize these; K-quants it can only dequantize, so those get random blocks.
QUANTIZABLE = {T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.TQ1_0}


def permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (halves -> interleaved pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode_tensor(w: np.ndarray, qtype: T, seed: int) -> np.ndarray:
    if qtype in QUANTIZABLE:
        return gguf.quants.quantize(w.astype(np.float32), qtype)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = w.shape
    # bytes below 0x20 keep every fp16 scale small and finite
    rng = np.random.default_rng(seed)
    return rng.integers(0, 0x20, size=(rows, cols // block * type_size), dtype=np.uint8)


def write_gguf_from_hf(
    hf_dir: Path,
    out: Path,
    types: dict[str, T] | None = None,
    arch: str = "llama",
    tokenizer_pre: str = "default",
    stack_experts: bool = True,
) -> Path:
    """A GGUF of the HF checkpoint in `hf_dir` (its tokenizer.json vocab included), as llama.cpp's
    converter writes `arch` (llama, mistral, qwen2, qwen3, gemma3, phi3, gpt2, qwen2moe, qwen3moe; Mixtral
    is llama with experts): Q/K rows permuted for llama/mistral only, Gemma's norms stored as 1 + w,
    head_dim and sliding window in metadata, experts stacked into one tensor per projection.

    `types` maps GGUF tensor names to storage types (default F32); norms stay F32.
    `stack_experts=False` writes one tensor per expert (blk.N.ffn_gate.E), the older layout.
    """
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    state = load_file(str(hf_dir / "model.safetensors"))
    if arch == "gpt2":
        cfg, state = _gpt2_as_common(cfg, state)
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    permuted = arch in ("llama", "mistral")
    rope = cfg.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    if arch == "gpt2":
        w.add_layer_norm_eps(cfg["rms_norm_eps"])
    else:
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(int(head_dim * float(rope.get("partial_rotary_factor", 1.0))))
    if rope.get("rope_type") == "longrope":  # Phi-3: the factors as tensors, the scale as the converter computes it
        original = rope.get("original_max_position_embeddings") or cfg["original_max_position_embeddings"]
        scale = cfg["max_position_embeddings"] / original
        w.add_rope_scaling_orig_ctx_len(original)
        w.add_rope_scaling_attn_factors(1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(original)))
        state = {**state, "rope_factors_long": torch.tensor(rope["long_factor"]),
                 "rope_factors_short": torch.tensor(rope["short_factor"])}
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if cfg.get("sliding_window") and (arch == "gemma3" or cfg.get("use_sliding_window", True)):
        w.add_sliding_window(cfg["sliding_window"])
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 0
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        if cfg.get("moe_intermediate_size"):
            w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if cfg.get("shared_expert_intermediate_size"):
            w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
        if stack_experts:
            state = _stack_experts(state, experts)
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    added = {t["id"]: t["content"] for t in tok["added_tokens"]}
    tokens = [added.get(i, t) for t, i in vocab]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), cfg["vocab_size"])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tokenizer_pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if i in added else (5 if t.startswith("[PAD") else 1) for i, t in enumerate(tokens)])
    merges = tok["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_add_bos_token(False)
    types = types or {}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight", "rope_factors_long": "rope_factors_long.weight",
             "rope_factors_short": "rope_factors_short.weight",
             "model.embed_positions.weight": "position_embd.weight", "model.norm.bias": "output_norm.bias"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm", "mlp.gate": "ffn_gate_inp", "block_sparse_moe.gate": "ffn_gate_inp",
             "experts.gate": "ffn_gate_exps", "experts.up": "ffn_up_exps", "experts.down": "ffn_down_exps",
             "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
             "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
             "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}  # Phi-3's and GPT-2's fusions
    if arch == "gemma3":
        parts.update({"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                      "post_feedforward_layernorm": "post_ffw_norm"})
    for seed, (name, tensor) in enumerate(sorted(state.items())):
        expert = _EXPERT.match(name)
        if name in names:
            gname = names[name]
        elif expert is not None:  # llama.cpp's layout before it stacked the experts
            layer, e, proj = expert.groups()
            gname = f"blk.{layer}.ffn_{_PROJECTION[proj]}.{e}.weight"
        else:
            _, _, layer, *rest = name.split(".")
            kind = rest[-1]
            gname = f"blk.{layer}.{parts['.'.join(rest[:-1])]}.{kind}"
        data = tensor.to(torch.float32).numpy()
        if arch == "gemma3" and gname.endswith("norm.weight"):
            data = data + 1.0  # the converter's norm shift: llama.cpp multiplies by the stored weight
        if permuted and gname.endswith("attn_q.weight"):
            data = permute_qk(data, heads)
        elif permuted and gname.endswith("attn_k.weight"):
            data = permute_qk(data, kv_heads)
        if gname.endswith("ffn_gate_inp_shexp.weight"):
            data = data.reshape(-1)  # llama.cpp's shared expert gate is a vector
        qtype = types.get(gname, T.F32) if data.ndim in (2, 3) else T.F32
        if qtype == T.F32:
            w.add_tensor(gname, data)
        else:  # a stack of experts' matrices as its rows, the blocks of each row in order
            rows = encode_tensor(data.reshape(-1, data.shape[-1]), qtype, seed)
            w.add_tensor(gname, rows.reshape(*data.shape[:-1], -1), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_PROJECTION = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def _stack_experts(state: dict[str, torch.Tensor], experts: int) -> dict[str, torch.Tensor]:
    """Each layer's experts' matrices as one [E, rows, K] tensor per projection, as the converter
    writes ffn_{gate,up,down}_exps."""
    out, stacks = {}, {}
    for name, tensor in state.items():
        match = _EXPERT.match(name)
        if match is None:
            out[name] = tensor
            continue
        layer, expert, proj = match.groups()
        stacks.setdefault((layer, _PROJECTION[proj]), {})[int(expert)] = tensor
    for (layer, proj), by_expert in stacks.items():
        out[f"model.layers.{layer}.experts.{proj}.weight"] = torch.stack([by_expert[e] for e in range(experts)])
    return out


def rewrite_gguf(src: Path, dst: Path, arch: str | None = None, tensor_type: "T | None" = None,
                 metadata: dict[str, tuple[object, gguf.GGUFValueType]] | None = None,
                 drop: tuple[str, ...] = (), row_length: int | None = None) -> Path:
    """Copy a GGUF, changing its architecture name, one tensor's storage type (blk.0.ffn_up
    as zeros of `tensor_type`; with `row_length`, its header claims rows of that many values
    whatever the type's block), metadata keys (key -> (value, type); `drop`: keys left out)."""
    reader = gguf.GGUFReader(str(src))
    old_arch = reader.fields["general.architecture"].contents()
    new_arch = arch or old_arch
    w = gguf.GGUFWriter(str(dst), new_arch)
    metadata = dict(metadata or {})
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop or key in metadata:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key.replace(f"{old_arch}.", f"{new_arch}.", 1), field.contents(), vtype, sub_type=sub)
    for key, (value, vtype) in metadata.items():
        w.add_key_value(key, value, vtype)
    for t in reader.tensors:
        if tensor_type is not None and t.name == "blk.0.ffn_up.weight" and row_length is not None:
            block, size = gguf.GGML_QUANT_SIZES[tensor_type]
            rows = int(t.shape[1])
            data = np.zeros(max(1, rows * row_length * size // block), np.int8)  # int8: the shape is taken as given
            w.add_tensor(t.name, data, raw_shape=(rows, row_length), raw_dtype=tensor_type)
        elif tensor_type is not None and t.name == "blk.0.ffn_up.weight":
            data = encode_tensor(np.zeros((int(t.shape[1]), int(t.shape[0])), np.float32), tensor_type, seed=0)
            w.add_tensor(t.name, data, raw_dtype=tensor_type)
        else:
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


_GPT2_KEYS = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
              "n_positions": "max_position_embeddings", "layer_norm_epsilon": "rms_norm_eps"}
_GPT2_NAMES = [(r"^transformer\.wte\.", "model.embed_tokens."), (r"^transformer\.wpe\.", "model.embed_positions."),
               (r"^transformer\.ln_f\.", "model.norm."), (r"^transformer\.h\.", "model.layers."),
               (r"\.ln_1\.", ".input_layernorm."), (r"\.ln_2\.", ".post_attention_layernorm."),
               (r"\.attn\.c_attn\.", ".self_attn.qkv_proj."), (r"\.attn\.c_proj\.", ".self_attn.o_proj."),
               (r"\.mlp\.c_fc\.", ".mlp.up_proj."), (r"\.mlp\.c_proj\.", ".mlp.down_proj.")]


def _gpt2_as_common(cfg: dict, state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """GPT-2's config keys and tensor names as the other families', its Conv1D matrices
    transposed to [out, in] (what llama.cpp's converter does); the tied head is not written."""
    cfg = {**cfg, **{common: cfg[key] for key, common in _GPT2_KEYS.items()}}
    cfg["intermediate_size"] = cfg.get("n_inner") or 4 * cfg["hidden_size"]
    cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    out = {}
    for name, tensor in state.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue
        if re.search(r"\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$", name):
            tensor = tensor.t().contiguous()
        for pattern, replacement in _GPT2_NAMES:
            name = re.sub(pattern, replacement, name)
        out[name] = tensor
    return cfg, out
