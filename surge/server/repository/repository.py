"""The model repository: several models, each in numbered versions, loaded, switched and
unloaded while the server runs; requests are routed to the serving version of each.

The pieces: scanning.py (the directory and its surge.toml files), versions.py (the state
machine of each version), deployments.py (building an engine within the memory budget, and
draining it). Requests hold a lease on the deployment they were routed to (acquire /
release), and a retired version is unloaded only when its last lease is returned.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from surge.engine.args import EngineArgs
from surge.errors import ModelNotFoundError
from surge.server.budget import MemoryBudget
from surge.server.repository.deployments import (
    AnyDeployment,
    BatchObserver,
    EngineFactory,
    build_deployment,
    build_tensor_deployment,
    wait_drained,
)
from surge.server.repository.scanning import (
    directory_signature,
    scan_directory,
    version_backend,
    version_engine_args,
    version_key,
    version_settings,
    version_tensor_config,
)
from surge.server.repository.versions import (
    ModelEntry,
    ModelRequiredError,
    ModelUnavailableError,
    RepositoryConflictError,
    State,
    VersionRecord,
)

logger = logging.getLogger("surge.repository")


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
        self.observe_batch: BatchObserver | None = None  # told each batch a tensor model runs
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
        return scan_directory(self.root)

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
                    known = ", ".join(sorted(entry.versions, key=version_key)) or "none"
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

    def _build(self, entry: ModelEntry, record: VersionRecord) -> AnyDeployment:
        with self._lock:
            record.loading()
        try:
            layers = version_settings(entry.root, record.path)
            backend = version_backend(layers, record.path)
            if backend != "llm" and record.path is not None:
                config = version_tensor_config(backend, layers, record.path)
                return build_tensor_deployment(entry.name, record.version, record.path, config, self.budget,
                                               self.observe_batch)
            return build_deployment(entry.name, record.version, record.path,
                                    version_engine_args(self.defaults, layers), self.factory, self.budget)
        except BaseException as exc:
            with self._lock:
                record.failed(str(exc))
            logger.error("loading %s:%s from %s failed: %s", entry.name, record.version,
                         record.path or "the default model", exc)
            raise

    def _switch(self, entry: ModelEntry, record: VersionRecord, deployment: AnyDeployment, reason: str,
                remember: bool) -> None:
        """Make `record` the serving version (under the lock); the previous one drains."""
        previous = entry.serving
        retired = entry.switch(record, deployment, remember)
        if retired is not None:
            self._retire(retired, reason)
        logger.info("model %s: serving version %s%s", entry.name, record.version,
                    f" (was {previous})" if previous and previous != record.version else "")

    def _retire(self, record: VersionRecord, reason: str) -> None:
        """Stop routing to `record` (under the lock) and unload it once its requests are done."""
        record.unloading(reason)
        # the thread gets the record, not the deployment, so nothing keeps the engine alive after it
        threading.Thread(target=self._drain, args=(record, reason), name="surge-drain-version",
                         daemon=True).start()

    def _drain(self, record: VersionRecord, reason: str) -> None:
        dep = record.deployment  # a new load of this version waits for `drained`, so it is still ours
        assert dep is not None
        wait_drained(dep, self.drain_timeout)
        dep.close()
        with self._lock:
            record.detach(dep)
        key, drained = dep.key, dep.drained
        del dep
        gc.collect()  # the engine's tensors go now, not at some later collection
        self.budget.release(key)
        for callback in self.on_unloaded:
            callback(key)
        with self._lock:  # UNAVAILABLE once its memory is returned
            record.unloaded(drained, reason)
        logger.info("unloaded %s (%s)", key, reason)
        drained.set()

    # ---- routing -------------------------------------------------------------------------

    def acquire(self, requested: str | None, sequences: int = 1) -> tuple[AnyDeployment, str]:
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
                                                                               key=lambda kv: version_key(kv[0])))
                what = f"version {version} of model `{entry.name}`" if version else f"model `{entry.name}`"
                raise ModelUnavailableError(f"{what} is not being served (versions: {states or 'none'})")
            record.deployment.in_flight += 1
            record.deployment.sequences += sequences
            return record.deployment, requested or entry.name

    def release(self, deployment: AnyDeployment, sequences: int = 1) -> None:
        with self._lock:
            deployment.in_flight -= 1
            deployment.sequences -= sequences

    # ---- observation ---------------------------------------------------------------------

    def deployments(self) -> list[AnyDeployment]:
        """Every loaded deployment (serving or draining)."""
        with self._lock:
            return [r.deployment for e in self.models.values() for r in e.versions.values()
                    if r.deployment is not None]

    def serving(self) -> list[AnyDeployment]:
        with self._lock:
            return [e.versions[e.serving].deployment for e in self.models.values()  # type: ignore[misc]
                    if e.serving is not None and e.versions[e.serving].deployment is not None]

    def in_flight(self) -> int:
        return sum(d.in_flight + d.unfinished() for d in self.deployments())

    def index(self) -> list[dict[str, Any]]:
        """Every model version with its state, as Triton's repository index lists them."""
        rows = []
        with self._lock:
            for name in sorted(self.models):
                entry = self.models[name]
                for version in sorted(entry.versions, key=version_key):
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
