"""The onnxruntime and torch backends on real exported models: inputs and outputs read from the
model (or its declaration), outputs equal to onnxruntime / torch run directly (1e-5), the
optimised graph cached on disk, and every configuration or input error named."""

from __future__ import annotations

import os
import re

import numpy as np
import onnxruntime as ort
import pytest
import torch

from surge.errors import InvalidArgumentError, ModelFormatError
from surge.tensor.config import detect_backend, tensor_config
from surge.tensor.model import InferInputError, TensorModel
from tests.tensor.builders import BERT_TOML, bert_inputs, export, reference, vision_inputs


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("exported")
    models = {kind: export(kind, 0, root / f"{kind}_onnx", root / f"{kind}_ts") for kind in ("bert", "vision")}
    return root, models


def load(path, backend: str, settings: dict | None = None) -> TensorModel:
    import tomllib

    toml = os.path.join(path, "surge.toml")
    declared = tomllib.load(open(toml, "rb")) if os.path.isfile(toml) else {}
    return TensorModel.load(str(path), tensor_config({**declared, **(settings or {})}, backend, "test"))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGE_CACHE_DIR", str(tmp_path / "cache"))


def test_onnx_bert_metadata_and_outputs(exported):
    root, models = exported
    model = load(root / "bert_onnx", "onnxruntime")
    try:
        assert model.metadata() == {
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
                       {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]}],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]}
        assert model.max_batch_size == 8
        session = ort.InferenceSession(str(root / "bert_onnx" / "model.onnx"))
        rng = np.random.default_rng(1)
        for rows in (1, 3):
            x = bert_inputs(rng, rows)
            got = model.infer(x)["logits"]
            np.testing.assert_allclose(got, session.run(None, x)[0], atol=1e-5, rtol=0)
            np.testing.assert_allclose(got, reference(models["bert"], x), atol=1e-5, rtol=0)
    finally:
        model.close()


def test_torchscript_models_equal_torch(exported):
    root, models = exported
    rng = np.random.default_rng(2)
    for kind, make in (("bert", bert_inputs), ("vision", vision_inputs)):
        model = load(root / f"{kind}_ts", "torch")
        try:
            assert model.platform == "pytorch_libtorch"
            x = make(rng, 2)
            (out,) = model.infer(x).values()
            np.testing.assert_allclose(out, reference(models[kind], x), atol=1e-5, rtol=0)
        finally:
            model.close()
    vision = load(root / "vision_ts", "torch")
    try:
        assert vision.metadata()["outputs"] == [{"name": "scores", "datatype": "FP32", "shape": [-1, 10]}]
        assert vision.metadata()["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    finally:
        vision.close()


def test_exported_program_carries_its_own_specs(exported, tmp_path):
    _, models = exported
    pixels = torch.zeros(2, 3, 32, 32)
    program = torch.export.export(models["vision"], (pixels,), dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
    (tmp_path / "v").mkdir()
    torch.export.save(program, str(tmp_path / "v" / "model.pt2"))
    assert detect_backend(str(tmp_path / "v")) == "torch"
    model = load(tmp_path / "v", "torch")
    try:
        meta = model.metadata()
        assert meta["platform"] == "pytorch_exported"
        assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
        assert meta["outputs"] == [{"name": "output__0", "datatype": "FP32", "shape": [-1, 10]}]
        x = vision_inputs(np.random.default_rng(3), 3)
        np.testing.assert_allclose(model.infer(x)["output__0"], reference(models["vision"], x), atol=1e-5, rtol=0)
    finally:
        model.close()


def test_optimised_graph_is_cached_and_levels_agree(exported, tmp_path):
    root, _ = exported
    x = vision_inputs(np.random.default_rng(4), 2)
    outs = {}
    for level in ("disable", "basic", "all", "all"):
        model = load(root / "vision_onnx", "onnxruntime", {"optimization_level": level, "intra_op_threads": 1})
        try:
            outs[level] = model.infer(x)["scores"]
        finally:
            model.close()
    cached = sorted(os.listdir(tmp_path / "cache" / "onnx"))
    assert [c.split("-")[1] for c in cached] == ["all", "basic"]  # one graph per level; "disable" keeps none
    for level in ("basic", "all"):
        np.testing.assert_allclose(outs[level], outs["disable"], atol=1e-5, rtol=0)


def test_instances_and_no_batching(exported):
    root, _ = exported
    model = load(root / "vision_onnx", "onnxruntime", {"instance_count": 2, "max_batch_size": 0})
    try:
        assert model.max_batch_size == 0
        assert model.metadata()["inputs"][0]["shape"] == [-1, 3, 32, 32]  # the model's own batch dim, unbatched
        assert len(model.backend.sessions) == 2
        x = vision_inputs(np.random.default_rng(5), 4)
        assert model.infer(x)["scores"].shape == (4, 10)
    finally:
        model.close()


def test_request_errors_are_named(exported):
    root, _ = exported
    model = load(root / "bert_onnx", "onnxruntime", {"max_batch_size": 4})
    try:
        good = bert_inputs(np.random.default_rng(6), 2)
        cases = [
            ({**good, "extra": good["input_ids"]}, "unknown input(s) extra"),
            ({"input_ids": good["input_ids"]}, "missing input(s) attention_mask"),
            ({**good, "input_ids": good["input_ids"].astype(np.int32)}, "'input_ids' is INT32; the model takes INT64"),
            ({**good, "input_ids": good["input_ids"][0]}, "'input_ids' has shape [%d]; the model takes [-1, -1]"
             % good["input_ids"].shape[1]),
            ({k: np.repeat(v, 3, axis=0) for k, v in good.items()}, "batch size 6; this model takes 1 to 4"),
            ({**good, "attention_mask": good["attention_mask"][:1]}, "batch size 1, another input 2"),
        ]
        for inputs, message in cases:
            with pytest.raises(InferInputError, match=re.escape(message)):
                model.check(inputs, None)
        with pytest.raises(InferInputError, match="unknown output 'probs'"):
            model.check(good, ["probs"])
        model.check(good, ["logits"])
    finally:
        model.close()


def test_configuration_errors_are_named(exported, tmp_path):
    root, _ = exported
    bad = [
        ({"max_batch_sise": 4}, "unknown setting(s) for the onnxruntime backend: max_batch_sise"),
        ({"max_batch_size": -1}, "max_batch_size must be an integer >= 0"),
        ({"max_batch_size": 2, "preferred_batch_sizes": [4]}, "exceed max_batch_size 2"),
        ({"optimization_level": "max"}, "optimization_level must be one of"),
        ({"input": [{"name": "x", "datatype": "FLOAT"}]}, "datatype 'FLOAT' is not one of"),
        ({"input": [{"name": "x", "dims": [0]}]}, "dims must be"),
        ({"input": [{"name": "x", "shape": [1]}]}, "unknown key"),
    ]
    for settings, message in bad:
        with pytest.raises(InvalidArgumentError, match=re.escape(message)):
            tensor_config(settings, "onnxruntime", "surge.toml")
    with pytest.raises(InvalidArgumentError, match="onnxruntime setting"):
        tensor_config({"intra_op_threads": 2}, "torch", "surge.toml")
    with pytest.raises(InvalidArgumentError, match="declared input.*nope.*not in the model"):
        load(root / "bert_onnx", "onnxruntime", {"input": [{"name": "nope"}]})
    with pytest.raises(InvalidArgumentError, match="'logits' is FP32 in the model, declared INT64"):
        load(root / "bert_onnx", "onnxruntime", {"output": [{"name": "logits", "datatype": "INT64"}]})
    script = tmp_path / "bare"
    script.mkdir()
    os.link(root / "vision_ts" / "model.pt", script / "model.pt")
    with pytest.raises(InvalidArgumentError, match="declare each input.*missing for: pixels"):
        TensorModel.load(str(script), tensor_config({}, "torch", "test"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelFormatError, match="onnxruntime cannot load it"):
        TensorModel.load(str(broken), tensor_config({}, "onnxruntime", "test"))
    assert BERT_TOML  # the served layout writes it beside the ONNX file


def test_embedding_configuration_errors(exported, tmp_path, tiny_tokenizer_dir):
    root, _ = exported
    for table, message in (
        ({"output": "h", "pooled": "mean"}, "unknown key(s) pooled"),
        ({"pooling": "mean"}, "needs 'output'"),
        ({"output": "h", "pooling": "max"}, "pooling must be one of mean, cls, last"),
        ({"output": "h", "max_length": 0}, "max_length must be a positive integer"),
    ):
        with pytest.raises(InvalidArgumentError, match=re.escape(message)):
            tensor_config({"embedding": table}, "onnxruntime", "surge.toml")
    with pytest.raises(InvalidArgumentError, match="takes input_ids .* this one takes pixels"):
        load(root / "vision_onnx", "onnxruntime", {"embedding": {"output": "scores"}})
    with pytest.raises(InvalidArgumentError, match="output 'hidden' is not one of the model's outputs: logits"):
        load(root / "bert_onnx", "onnxruntime", {"embedding": {"output": "hidden"}})
    with pytest.raises(InvalidArgumentError, match="tokenizer tokenizer.json is not in"):
        load(root / "bert_onnx", "onnxruntime", {"embedding": {"output": "logits"}})
    from tests.tensor.builders import export_encoder

    export_encoder(0, tiny_tokenizer_dir, tmp_path / "enc")
    model = load(tmp_path / "enc", "onnxruntime")
    try:
        embedder = model.embedder
        assert embedder is not None and embedder.hidden_size == 48
        with pytest.raises(InvalidArgumentError, match="takes at most 64"):
            embedder.tokens([1] * 65)
        with pytest.raises(InvalidArgumentError, match="empty"):
            embedder.tokens("")
        vector = embedder.vector(model.infer(embedder.arrays(embedder.tokens("hello there"))), 3)
        assert abs(np.linalg.norm(vector) - 1) < 1e-6
    finally:
        model.close()
