"""surge: a fast LLM inference engine and OpenAI-compatible server on PyTorch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from surge.errors import SurgeError
from surge.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "EngineArgs", "SamplingParams", "SurgeError", "__version__"]

if TYPE_CHECKING:
    from surge.engine.args import EngineArgs
    from surge.entrypoints.llm import LLM


def __getattr__(name: str) -> Any:
    # `import surge` stays light (no torch) until the engine is actually used.
    if name == "LLM":
        from surge.entrypoints.llm import LLM

        return LLM
    if name == "EngineArgs":
        from surge.engine.args import EngineArgs

        return EngineArgs
    raise AttributeError(name)
