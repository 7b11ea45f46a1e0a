"""Model repository: several models, each in numbered versions, loaded, switched and unloaded
while the server runs.

    DIR/
      <name>/                 one model; `surge.toml` here holds engine settings for every version
        <version>/            a positive integer: a .gguf file, or a Hugging Face directory,
          surge.toml          and optionally settings for this version only

A version's life: UNAVAILABLE (on disk) -> LOADING (weights, KV cache, warm-up) -> READY ->
UNLOADING (no new requests; in-flight ones finish) -> UNAVAILABLE, or LOADING -> FAILED with
the error. Each model has at most one serving version; a newer one is switched in atomically
only once it is READY, so a failed load never disturbs the version being served. Requests
hold a lease on the deployment they were routed to, and a retired version is unloaded only
when its last lease is returned.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from surge.engine.args import EngineArgs
from surge.engine.async_engine import AsyncEngine
from surge.engine.engine_core import ReserveHook
from surge.engine.llm_engine import LLMEngine
from surge.errors import InvalidArgumentError, ModelNotFoundError, SurgeError
from surge.server.budget import MemoryBudget, MiB

logger = logging.getLogger("surge.repository")

CONFIG_FILE = "surge.toml"
EngineFactory = Callable[[str | None, EngineArgs, ReserveHook], LLMEngine]


class State(str, Enum):
    UNAVAILABLE = "UNAVAILABLE"
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    FAILED = "FAILED"


class ModelUnavailableError(SurgeError):
    """The named model or version is not in the repository, or not READY."""


class ModelRequiredError(SurgeError):
    """A request without `model` on a server with several models."""


class RepositoryConflictError(SurgeError):
    """The operation cannot run now: another one is in progress, or there is nothing to roll back to."""


class ModelLoadError(SurgeError):
    """A load failed for a reason that is not one of surge's typed input errors."""


@dataclass(eq=False)
class Deployment:
    """One loaded version: its engine and the requests it is serving."""

    name: str
    version: str
    engine: LLMEngine
    async_engine: AsyncEngine
    memory_bytes: int
    in_flight: int = 0  # requests holding a lease
    sequences: int = 0  # their sequences (n x prompts), what --max-queue counts
    drained: threading.Event = field(default_factory=threading.Event)

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}"

    def close(self) -> None:
        """Stop the engine's thread, then its workers (a worker process exits)."""
        self.async_engine.shutdown()
        self.engine.shutdown()


@dataclass(eq=False)
class VersionRecord:
    version: str
    path: str | None  # None: the embedded default model
    state: State = State.UNAVAILABLE
    reason: str | None = "not loaded"
    deployment: Deployment | None = None
    signature: tuple | None = None  # the directory's files as last scanned
    stable: bool = False  # unchanged between the last two scans (a copy into place has finished)
    tried: tuple | None = None  # the signature at the last load attempt; polling retries only new files
    loaded_at: float | None = None
    draining: threading.Event | None = None  # set once a retired deployment of this version is gone


@dataclass(eq=False)
class ModelEntry:
    name: str
    root: str | None  # DIR/<name>; None for a model given on the command line
    versions: dict[str, VersionRecord] = field(default_factory=dict)
    serving: str | None = None
    history: list[str] = field(default_factory=list)  # earlier serving versions, for rollback
    op_lock: threading.Lock = field(default_factory=threading.Lock)

    def newest(self) -> str | None:
        return max(self.versions, key=int) if self.versions else None


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), version) if version.isdigit() else (-1, version)


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


class ModelRepository:
    """The models a server serves, by name and version, and the operations on them."""

    def __init__(self, factory: EngineFactory, defaults: EngineArgs, budget: MemoryBudget,
                 root: str | None = None, drain_timeout: float = 600.0):
        self.factory = factory
        self.defaults = defaults
        self.budget = budget
        self.root = root
        self.drain_timeout = drain_timeout
        self.models: dict[str, ModelEntry] = {}
        self.on_unloaded: list[Callable[[str], None]] = []  # told the key of each unloaded version
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    # ---- construction --------------------------------------------------------------------

    @classmethod
    def from_directory(cls, root: str, factory: EngineFactory, defaults: EngineArgs, budget: MemoryBudget,
                       ) -> "ModelRepository":
        root = os.path.abspath(os.path.expanduser(root))
        if not os.path.isdir(root):
            raise ModelNotFoundError(f"--model-repository {root}: no such directory")
        return cls(factory, defaults, budget, root)

    def add_model(self, name: str, path: str | None) -> None:
        """A single model given on the command line, served as version 1."""
        with self._lock:
            entry = ModelEntry(name, None)
            entry.versions["1"] = VersionRecord("1", path, stable=True)
            self.models[name] = entry

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self, poll_interval: float | None = None) -> None:
        """Load every model's newest version (failures are recorded, not raised), then poll."""
        if self.root is not None:
            self.sync(initial=True)
        else:
            for name in list(self.models):
                self._try(self.load, name)
        if poll_interval:
            self._poller = threading.Thread(target=self._poll, args=(poll_interval,), name="surge-repo-poll",
                                            daemon=True)
            self._poller.start()

    def shutdown(self) -> None:
        self._stop.set()
        with self._lock:
            deployments = [r.deployment for e in self.models.values() for r in e.versions.values() if r.deployment]
        for dep in deployments:
            dep.close()

    def _poll(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.sync()
            except Exception:  # noqa: BLE001 - a bad scan must not end polling
                logger.exception("scanning the model repository failed")

    @staticmethod
    def _try(op: Callable[..., Any], *args: Any) -> None:
        try:
            op(*args)
        except Exception as exc:  # noqa: BLE001 - recorded in the index and logged by the load
            logger.debug("%s%s failed: %s", op.__name__, args, exc)

    # ---- scanning ------------------------------------------------------------------------

    def scan(self) -> dict[str, dict[str, str]]:
        """{model name: {version: directory}} as the repository is on disk now."""
        assert self.root is not None
        found: dict[str, dict[str, str]] = {}
        for name in sorted(os.listdir(self.root)):
            model_dir = os.path.join(self.root, name)
            if name.startswith(".") or not os.path.isdir(model_dir):
                continue
            found[name] = {v: os.path.join(model_dir, v) for v in os.listdir(model_dir)
                           if v.isdigit() and int(v) > 0 and os.path.isdir(os.path.join(model_dir, v))}
        return found

    def sync(self, initial: bool = False) -> None:
        """Bring the served set in line with the directory: load new models and new newest
        versions (once their files stopped changing), unload models whose directory is gone."""
        found = self.scan()
        with self._lock:
            for name, versions in found.items():
                entry = self.models.get(name)
                if entry is None:
                    entry = self.models[name] = ModelEntry(name, os.path.join(self.root or "", name))
                for version, path in versions.items():
                    signature = directory_signature(path)
                    record = entry.versions.get(version)
                    if record is None:
                        entry.versions[version] = VersionRecord(version, path, signature=signature, stable=initial)
                    else:
                        record.stable = record.signature == signature
                        record.signature = signature
                for version in [v for v, r in entry.versions.items() if v not in versions]:
                    record = entry.versions[version]
                    if record.deployment is None and record.state is not State.LOADING:
                        del entry.versions[version]
            gone = [n for n, e in self.models.items() if e.root is not None and n not in found]
        for name in gone:
            logger.info("model %s: its directory was removed; unloading it", name)
            self._try(self.unload, name, "its directory was removed", True)
            with self._lock:
                entry = self.models.get(name)
                if entry is not None and all(r.deployment is None for r in entry.versions.values()):
                    del self.models[name]
        for name in list(found):
            entry = self.models[name]
            newest = entry.newest()
            if newest is None or newest == entry.serving:
                continue
            record = entry.versions[newest]
            if not record.stable or record.tried == record.signature \
                    or record.state not in (State.UNAVAILABLE, State.FAILED):
                continue
            if entry.serving is not None and int(newest) < int(entry.serving):
                continue
            self._try(self.load, name, newest, True)

    # ---- operations ----------------------------------------------------------------------

    def _entry(self, name: str) -> ModelEntry:
        with self._lock:
            entry = self.models.get(name)
            if entry is None:
                raise ModelUnavailableError(f"the repository has no model {name!r}; it has: "
                                            f"{', '.join(sorted(self.models)) or 'none'}")
            return entry

    def _operate(self, entry: ModelEntry, wait: bool) -> threading.Lock:
        if not entry.op_lock.acquire(blocking=wait):
            raise RepositoryConflictError(f"model {entry.name!r} is being loaded or unloaded; retry when it is done")
        return entry.op_lock

    def load(self, name: str, version: str | None = None, wait: bool = False) -> VersionRecord:
        """Load `version` (default: the newest) and make it the serving version once READY.

        Blocks until then; on failure the serving version is untouched and the error is both
        raised and kept in the index.
        """
        entry = self._entry(name)
        lock = self._operate(entry, wait)
        try:
            with self._lock:
                if entry.root is not None:  # pick up a version copied in since the last scan
                    for v, path in self.scan().get(name, {}).items():
                        if v not in entry.versions:
                            entry.versions[v] = VersionRecord(v, path, signature=directory_signature(path), stable=True)
                version = version or entry.newest()
                record = entry.versions.get(str(version)) if version is not None else None
                if record is None:
                    known = ", ".join(sorted(entry.versions, key=_version_key)) or "none"
                    raise ModelUnavailableError(f"model {name!r} has no version {version!r} (versions: {known})")
                if record.state is State.READY and record.deployment is not None:
                    self._switch(entry, record, record.deployment, f"replaced by version {record.version}", True)
                    return record
                draining = record.draining
            if draining is not None:  # one deployment per version at a time
                draining.wait(self.drain_timeout)
            deployment = self._build(entry, record)
            with self._lock:
                self._switch(entry, record, deployment, f"replaced by version {record.version}", True)
            return record
        finally:
            lock.release()

    def rollback(self, name: str) -> VersionRecord:
        """Serve the version served before the current one again (loading it if needed)."""
        entry = self._entry(name)
        lock = self._operate(entry, False)
        try:
            with self._lock:
                if not entry.history:
                    raise RepositoryConflictError(f"model {name!r} has no earlier version to roll back to")
                target = entry.history[-1]
                record = entry.versions.get(target)
                if record is None:
                    raise ModelUnavailableError(f"model {name!r}: version {target} is no longer in the repository")
                current = entry.serving
                draining = record.draining
            if draining is not None:  # one deployment per version at a time
                draining.wait(self.drain_timeout)
            deployment = record.deployment if record.state is State.READY else self._build(entry, record)
            assert deployment is not None
            with self._lock:
                entry.history.pop()
                self._switch(entry, record, deployment, f"rolled back from version {current} to {target}", False)
            return record
        finally:
            lock.release()

    def unload(self, name: str, reason: str = "unloaded by request", wait: bool = False) -> None:
        """Stop routing to every version of `name`; returns once their in-flight requests finished."""
        entry = self._entry(name)
        lock = self._operate(entry, wait)
        try:
            with self._lock:
                retiring = [r.deployment for r in entry.versions.values()
                            if r.deployment is not None and r.state is State.READY]
                for record in entry.versions.values():
                    if record.state is State.READY:
                        self._retire(record, reason)
                entry.serving = None
            for dep in retiring:
                if dep is not None:
                    dep.drained.wait(self.drain_timeout)
        finally:
            lock.release()

    # ---- loading and switching -----------------------------------------------------------

    def engine_args(self, entry: ModelEntry, record: VersionRecord) -> EngineArgs:
        args = self.defaults
        if entry.root is not None:
            model_file = os.path.join(entry.root, CONFIG_FILE)
            args = args.updated(read_settings(model_file), model_file)
            if record.path is not None:
                version_file = os.path.join(record.path, CONFIG_FILE)
                args = args.updated(read_settings(version_file), version_file)
        return args

    def _build(self, entry: ModelEntry, record: VersionRecord) -> Deployment:
        key = f"{entry.name}:{record.version}"
        with self._lock:
            record.state, record.reason = State.LOADING, None
            record.tried = record.signature
        start = time.perf_counter()
        engine: LLMEngine | None = None
        try:
            args = self.engine_args(entry, record)

            def reserve(estimate: Any) -> None:
                weights, kv = estimate.weight_bytes, estimate.kv_cache_bytes
                self.budget.reserve(key, weights + kv, f"weights ~{weights / MiB:.0f} MiB + KV cache {kv / MiB:.0f} MiB")

            engine = self.factory(record.path, args, reserve)
            warm = engine.warm_up() if args.warmup else None
            measured = engine.memory_bytes()
            self.budget.settle(key, measured)
            aengine = AsyncEngine(engine)
            aengine.start()
        except BaseException as exc:
            if engine is not None:  # its warm-up failed: its workers go too
                engine.shutdown()
            self.budget.release(key)
            error = exc if isinstance(exc, SurgeError) else ModelLoadError(f"{type(exc).__name__}: {exc}")
            with self._lock:
                record.state, record.reason = State.FAILED, str(error)
            logger.error("loading %s from %s failed: %s", key, record.path or "the default model", error)
            if error is exc:
                raise
            raise error from exc
        info = engine.model_info
        logger.info(
            "loaded %s in %.1fs: %s from %s, dtype %s, quantization %s, KV cache %d tokens, %.0f MiB%s", key,
            time.perf_counter() - start, info.architecture, info.path, info.dtype, info.quantization,
            engine.capacity_tokens, measured / MiB,
            f", warm-up {warm.seconds:.1f}s (prefill {warm.prefill_lengths}, decode batches "
            f"{warm.decode_batch_sizes})" if warm else "",
        )
        return Deployment(entry.name, record.version, engine, aengine, measured)

    def _switch(self, entry: ModelEntry, record: VersionRecord, deployment: Deployment, reason: str,
                remember: bool) -> None:
        """Make `record` the serving version (under the lock); the previous one drains."""
        record.deployment, record.state, record.reason = deployment, State.READY, None
        record.loaded_at = record.loaded_at or time.time()
        previous = entry.serving
        entry.serving = record.version
        if previous is not None and previous != record.version:
            if remember:
                entry.history.append(previous)
            old = entry.versions.get(previous)
            if old is not None and old.state is State.READY:
                self._retire(old, reason)
        logger.info("model %s: serving version %s%s", entry.name, record.version,
                    f" (was {previous})" if previous and previous != record.version else "")

    def _retire(self, record: VersionRecord, reason: str) -> None:
        """Stop routing to `record` (under the lock) and unload it once its requests are done."""
        deployment = record.deployment
        assert deployment is not None
        record.state, record.reason = State.UNLOADING, reason
        record.loaded_at = None
        record.draining = deployment.drained
        # the thread gets the record, not the deployment, so nothing keeps the engine alive after it
        threading.Thread(target=self._drain, args=(record, reason), name="surge-drain-version",
                         daemon=True).start()

    def _drain(self, record: VersionRecord, reason: str) -> None:
        dep = record.deployment  # a new load of this version waits for `drained`, so it is still ours
        assert dep is not None
        deadline = time.monotonic() + self.drain_timeout
        while (dep.in_flight or dep.async_engine.num_unfinished()) and time.monotonic() < deadline:
            time.sleep(0.05)
        if dep.in_flight:
            logger.warning("%s: %d requests still in flight after %.0fs; unloading anyway", dep.key, dep.in_flight,
                           self.drain_timeout)
        dep.close()
        with self._lock:
            if record.deployment is dep:
                record.deployment = None
        key, drained = dep.key, dep.drained
        del dep
        gc.collect()  # the engine's tensors go now, not at some later collection
        self.budget.release(key)
        for callback in self.on_unloaded:
            callback(key)
        with self._lock:  # UNAVAILABLE once its memory is returned
            if record.draining is drained:
                record.state, record.reason, record.draining = State.UNAVAILABLE, f"unloaded: {reason}", None
        logger.info("unloaded %s (%s)", key, reason)
        drained.set()

    # ---- routing -------------------------------------------------------------------------

    def acquire(self, requested: str | None, sequences: int = 1) -> tuple[Deployment, str]:
        """The deployment serving `requested` ("name" or "name:version"), with a lease taken for
        `sequences` sequences, and the name to answer with. Return the lease with release()."""
        with self._lock:
            if requested is None:
                serving = [e for e in self.models.values() if e.serving is not None]
                if len(serving) != 1:
                    raise ModelRequiredError(
                        "the 'model' field is required: this server serves "
                        f"{', '.join(sorted(e.name for e in serving)) or 'no model yet'}")
                entry, version = serving[0], None
            else:
                entry, version = self.models.get(requested), None
                if entry is None and ":" in requested:
                    name, version = requested.rsplit(":", 1)
                    entry = self.models.get(name)
                if entry is None:
                    raise ModelUnavailableError(
                        f"The model `{requested}` does not exist; this server serves: "
                        f"{', '.join(sorted(self.models)) or 'nothing'}")
            version = version or entry.serving
            record = entry.versions.get(version) if version is not None else None
            if record is None or record.state is not State.READY or record.deployment is None:
                states = ", ".join(f"{v} {r.state.value}" for v, r in sorted(entry.versions.items(),
                                                                               key=lambda kv: _version_key(kv[0])))
                what = f"version {version} of model `{entry.name}`" if version else f"model `{entry.name}`"
                raise ModelUnavailableError(f"{what} is not being served (versions: {states or 'none'})")
            record.deployment.in_flight += 1
            record.deployment.sequences += sequences
            return record.deployment, requested or entry.name

    def release(self, deployment: Deployment, sequences: int = 1) -> None:
        with self._lock:
            deployment.in_flight -= 1
            deployment.sequences -= sequences

    # ---- observation ---------------------------------------------------------------------

    def deployments(self) -> list[Deployment]:
        """Every loaded deployment (serving or draining)."""
        with self._lock:
            return [r.deployment for e in self.models.values() for r in e.versions.values()
                    if r.deployment is not None]

    def serving(self) -> list[Deployment]:
        with self._lock:
            return [e.versions[e.serving].deployment for e in self.models.values()  # type: ignore[misc]
                    if e.serving is not None and e.versions[e.serving].deployment is not None]

    def in_flight(self) -> int:
        return sum(d.in_flight + d.async_engine.num_unfinished() for d in self.deployments())

    def index(self) -> list[dict[str, Any]]:
        """Every model version with its state, as Triton's repository index lists them."""
        rows = []
        with self._lock:
            for name in sorted(self.models):
                entry = self.models[name]
                for version in sorted(entry.versions, key=_version_key):
                    record = entry.versions[version]
                    dep = record.deployment
                    rows.append({
                        "name": name, "version": version, "state": record.state.value, "reason": record.reason,
                        "serving": entry.serving == version, "path": record.path,
                        "loaded_at": record.loaded_at,
                        "memory_bytes": dep.memory_bytes if dep is not None else None,
                        "in_flight": dep.in_flight if dep is not None else 0,
                    })
        return rows
