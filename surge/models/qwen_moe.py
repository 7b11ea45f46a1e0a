"""Qwen2-MoE and Qwen3-MoE: the Qwen2 / Qwen3 decoders with a sparse MoE MLP. Qwen2-MoE adds
a shared expert every token runs through, gated by sigmoid(x g), and does not renormalise the
top-k probabilities; Qwen3-MoE has no shared expert and renormalises where its config says
(`norm_topk_prob`). Layers in `mlp_only_layers` (or off `decoder_sparse_step`) are dense."""

from __future__ import annotations

from dataclasses import replace

from surge.models.interfaces import gated_expert_weights
from surge.models.llama import LlamaModel
from surge.models.moe import GGUF_MOE_BLOCKS, SHARED_EXPERT_PACKING, MoeDecoderLayer, MoeShardSizes
from surge.models.qwen2 import Qwen2ForCausalLM
from surge.models.qwen3 import Qwen3ForCausalLM


class QwenMoeModel(LlamaModel):
    decoder_layer = MoeDecoderLayer


class Qwen2MoeForCausalLM(MoeShardSizes, Qwen2ForCausalLM):
    model_class = QwenMoeModel
    packed_modules = {**Qwen2ForCausalLM.packed_modules, **SHARED_EXPERT_PACKING}
    expert_weights = gated_expert_weights("mlp", "gate_proj", "up_proj", "down_proj")
    gguf_names = replace(Qwen2ForCausalLM.gguf_names, blocks={**Qwen2ForCausalLM.gguf_names.blocks, **GGUF_MOE_BLOCKS})


class Qwen3MoeForCausalLM(MoeShardSizes, Qwen3ForCausalLM):
    model_class = QwenMoeModel
    expert_weights = Qwen2MoeForCausalLM.expert_weights
    gguf_names = replace(Qwen3ForCausalLM.gguf_names, blocks={**Qwen3ForCausalLM.gguf_names.blocks, **GGUF_MOE_BLOCKS})
