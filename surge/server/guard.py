"""The server's front door (plain ASGI): request ids, Host and Origin checks, keys, body limits.

Every request passes here before any route: nothing refused here reaches the engine, and
nothing is parsed before its size and type are known to be acceptable.

    request id (client's X-Request-Id if sane, else new) -> Host vs bound address / --allowed-host
      -> Origin vs same origin / --allowed-origin (CORS preflights of allowed origins pass)
      -> key of the route (API, admin, metrics; constant-time) -> Content-Length vs the limit (413)
      -> Content-Type must be JSON (415) -> body read with a deadline (408) and a limit (413)
      -> the app, with the body replayed; the status is counted and, with --access-log, logged

Plain ASGI (not BaseHTTPMiddleware), so routes still see the client's disconnect.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import hmac
import logging
import re
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from surge.server.errors import error_response
from surge.server.settings import ServerSettings

access_logger = logging.getLogger("surge.access")

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("surge_request_id", default="-")
API_PREFIXES = ("/v1/", "/tokenize", "/detokenize", "/v2/models/")  # /v2/models/: KServe inference
OPEN_PATHS = ("/v2", "/v2/health/live", "/v2/health/ready")  # KServe's server metadata and health, as /health
ADMIN_PREFIX = "/v2/"
CONTROL_PREFIX = "/v2/repository/models/"  # load, unload, rollback: they change what is served
METRICS_PATHS = ("/metrics", "/dashboard")
_SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
_KSERVE_INFER = re.compile(r"/v2/models/[^/]+(/versions/[^/]+)?/infer")
DRAIN_LIMIT = 64 << 20  # an oversized body is read (and dropped) up to this, so the client sees its 413
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every log record (the current request's, "-" outside one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class _Refused(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers


class _Gone(Exception):
    """The client disconnected while its body was being read."""


def host_name(host: str) -> str:
    """The name of a Host header, without its port: "[::1]:8000" -> "::1"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip(name: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, name)
            return True
        except OSError:
            pass
    return False


def key_matches(authorization: str, keys: tuple[str, ...], basic: bool) -> bool:
    """Whether the header carries one of `keys` (as a bearer token, or as a basic-auth password
    where `basic`), compared in constant time against every key."""
    supplied: str | None = None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer":
        supplied = value.strip()
    elif basic and scheme.lower() == "basic":
        try:
            supplied = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            supplied = None
    if not supplied:
        return False
    given = supplied.encode("utf-8", "surrogateescape")
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key.encode("utf-8"))
    return found


class Guard:
    def __init__(self, app: Any, settings: ServerSettings, record_status: Callable[[str, int], None] | None = None):
        self.app = app
        self.settings = settings
        self.record_status = record_status
        # this machine's own names (no DNS lookup: a slow resolver must not delay the start)
        self.local_names = {*LOCAL_NAMES, socket.gethostname().lower(), settings.host.lower()}

    # ---- checks -------------------------------------------------------------------------

    def _check_host(self, headers: dict[bytes, bytes]) -> None:
        """Bound to loopback, only local names, addresses and --allowed-host; bound to a network
        address (reachable by anyone there already), any name unless --allowed-host narrows it."""
        raw = headers.get(b"host")
        allowed = self.settings.allowed_hosts
        if raw is None or "*" in allowed or (not allowed and not self.settings.loopback()):
            return
        name = host_name(raw.decode("latin-1"))
        if name in allowed or name in self.local_names or _is_ip(name):
            return  # an address literal has no name to rebind
        raise _Refused(403, f"Host {name!r} is not served here; add it with --allowed-host", "permission_error",
                       "host_not_allowed")

    def _origin_allowed(self, origin: str, headers: dict[bytes, bytes]) -> bool:
        allowed = self.settings.allowed_origins
        if "*" in allowed or origin.rstrip("/") in allowed:
            return True
        host = headers.get(b"host", b"").decode("latin-1").lower()
        try:
            parts = urlsplit(origin)
        except ValueError:
            return False
        return bool(parts.netloc) and parts.netloc.lower() == host  # same origin (the dashboard)

    def _required_keys(self, path: str) -> tuple[tuple[str, ...], str, bool]:
        """(keys of which one is needed, their name, basic auth accepted); no keys: open."""
        s = self.settings
        if path in OPEN_PATHS:
            return (), "", False
        if path.startswith(CONTROL_PREFIX):
            if s.admin_key is None:
                raise _Refused(403, "the model control API is disabled: start the server with --admin-key to "
                                    "load, unload or roll back models", "permission_error", "admin_disabled")
            return (s.admin_key,), "admin key", False
        if path.startswith(API_PREFIXES):
            return s.api_keys, "API key", False
        if path.startswith(ADMIN_PREFIX):
            return ((s.admin_key,), "admin key", False) if s.admin_key else (s.api_keys, "API key", False)
        if path.startswith(METRICS_PATHS):
            return ((s.metrics_key,), "metrics key", True) if s.metrics_key else (s.api_keys, "API key", True)
        return (), "", False

    def _check_key(self, path: str, headers: dict[bytes, bytes]) -> None:
        keys, name, basic = self._required_keys(path)
        if not keys:
            return
        if key_matches(headers.get(b"authorization", b"").decode("latin-1"), keys, basic):
            return
        extra = {"WWW-Authenticate": 'Basic realm="surge"'} if basic else {"WWW-Authenticate": "Bearer"}
        raise _Refused(401, f"missing or invalid {name}: send 'Authorization: Bearer <key>'",
                       "authentication_error", "invalid_api_key", extra)

    def _check_declared_body(self, headers: dict[bytes, bytes], binary_ok: bool) -> None:
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                raise _Refused(400, "Content-Length is not a number", "invalid_request_error") from None
            if declared > DRAIN_LIMIT:
                raise self._too_large()
        ctype = headers.get(b"content-type")
        if ctype is not None and not self._is_json(ctype) and not (binary_ok and self._is_binary(ctype)):
            raise _Refused(415, f"the body must be application/json, got {ctype.decode('latin-1')!r}",
                           "invalid_request_error", "unsupported_media_type")

    @staticmethod
    def _is_binary(ctype: bytes) -> bool:
        return ctype.decode("latin-1").split(";", 1)[0].strip().lower() == "application/octet-stream"

    @staticmethod
    def _is_json(ctype: bytes) -> bool:
        media = ctype.decode("latin-1").split(";", 1)[0].strip().lower()
        return media == "application/json"

    def _too_large(self) -> _Refused:
        limit = self.settings.max_request_bytes
        return _Refused(413, f"the request body exceeds --max-request-bytes ({limit} bytes)",
                        "invalid_request_error", "request_too_large")

    async def _read_body(self, receive: Callable) -> bytes:
        limit = self.settings.max_request_bytes
        deadline = time.monotonic() + self.settings.body_timeout
        chunks: list[bytes] = []
        size = 0
        while True:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise asyncio.TimeoutError
                message = await asyncio.wait_for(receive(), remaining)
            except asyncio.TimeoutError:
                raise _Refused(408, f"the request body did not arrive within --body-timeout "
                                    f"({self.settings.body_timeout:g} s)", "timeout_error", "body_timeout") from None
            if message["type"] == "http.disconnect":
                raise _Gone
            body = message.get("body", b"")
            size += len(body)
            if size <= limit:
                chunks.append(body)
            elif size > DRAIN_LIMIT:
                raise self._too_large()
            if not message.get("more_body", False):
                break
        if size > limit:
            raise self._too_large()
        return b"".join(chunks)

    # ---- the door -----------------------------------------------------------------------

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _SANE_ID.fullmatch(given) else uuid.uuid4().hex
        token = REQUEST_ID.set(request_id)
        path: str = scope["path"]
        method: str = scope["method"]
        start = time.perf_counter()
        status = 500

        async def send_marked(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode("latin-1"))]}
            await send(message)

        try:
            try:
                self._check_host(headers)
                origin = headers.get(b"origin")
                if origin is not None and not self._origin_allowed(origin.decode("latin-1"), headers):
                    raise _Refused(403, f"cross-origin request from {origin.decode('latin-1')!r} refused; "
                                        "allow the origin with --allowed-origin", "permission_error",
                                   "origin_not_allowed")
                preflight = method == "OPTIONS" and origin is not None \
                    and b"access-control-request-method" in headers
                if not preflight:
                    self._check_key(path, headers)
                if method in _BODY_METHODS:
                    # KServe's infer takes the binary-tensor extension, which its clients send untyped
                    binary_ok = _KSERVE_INFER.fullmatch(path) is not None
                    self._check_declared_body(headers, binary_ok)
                    body = await self._read_body(receive)
                    if body and b"content-type" not in headers and not binary_ok:
                        raise _Refused(415, "the body must be application/json: send 'Content-Type: "
                                            "application/json'", "invalid_request_error", "unsupported_media_type")
                    receive = _replay(body, receive)
            except _Refused as refused:
                response = error_response(refused.status, refused.message, refused.type, None, refused.code,
                                          refused.headers)
                await response(scope, receive, send_marked)
                return
            except _Gone:
                status = 499
                return
            await self.app(scope, receive, send_marked)
        finally:
            if self.record_status is not None and path.startswith((*API_PREFIXES, ADMIN_PREFIX)):
                self.record_status(_endpoint(path), status)
            if self.settings.access_log:
                client = scope.get("client")
                access_logger.info("%s %s %s %d %.1fms", client[0] if client else "-", method, path, status,
                                   1000 * (time.perf_counter() - start))
            REQUEST_ID.reset(token)


_MODEL_PATH = re.compile(r"^(/v2/(?:repository/)?models/)[^/]+(?:/versions/[^/]+)?")


def _endpoint(path: str) -> str:
    """The metrics label of a path: model names and versions replaced by placeholders, so clients
    cannot grow the label set."""
    return _MODEL_PATH.sub(lambda m: m.group(1) + "{name}" + ("/versions/{version}" if "/versions/" in m.group(0)
                                                               else ""), path)


def _replay(body: bytes, receive: Callable) -> Callable:
    """A receive that hands the app the body already read, then the client's later messages
    (its disconnect)."""
    sent = False

    async def replayed() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
