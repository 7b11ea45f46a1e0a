"""Typed errors a user can cause; each message names the problem and what to do about it."""

from __future__ import annotations


class SurgeError(Exception):
    """Base class of every error surge raises for bad input (the CLI prints it as one line)."""


class ModelNotFoundError(SurgeError):
    """A model path or hub id that does not exist or cannot be reached."""


class ModelFormatError(SurgeError):
    """A checkpoint that exists but cannot be read: truncated, corrupt, or missing a part."""


class UnsupportedArchitectureError(SurgeError):
    """A checkpoint whose architecture surge has no implementation for."""


class UnsupportedTensorTypeError(SurgeError):
    """A GGUF tensor stored in a quantization type surge cannot load."""


class InvalidArgumentError(SurgeError, ValueError):
    """A bad argument: an unknown dtype, an out-of-range sampling parameter, a prompt too long."""


class StructuredOutputError(InvalidArgumentError):
    """An output constraint (JSON schema, regex, choice, grammar) that is malformed or that
    surge cannot enforce exactly; raised before the request is queued."""


class EngineDeadError(SurgeError):
    """The engine cannot serve any more: its worker process died or hung, its step loop failed,
    or it was shut down. Requests in flight end with this error; the engine must be rebuilt."""


class WorkerError(RuntimeError):
    """An error raised in a worker process whose own type could not be sent back as it is."""
