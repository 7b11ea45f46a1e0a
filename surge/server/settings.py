"""ServerSettings: every `surge serve` setting of the HTTP layer, its flag, default and help
written once here; the CLI builds its flags from this table and the server reads the object.

Engine settings (model, KV cache, scheduler) are the engine's own and not repeated here.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surge.errors import InvalidArgumentError
from surge.sampling_params import POOLING
from surge.server.reasoning import PARSERS

MiB = 1 << 20


def _opt(help: str, flag: str | None = None, metavar: str | None = None, repeat: bool = False,
         switch: bool = False, choices: tuple[str, ...] | None = None) -> dict[str, Any]:
    """A field's flag: its help, and how argparse takes it (a field without this is no flag)."""
    return {"help": help, "flag": flag, "metavar": metavar, "repeat": repeat, "switch": switch, "choices": choices}


@dataclass
class ServerSettings:
    """The HTTP server's settings: network, limits, security, logging."""

    host: str = field(default="127.0.0.1", metadata=_opt("address to listen on"))
    port: int = field(default=8000, metadata=_opt("port to listen on"))
    grpc_port: int | None = field(default=None, metadata=_opt(
        "also serve the KServe v2 protocol over gRPC on this port (needs pip install \"surge[grpc]\"; "
        "default: off)", metavar="PORT"))
    api_keys: tuple[str, ...] = field(default=(), metadata=_opt(
        "require 'Authorization: Bearer KEY' on /v1, the tokenizer routes and KServe's /v2/models "
        "(and gRPC's model calls) (repeatable: any of them is accepted)",
        flag="--api-key", metavar="KEY", repeat=True))
    api_key_file: str | None = field(default=None, metadata=_opt(
        "read more API keys from FILE, one per line (# comments and blank lines skipped); "
        "read at start", metavar="FILE"))
    admin_key: str | None = field(default=None, metadata=_opt(
        "enable the model control calls (/v2/repository/models/*/load, unload, rollback, and gRPC's "
        "repository calls) and require 'Authorization: Bearer KEY' on /v2/repository; without it they "
        "answer 403", metavar="KEY"))
    metrics_key: str | None = field(default=None, metadata=_opt(
        "require this key on /metrics and the dashboard (Bearer, or as the password of HTTP basic auth); "
        "without it, the API keys protect them when set", metavar="KEY"))
    allowed_origins: tuple[str, ...] = field(default=(), metadata=_opt(
        "browser origins (scheme://host[:port]) allowed to call the API cross-site, with CORS headers "
        "(repeatable; '*' for any); others get 403 (default: none, same-origin and non-browser clients only)",
        flag="--allowed-origin", metavar="ORIGIN", repeat=True))
    allowed_hosts: tuple[str, ...] = field(default=(), metadata=_opt(
        "Host header names accepted besides IP addresses and the machine's own names; repeatable, '*' for any; "
        "others get 403, a defence against DNS rebinding (default: bound to loopback, local names only; "
        "bound to a network address, any name)",
        flag="--allowed-host", metavar="HOST", repeat=True))
    max_request_bytes: int = field(default=4 * MiB, metadata=_opt(
        "largest request body accepted; larger ones get 413 before anything is parsed (default: 4MiB)",
        metavar="SIZE"))
    max_prompts: int = field(default=256, metadata=_opt(
        "prompts one completions request may carry", metavar="N"))
    max_tokens_default: int | None = field(default=None, metadata=_opt(
        "max_tokens of a chat request that gives none (default: up to the model's context)", metavar="N"))
    max_queue: int | None = field(default=None, metadata=_opt(
        "sequences (n x prompts of every request) allowed to wait beyond --max-num-seqs, per model; "
        "a request that would exceed it gets 429 (default: unbounded)", metavar="N"))
    request_timeout: float | None = field(default=None, metadata=_opt(
        "abort a request after S seconds with a timeout error (default: none)", metavar="S"))
    header_timeout: float = field(default=10.0, metadata=_opt(
        "close a connection whose request headers take longer than S seconds", metavar="S"))
    body_timeout: float = field(default=30.0, metadata=_opt(
        "answer 408 to a request whose body takes longer than S seconds to arrive", metavar="S"))
    timeout_keep_alive: float = field(default=5.0, metadata=_opt(
        "close an idle keep-alive connection after S seconds", metavar="S"))
    limit_concurrency: int = field(default=1024, metadata=_opt(
        "connections and requests at once; beyond it new ones get 503", metavar="N"))
    shutdown_grace: float = field(default=30.0, metadata=_opt(
        "on SIGTERM, seconds to let in-flight requests finish; then they get 503 / an error event", metavar="S"))
    response_cache_size: int = field(default=0, metadata=_opt(
        "keep the last N finished deterministic generations and answer repeats from them (default: 0, off)",
        metavar="N"))
    tool_call_parser: str | None = field(default=None, metadata=_opt(
        "the format tool calls are read in and enforced with (default: from the model's chat template; "
        "hermes for templates that take no tools)", choices=("hermes", "llama3_json", "mistral", "json")))
    embedding_pooling: str = field(default="last", metadata=_opt(
        "how /v1/embeddings pools the model's final hidden states: last (the last token's, as vLLM does "
        "for decoder models) or mean (over the input); a request's own 'pooling' wins",
        choices=POOLING))
    reasoning_parser: str = field(default="auto", metadata=_opt(
        "split a reasoning model's <think>...</think> into reasoning_content: auto (when the chat "
        "template writes </think>), think (always; qwen3 and deepseek_r1 name it too), none",
        choices=PARSERS))
    access_log: bool = field(default=False, metadata=_opt(
        "log one line per request (request id, method, path, status, milliseconds)", switch=True))
    log_level: str = field(default="info", metadata=_opt(
        "server log level", choices=("debug", "info", "warning", "error")))
    retry_after_s: int = 1  # the Retry-After of a 429; not a flag

    def __post_init__(self) -> None:
        self.api_keys = tuple(self.api_keys)
        self.allowed_origins = tuple(o.rstrip("/") for o in self.allowed_origins)
        self.allowed_hosts = tuple(h.lower() for h in self.allowed_hosts)
        positive = {"--max-queue": self.max_queue, "--request-timeout": self.request_timeout,
                    "--max-request-bytes": self.max_request_bytes, "--max-prompts": self.max_prompts,
                    "--max-tokens-default": self.max_tokens_default, "--header-timeout": self.header_timeout,
                    "--body-timeout": self.body_timeout, "--timeout-keep-alive": self.timeout_keep_alive,
                    "--limit-concurrency": self.limit_concurrency, "--shutdown-grace": self.shutdown_grace}
        for name, value in positive.items():
            if value is not None and value <= 0:
                raise InvalidArgumentError(f"{name} must be positive, got {value}")
        if self.grpc_port is not None and not (0 < self.grpc_port < 65536 and self.grpc_port != self.port):
            raise InvalidArgumentError(f"--grpc-port must be a free port other than --port, got {self.grpc_port}")
        if self.grpc_port is not None and (importlib.util.find_spec("grpc") is None
                                           or importlib.util.find_spec("tritonclient") is None):
            raise InvalidArgumentError('--grpc-port needs the gRPC extra: pip install "surge[grpc]"')
        if self.response_cache_size < 0:
            raise InvalidArgumentError(f"--response-cache-size must be 0 (off) or more, got {self.response_cache_size}")
        if self.api_key_file is not None:  # read once, at start: a missing or empty file fails here
            self.api_keys = self.api_keys + read_key_file(self.api_key_file)
            self.api_key_file = None
        for key in (*self.api_keys, self.admin_key, self.metrics_key):
            if key is not None and (not key or not key.isprintable() or " " in key):
                raise InvalidArgumentError("keys must be non-empty printable text without spaces")
        for origin in self.allowed_origins:
            if origin != "*" and "://" not in origin:
                raise InvalidArgumentError(f"--allowed-origin takes scheme://host[:port] or '*', got {origin!r}")

    def loopback(self) -> bool:
        """Bound to this machine only (127.0.0.1, ::1, localhost)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def read_key_file(path: str) -> tuple[str, ...]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InvalidArgumentError(f"cannot read --api-key-file {path}: {exc.strerror or exc}") from exc
    keys = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not keys:
        raise InvalidArgumentError(f"--api-key-file {path} holds no key")
    return keys


def _flag(f: dataclasses.Field) -> str:
    return f.metadata["flag"] if f.metadata["flag"] is not None else "--" + f.name.replace("_", "-")


def add_server_args(parser: argparse.ArgumentParser, size: Any = None) -> None:
    """One flag per ServerSettings field; `size` parses sizes such as 4MiB."""
    for f in dataclasses.fields(ServerSettings):
        meta = f.metadata
        if "help" not in meta:
            continue
        flag = _flag(f)
        kwargs: dict[str, Any] = {"dest": f.name, "help": meta["help"]}
        if meta["switch"]:
            parser.add_argument(flag, action="store_true", **kwargs)
            continue
        if meta["repeat"]:
            parser.add_argument(flag, action="append", default=[], metavar=meta["metavar"], **kwargs)
            continue
        kind = _type_of(f)
        if f.name == "max_request_bytes" and size is not None:
            kind = size(flag)
        default = f.default
        shown = f" (default: {default})" if default is not None and "default:" not in meta["help"] else ""
        kwargs["help"] = meta["help"] + shown.replace("%", "%%")
        parser.add_argument(flag, type=kind, default=default, metavar=meta["metavar"], choices=meta["choices"],
                            **kwargs)


def _type_of(f: dataclasses.Field) -> type:
    text = str(f.type)
    if "float" in text:
        return float
    if "int" in text:
        return int
    return str


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerSettings) if hasattr(args, f.name)}
    for name in ("api_keys", "allowed_origins", "allowed_hosts"):
        values[name] = tuple(values.get(name) or ())
    return ServerSettings(**values)
