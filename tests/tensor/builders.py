"""Small models for the tensor backends, built with transformers / torch and exported as a user
would: a BERT-style sequence classifier and a few-conv-layer vision model, each as ONNX
(`model.onnx`) and TorchScript (`model.pt`, with the surge.toml a TorchScript module needs)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

BERT_TOML = """\
max_queue_delay_us = 20000

[[input]]
name = "input_ids"
pad_value = 0

[[input]]
name = "attention_mask"
pad_value = 0
"""
BERT_TS_TOML = """\
max_queue_delay_us = 20000

[[input]]
name = "input_ids"
datatype = "INT64"
dims = [-1]
pad_value = 0

[[input]]
name = "attention_mask"
datatype = "INT64"
dims = [-1]
pad_value = 0

[[output]]
name = "logits"
"""
VISION_TS_TOML = """\
[[input]]
name = "pixels"
datatype = "FP32"
dims = [3, 32, 32]

[[output]]
name = "scores"
"""


class Classifier(torch.nn.Module):
    """BertForSequenceClassification with positional inputs and the logits as its one output."""

    def __init__(self, seed: int):
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(seed)
        config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, num_labels=3, max_position_embeddings=64)
        self.bert = BertForSequenceClassification(config)
        self.eval()  # the wrapper too: the ONNX exporter restores the wrapper's mode on every submodule

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).logits


class Vision(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10))
        self.eval()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)


def bert_inputs(rng: np.random.Generator, rows: int = 1, length: int | None = None) -> dict[str, np.ndarray]:
    length = length or int(rng.integers(3, 16))
    ids = rng.integers(1, 120, (rows, length)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def vision_inputs(rng: np.random.Generator, rows: int = 1) -> dict[str, np.ndarray]:
    return {"pixels": rng.standard_normal((rows, 3, 32, 32)).astype(np.float32)}


def export(kind: str, seed: int, onnx_dir: Path | None = None, script_dir: Path | None = None) -> torch.nn.Module:
    """The model (`bert` or `vision`), written as ONNX into onnx_dir and TorchScript into script_dir."""
    rng = np.random.default_rng(seed)
    if kind == "bert":
        model: torch.nn.Module = Classifier(seed)
        example = {k: torch.from_numpy(v) for k, v in bert_inputs(rng, 2, 7).items()}
        names, outputs, toml = ["input_ids", "attention_mask"], ["logits"], (BERT_TOML, BERT_TS_TOML)
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                "logits": {0: "batch"}}
    else:
        model = Vision(seed)
        example = {k: torch.from_numpy(v) for k, v in vision_inputs(rng, 2).items()}
        names, outputs, toml = ["pixels"], ["scores"], ("", VISION_TS_TOML)
        axes = {"pixels": {0: "batch"}, "scores": {0: "batch"}}
    args = tuple(example[n] for n in names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if onnx_dir is not None:
            onnx_dir.mkdir(parents=True, exist_ok=True)
            torch.onnx.export(model, args, str(onnx_dir / "model.onnx"), input_names=names, output_names=outputs,
                              dynamic_axes=axes, dynamo=False)
            if toml[0]:
                (onnx_dir / "surge.toml").write_text(toml[0])
        if script_dir is not None:
            script_dir.mkdir(parents=True, exist_ok=True)
            torch.jit.trace(model, args).save(str(script_dir / "model.pt"))
            (script_dir / "surge.toml").write_text(toml[1])
    return model


def reference(model: torch.nn.Module, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The model run directly by torch on the same inputs."""
    with torch.inference_mode():
        return model(*[torch.from_numpy(v) for v in inputs.values()]).numpy()


ENCODER_TOML = """\
max_queue_delay_us = 20000

[embedding]
output = "last_hidden_state"
pooling = "mean"
max_length = 64
"""


class Encoder(torch.nn.Module):
    """A BertModel whose one output is the last hidden state: an embedding model."""

    def __init__(self, seed: int, vocab_size: int):
        super().__init__()
        from transformers import BertConfig, BertModel

        torch.manual_seed(seed)
        config = BertConfig(vocab_size=vocab_size, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=96, max_position_embeddings=64)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids).last_hidden_state


def export_encoder(seed: int, tokenizer_dir: Path, out: Path) -> Encoder:
    """An embedding model as ONNX with its tokenizer.json and [embedding] table."""
    import shutil

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    model = Encoder(seed, tokenizer.get_vocab_size(with_added_tokens=True))
    ids = torch.tensor([tokenizer.encode("hello world, how are you").ids])
    args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(out / "model.onnx"), input_names=names, output_names=["last_hidden_state"],
                          dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names},
                                        "last_hidden_state": {0: "batch", 1: "sequence"}}, dynamo=False)
    shutil.copy(tokenizer_dir / "tokenizer.json", out / "tokenizer.json")
    (out / "surge.toml").write_text(ENCODER_TOML)
    return model
