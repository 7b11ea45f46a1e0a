"""A model's versions and the state machine each one goes through.

    UNAVAILABLE --load--> LOADING --> READY --retire--> UNLOADING --drained--> UNAVAILABLE
                              \\--> FAILED --load--> LOADING

READY -> READY is a version switched in again (load of the serving version, rollback to a
version still loaded); UNLOADING -> LOADING a reload that stopped waiting for a drain past
--drain-timeout. Each model has at most one serving version; a newer one is switched in
only once it is READY, so a failed load never disturbs the version being served. The
repository (repository.py) makes every transition under its lock.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from enum import Enum

from surge.errors import SurgeError
from surge.server.repository.deployments import AnyDeployment


class State(str, Enum):
    UNAVAILABLE = "UNAVAILABLE"
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    FAILED = "FAILED"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.UNAVAILABLE: frozenset({State.LOADING}),
    State.LOADING: frozenset({State.READY, State.FAILED}),
    State.READY: frozenset({State.READY, State.UNLOADING}),
    State.UNLOADING: frozenset({State.UNAVAILABLE, State.LOADING}),
    State.FAILED: frozenset({State.LOADING}),
}


class ModelUnavailableError(SurgeError):
    """The named model or version is not in the repository, or not READY."""


class ModelRequiredError(SurgeError):
    """A request without `model` on a server with several models."""


class RepositoryConflictError(SurgeError):
    """The operation cannot run now: another one is in progress, or there is nothing to roll back to."""


@dataclass(eq=False)
class VersionRecord:
    version: str
    path: str | None  # None: the embedded default model
    state: State = State.UNAVAILABLE
    reason: str | None = "not loaded"
    deployment: AnyDeployment | None = None
    signature: tuple | None = None  # the directory's files as last scanned
    stable: bool = False  # unchanged between the last two scans (a copy into place has finished)
    tried: tuple | None = None  # the signature at the last load attempt; polling retries only new files
    loaded_at: float | None = None
    draining: threading.Event | None = None  # set once a retired deployment of this version is gone

    def _move(self, to: State, reason: str | None) -> None:
        if to not in TRANSITIONS[self.state]:
            raise RuntimeError(f"version {self.version}: no transition {self.state.value} -> {to.value}")
        self.state, self.reason = to, reason

    def loading(self) -> None:
        self._move(State.LOADING, None)
        self.tried = self.signature

    def failed(self, error: str) -> None:
        self._move(State.FAILED, error)

    def ready(self, deployment: AnyDeployment) -> None:
        self._move(State.READY, None)
        self.deployment = deployment
        self.loaded_at = self.loaded_at or time.time()
        self.draining = None  # an older deployment still draining (past --drain-timeout) no longer decides the state

    def unloading(self, reason: str) -> AnyDeployment:
        """Stop routing here; returns the deployment to drain."""
        deployment = self.deployment
        assert deployment is not None
        self._move(State.UNLOADING, reason)
        self.loaded_at = None
        self.draining = deployment.drained
        return deployment

    def detach(self, deployment: AnyDeployment) -> None:
        """`deployment` is closed: the record lets go of it (so its tensors can be freed)."""
        if self.deployment is deployment:
            self.deployment = None

    def unloaded(self, drained: threading.Event, reason: str) -> None:
        """The drained deployment's memory is returned: UNAVAILABLE, unless a reload took over."""
        if self.draining is drained:
            self._move(State.UNAVAILABLE, f"unloaded: {reason}")
            self.draining = None

    @property
    def serves(self) -> bool:
        return self.state is State.READY and self.deployment is not None


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

    def switch(self, record: VersionRecord, deployment: AnyDeployment, remember: bool) -> VersionRecord | None:
        """Make `record` (with `deployment`) the serving version; returns the previous serving
        record if it must now be retired."""
        record.ready(deployment)
        previous, self.serving = self.serving, record.version
        if previous is None or previous == record.version:
            return None
        if remember:
            self.history.append(previous)
        old = self.versions.get(previous)
        return old if old is not None and old.state is State.READY else None
