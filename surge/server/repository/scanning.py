"""The repository on disk: which models and versions a directory holds, whether a version's
files are still changing (a copy in progress), and the engine settings in `surge.toml` files.

    DIR/
      <name>/                 one model; `surge.toml` here holds engine settings for every version
        <version>/            a positive integer: a .gguf file, or a Hugging Face directory,
          surge.toml          and optionally settings for this version only
"""

from __future__ import annotations

import os
import tomllib
from typing import Any

from surge.engine.args import EngineArgs
from surge.errors import InvalidArgumentError

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


def version_engine_args(defaults: EngineArgs, model_root: str | None, version_path: str | None) -> EngineArgs:
    """The server's settings, overridden by the model's surge.toml, then by the version's."""
    args = defaults
    if model_root is not None:
        model_file = os.path.join(model_root, CONFIG_FILE)
        args = args.updated(read_settings(model_file), model_file)
        if version_path is not None:
            version_file = os.path.join(version_path, CONFIG_FILE)
            args = args.updated(read_settings(version_file), version_file)
    return args
