"""Packaged models: parts found without importing them, assembled once, checked, reused; clear
errors for missing parts, a corrupt part and an unknown name."""

from __future__ import annotations

import hashlib
import os
import sys

import pytest

from surge.errors import ModelFormatError, ModelNotFoundError
from surge.loader import zoo
from surge.loader.hub import resolve_model


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """A model of three parts in two importable packages, registered in the zoo for the test."""
    parts = [b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 5]
    for i, data in enumerate(parts):
        pkg = tmp_path / "site" / f"surgefake_part{i + 1}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise RuntimeError('parts are found without importing them')\n")
        (pkg / "data" / f"part{i + 1:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    whole = b"".join(parts)
    model = zoo.ZooModel("fake-model", "fake.gguf",
                         tuple((f"surgefake_part{i}", f"data/part{i:02d}.bin") for i in (1, 2, 3)),
                         len(whole), hashlib.sha256(whole).hexdigest(), "pip install surgefake-part1 ...")
    monkeypatch.setitem(zoo.ZOO, model.name, model)
    monkeypatch.setenv("SURGE_CACHE_DIR", str(tmp_path / "cache"))
    return model, whole, tmp_path


def test_assembles_once_and_reuses_the_file(fake_model):
    model, whole, tmp = fake_model
    path = zoo.assemble(model.name)
    assert path == os.path.join(str(tmp / "cache"), "models", "fake.gguf")
    assert open(path, "rb").read() == whole
    assert not any(n.endswith(".partial") for n in os.listdir(os.path.dirname(path)))
    mtime = os.stat(path).st_mtime_ns
    assert zoo.assemble(model.name) == path and os.stat(path).st_mtime_ns == mtime  # not rewritten
    assert resolve_model(model.name).path == path and resolve_model(model.name).kind == "gguf"
    assert "surgefake_part1" not in sys.modules


def test_a_changed_file_is_assembled_again(fake_model):
    model, whole, _ = fake_model
    path = zoo.assemble(model.name)
    with open(path, "r+b") as f:  # same size, other bytes: the stamp no longer matches
        f.write(b"XXXX")
    os.utime(path, ns=(1, 1))
    assert open(zoo.assemble(model.name), "rb").read() == whole


def test_missing_parts_name_the_install_command(fake_model, monkeypatch):
    model, _, tmp = fake_model
    os.remove(tmp / "site" / "surgefake_part2" / "data" / "part02.bin")
    with pytest.raises(ModelNotFoundError, match=r"fake-model: 1 of its 3 parts are not installed "
                                                 r"\(surgefake_part2\); install them with: pip install surgefake"):
        zoo.assemble(model.name)
    assert not zoo.is_installed(model.name)


def test_a_corrupt_part_is_refused_and_leaves_nothing(fake_model):
    model, _, tmp = fake_model
    (tmp / "site" / "surgefake_part3" / "data" / "part03.bin").write_bytes(b"d" * 5)
    with pytest.raises(ModelFormatError, match="expected .* bytes with sha256 .*; reinstall its packages"):
        zoo.assemble(model.name)
    assert os.listdir(tmp / "cache" / "models") == []


def test_unknown_names_list_the_packaged_models():
    with pytest.raises(ModelNotFoundError, match="qwen2.5-coder-0.5b-instruct"):
        resolve_model("no-such-model")
    with pytest.raises(ModelNotFoundError, match="not a known model"):
        zoo.assemble("no-such-model")

