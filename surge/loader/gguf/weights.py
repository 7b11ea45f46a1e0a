"""GGUF tensors -> (checkpoint name, tensor): names from the model's GgufNames (its contract),
float tensors dequantized with gguf-py, Q4/Q8 blocks repacked without expanding."""

from __future__ import annotations

from collections.abc import Iterator

import gguf
import numpy as np
import torch

from surge.config import ModelConfig
from surge.errors import ModelFormatError, UnsupportedTensorTypeError
from surge.loader.gguf.file import GgufFile, GgufTensor
from surge.layers.quantization.formats import Int4Weight, Int8GroupWeight, gguf_to_int4, gguf_to_int8
from surge.layers.quantization.gguf_blocks import BLOCK_TYPES, GgufBlockWeight
from surge.models.interfaces import GgufNames

T = gguf.GGMLQuantizationType
SUPPORTED_TYPES = frozenset(
    {T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K}
)

def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's convert-time permutation of Q/K rows.

    The converter stores each head's rows as [pairs interleaved] so ggml's RoPE can rotate
    adjacent elements; Hugging Face rotates the two halves of a head instead:

        GGUF rows of a head:  x0 y0 x1 y1 ... (x_i, y_i rotated together)
        HF rows of a head:    x0 x1 ... | y0 y1 ...
    """
    rows = weight.shape[0]
    head_dim = rows // num_heads
    rest = weight.shape[1:]
    return (
        weight.reshape(num_heads, head_dim // 2, 2, *rest)
        .transpose(1, 2)
        .reshape(rows, *rest)
        .contiguous()
    )


def dequantize(tensor: GgufTensor, path: str) -> np.ndarray:
    """float32 array in the tensor's logical shape (rows, cols) for any supported type."""
    qtype = T(tensor.tensor_type)
    if qtype not in SUPPORTED_TYPES:
        raise UnsupportedTensorTypeError(
            f"{path}: tensor {tensor.name!r} has type {qtype.name}, which surge cannot load; "
            f"supported: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))}"
        )
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims fastest-first
    try:
        data = gguf.quants.dequantize(np.asarray(tensor.data), qtype)
    except Exception as exc:
        raise ModelFormatError(f"{path}: cannot decode tensor {tensor.name!r} ({exc})") from exc
    if data.dtype != np.float32 or not data.flags.writeable:  # float tensors come as views of the map
        data = np.array(data, dtype=np.float32)
    return data.reshape(shape)


def _unpermute_any(weight, heads: int):
    if isinstance(weight, Int4Weight):
        return Int4Weight(unpermute_qk(weight.q, heads), unpermute_qk(weight.scale, heads),
                          unpermute_qk(weight.zero, heads), weight.group_size)
    if isinstance(weight, Int8GroupWeight):
        return Int8GroupWeight(unpermute_qk(weight.q, heads), unpermute_qk(weight.scale, heads), weight.group_size)
    if isinstance(weight, GgufBlockWeight):  # blocks lie within rows: the rows move whole
        return GgufBlockWeight(unpermute_qk(weight.raw, heads), weight.qtype, weight.cols)
    return unpermute_qk(weight, heads)


def iter_gguf_weights(
    reader: GgufFile, config: ModelConfig, names: GgufNames, path: str, dtype: torch.dtype,
    keep_quantized: bool = False,
) -> Iterator[tuple[str, torch.Tensor | Int4Weight | Int8GroupWeight | GgufBlockWeight]]:
    """Every tensor the model uses as (checkpoint name, tensor of `dtype`), with Q/K rows
    restored where llama.cpp permuted them.

    With `keep_quantized`, Q4_0/Q4_1 matrices come as Int4Weight and Q8_0 as Int8GroupWeight,
    repacked from their blocks without expanding to float, and K-quant / Q5 matrices as their
    blocks (GgufBlockWeight); a stack of experts' matrices (ffn_*_exps) as one such weight of
    E * rows rows, expert e's rows at e * rows.
    """
    permuted = names.permuted_qk
    for tensor in reader.tensors:
        name = names.hf_name(tensor.name)
        if name is None:
            continue
        qtype = T(tensor.tensor_type)
        # a matrix's rows; a stack of experts' matrices [E, rows, K] as E * rows rows
        rows = int(np.prod([int(d) for d in tensor.shape[1:]])) if len(tensor.shape) in (2, 3) else 0
        weight: torch.Tensor | Int4Weight | Int8GroupWeight | GgufBlockWeight
        if keep_quantized and rows and qtype in (T.Q4_0, T.Q4_1):
            weight = gguf_to_int4(np.asarray(tensor.data), qtype, rows)
        elif keep_quantized and rows and qtype == T.Q8_0:
            weight = gguf_to_int8(np.asarray(tensor.data), qtype, rows)
        elif keep_quantized and rows and qtype in BLOCK_TYPES:
            raw = torch.from_numpy(np.array(tensor.data, dtype=np.uint8).reshape(rows, -1))
            weight = GgufBlockWeight(raw, int(qtype), int(tensor.shape[0]))
        else:
            weight = torch.from_numpy(dequantize(tensor, path))
            if names.norm_offset and name.endswith("norm.weight"):
                weight -= names.norm_offset
            # rope frequency factors stay float32: they scale angles, not activations.
            weight = weight if name == "model.rope_freqs" else weight.to(dtype)
        if permuted and ".self_attn.q_proj." in name:
            weight = _unpermute_any(weight, config.num_attention_heads)
        elif permuted and ".self_attn.k_proj." in name:
            weight = _unpermute_any(weight, config.num_key_value_heads)
        yield name, weight
