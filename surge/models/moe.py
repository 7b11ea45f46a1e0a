"""What the mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE) share: a decoder layer
whose MLP routes each token to its top-k experts (surge/layers/moe.py), dense in the layers
the config names, with Qwen2-MoE's gated shared expert where the config has one; how their
experts' and shared expert's checkpoint tensors load; the GGUF names llama.cpp gives them."""

from __future__ import annotations

from torch import nn

from surge.config import ModelConfig
from surge.layers.moe import SparseMoeBlock
from surge.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP

# llama.cpp's names of the MoE tensors of block N -> checkpoint names (the stacked experts
# as one tensor each, [E, rows, K])
GGUF_MOE_BLOCKS = {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}

SHARED_EXPERT_PACKING = {
    ".mlp.shared_expert.gate_proj.": (".mlp.shared_expert.gate_up_proj.", 0),
    ".mlp.shared_expert.up_proj.": (".mlp.shared_expert.gate_up_proj.", 1),
}


class MoeDecoderLayer(LlamaDecoderLayer):
    def build_mlp(self, config: ModelConfig, layer_index: int) -> nn.Module:
        if not config.is_moe_layer(layer_index):
            return LlamaMLP(config)
        shared = config.shared_expert_intermediate_size
        return SparseMoeBlock(
            config.hidden_size, config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size,
            config.hidden_act, config.norm_topk_prob,
            shared_expert=LlamaMLP(config, shared) if shared else None, expert_range=config.expert_range,
        )


class MoeShardSizes:
    """Mixed in before a family's CausalLM: the rows stacked in its MoE parameters (experts'
    gate/up, the shared expert's gate/up), the family's own shard sizes for the rest."""

    config: ModelConfig
    # tensor parallelism: each expert split like the MLP ("experts"), or whole experts per rank
    # (expert parallelism); the shared expert split like the MLP; the block's output is summed
    # over the ranks once (SparseMoeBlock), so neither down projection sums on its own
    tp_plan = (
        (r"\.mlp\.experts\.gate_up_proj$", "experts_column"),
        (r"\.mlp\.experts\.down_proj$", "experts_row"),
        (r"\.mlp\.shared_expert\.gate_up_proj\.weight$", "column"),
        (r"\.mlp\.shared_expert\.down_proj\.weight$", "row_in_block"),
        *LlamaForCausalLM.tp_plan,
    )

    def shard_sizes(self, name: str) -> list[int]:
        if name.endswith(".mlp.experts.gate_up_proj"):
            return [self.config.moe_intermediate_size] * 2
        if ".mlp.shared_expert.gate_up_proj." in name:
            return [self.config.shared_expert_intermediate_size] * 2
        return super().shard_sizes(name)  # type: ignore[misc]
