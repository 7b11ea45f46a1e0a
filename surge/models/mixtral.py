"""Mixtral: the Mistral decoder with a sparse MoE MLP (softmax router, top-k renormalised).

Checkpoints name the MLP `block_sparse_moe` with experts' w1 (gate), w3 (up) and w2 (down);
surge calls it `mlp`, as the other MoE families. GGUF files are architecture `llama` with
`llama.expert_count` set (the reader picks this class), Q/K permuted as Llama's.
"""

from __future__ import annotations

from dataclasses import replace

from surge.models.interfaces import gated_expert_weights
from surge.models.llama import LlamaForCausalLM, LlamaModel
from surge.models.moe import GGUF_MOE_BLOCKS, MoeDecoderLayer, MoeShardSizes


class MixtralModel(LlamaModel):
    decoder_layer = MoeDecoderLayer


class MixtralForCausalLM(MoeShardSizes, LlamaForCausalLM):
    model_class = MixtralModel
    packed_modules = {
        **LlamaForCausalLM.packed_modules,
        ".block_sparse_moe.gate.": (".mlp.gate.", 0),
    }
    expert_weights = gated_expert_weights("block_sparse_moe", "w1", "w3", "w2")
    gguf_names = replace(LlamaForCausalLM.gguf_names, blocks={**LlamaForCausalLM.gguf_names.blocks, **GGUF_MOE_BLOCKS})
