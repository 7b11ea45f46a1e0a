"""Qwen2: the Llama decoder with biases on q/k/v only and GGUF files stored unpermuted."""

from __future__ import annotations

from dataclasses import replace

from surge.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    gguf_names = replace(LlamaForCausalLM.gguf_names, permuted_qk=False)
    o_proj_bias = False
