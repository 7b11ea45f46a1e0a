"""Write small GGUF files the way llama.cpp's converter does, for loader tests."""

from __future__ import annotations

import json
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
) -> Path:
    """A GGUF of the HF checkpoint in `hf_dir` (its tokenizer.json vocab included), as llama.cpp's
    converter writes `arch` (llama, mistral, qwen2, qwen3, gemma3): Q/K rows permuted for
    llama/mistral only, Gemma's norms stored as 1 + w, head_dim and sliding window in metadata.

    `types` maps GGUF tensor names to storage types (default F32); norms stay F32.
    """
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    state = load_file(str(hf_dir / "model.safetensors"))
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
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if cfg.get("sliding_window") and (arch == "gemma3" or cfg.get("use_sliding_window", True)):
        w.add_sliding_window(cfg["sliding_window"])
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
             "lm_head.weight": "output.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm"}
    if arch == "gemma3":
        parts.update({"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                      "post_feedforward_layernorm": "post_ffw_norm"})
    for seed, (name, tensor) in enumerate(sorted(state.items())):
        if name in names:
            gname = names[name]
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
        qtype = types.get(gname, T.F32) if data.ndim == 2 else T.F32
        if qtype == T.F32:
            w.add_tensor(gname, data)
        else:
            w.add_tensor(gname, encode_tensor(data, qtype, seed), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
