"""The repository on disk: which models and versions a directory holds, whether a version's
files are still changing (a copy in progress), and the engine settings in `surge.toml` files.

    DIR/
      <name>/                 one model; `surge.toml` here holds settings for every version
        <version>/            a positive integer: a .gguf file, or a Hugging Face directory, or a
                              tensor model (model.onnx, model.pt TorchScript, model.pt2 exported)
          surge.toml          and optionally settings for this version only (`backend` and a tensor
                              model's settings: surge/tensor/config.py)
"""

from __future__ import annotations

import os
import tomllib
from typing import Any

from surge.engine.args import EngineArgs
from surge.errors import InvalidArgumentError
from surge.tensor.config import BACKENDS, TensorModelConfig, detect_backend, tensor_config

CONFIG_FILE = "surge.toml"


def version_key(version: str) -> tuple[int, str]:
    """Sort key: numeric versions in order."""
    return (int(version), version) if version.isdigit() else (-1, version)


def scan_directory(root: str) -> dict[str, dict[str, str]]:
    """{model name: {version: directory}} as the repository is on disk now."""
    found: dict[str, dict[str, str]] = {}
    for name in sorted(os.listdir(root)):
        model_dir = os.path.join(root, name)
        if name.startswith(".") or not os.path.isdir(model_dir):
            continue
        found[name] = {v: os.path.join(model_dir, v) for v in os.listdir(model_dir)
                       if v.isdigit() and int(v) > 0 and os.path.isdir(os.path.join(model_dir, v))}
    return found


def directory_signature(path: str) -> tuple:
    """(relative path, size, mtime) of every file under `path`; changes while a copy is running."""
    entries = []
    for dirpath, _dirs, files in os.walk(path, followlinks=True):
        for name in files:
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            entries.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns))
    return tuple(sorted(entries))


def read_settings(path: str) -> dict[str, Any]:
    """A `surge.toml` as a dict ({} when absent); a syntax error names the file and the line."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgumentError(f"{path}: not valid TOML: {exc}") from exc


def version_settings(model_root: str | None, version_path: str | None) -> list[tuple[dict[str, Any], str]]:
    """[(settings, file)] of a version: the model's surge.toml, then the version's (later wins)."""
    if model_root is None:
        return []
    files = [os.path.join(model_root, CONFIG_FILE)]
    if version_path is not None:
        files.append(os.path.join(version_path, CONFIG_FILE))
    return [(read_settings(f), f) for f in files]


def version_backend(layers: list[tuple[dict[str, Any], str]], version_path: str | None) -> str:
    """The version's backend: `backend` as its surge.toml files set it, else what its files call for."""
    backend, source = None, ""
    for settings, file in layers:
        if "backend" in settings:
            backend, source = settings["backend"], file
    if backend is None:
        return detect_backend(version_path)
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"{source}: backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    return backend


def version_engine_args(defaults: EngineArgs, layers: list[tuple[dict[str, Any], str]]) -> EngineArgs:
    """An LLM version's settings: the server's, overridden by the model's surge.toml, then by the version's."""
    args = defaults
    for settings, file in layers:
        args = args.updated({k: v for k, v in settings.items() if k != "backend"}, file)
    return args


def version_tensor_config(backend: str, layers: list[tuple[dict[str, Any], str]],
                          version_path: str) -> TensorModelConfig:
    """A tensor model version's configuration: the model's surge.toml, key by key overridden by the version's."""
    merged: dict[str, Any] = {}
    for settings, _file in layers:
        merged.update({k: v for k, v in settings.items() if k != "backend"})
    sources = " + ".join(f for s, f in layers if s) or version_path
    return tensor_config(merged, backend, sources)
