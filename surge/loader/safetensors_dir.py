"""Weights of a Hugging Face directory: single or sharded safetensors, memory-mapped."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from safetensors import safe_open

from surge.errors import ModelFormatError
from surge.loader.hf_config import read_json

INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(directory: str) -> list[str]:
    """The shard files of a checkpoint, from its index when there is one."""
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelFormatError(f"{index}: no weight_map")
        files = [os.path.join(directory, f) for f in dict.fromkeys(weight_map.values())]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ModelFormatError(f"{index}: names shard {missing[0]}, which does not exist")
        return files
    files = sorted(
        os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".safetensors")
    )
    if not files:
        raise ModelFormatError(
            f"{directory}: no *.safetensors weights (surge does not load pickled .bin checkpoints; "
            "convert them with safetensors first)"
        )
    return files


def open_safetensors(path: str) -> Any:
    """A memory-mapped safetensors file (a context manager), or a clear error for a bad one."""
    try:
        return safe_open(path, framework="pt")
    except Exception as exc:
        raise ModelFormatError(f"{path}: not a valid safetensors file ({exc})") from exc


def iter_safetensors_weights(directory: str, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor of `dtype`) for every tensor of every shard; shards are memory-mapped."""
    for path in safetensors_files(directory):
        with open_safetensors(path) as f:
            for name in f.keys():
                yield name, f.get_tensor(name).to(dtype)
