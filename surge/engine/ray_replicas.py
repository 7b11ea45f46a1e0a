"""Data-parallel replicas as Ray actors (`surge serve --distributed-executor-backend ray`).

Ray places and runs the replicas; the front talks to each over the same protocol as to a local
replica process (`engine/replica.py`), on a TCP connection the actor listens for:

    front (Ray driver)                              actor on some node
    RayPlacement: ray.init(address), one placement group of max-replicas bundles of
                  {"CPU": threads} (SPREAD: replicas on different nodes where they fit)
    RayLink:      actor = _ReplicaActor.options(bundle i).remote()
                  actor.listen(authkey)          ->   a Listener on its node's address
                  Client(address, authkey)       ->   actor.run(): accept, serve(conn, node id)

The connection is authenticated with a key made per link (multiprocessing's HMAC challenge), so
nothing else on the network can speak to a replica. A replica that dies (its node removed, its
process killed) closes the connection like a local one, and the front starts a new actor in the
same bundle (Ray moves a lost node's bundles to nodes that can hold them).

The process has one Ray connection, shared by every engine on Ray in it and ended by the last
to close; ray.init runs on a thread that lives as long as the connection (`_RayOwner`), since a
local cluster's processes (no --ray-address) die with the thread that started them.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing.connection as mpc
import os
import secrets
import socket
import threading
from typing import Any

from surge.config import ParallelConfig
from surge.engine.replica_links import ReplicaLink, surge_root
from surge.errors import InvalidArgumentError

logger = logging.getLogger(__name__)

__all__ = ["RayLink", "RayPlacement"]

CONNECT_TIMEOUT_S = 60.0  # ray.init against --ray-address
PLACEMENT_TIMEOUT_S = 60.0  # the replicas' resources reserved on the cluster
ACTOR_TIMEOUT_S = 120.0  # an actor scheduled and listening
RESTART_TIMEOUT_S = 30.0  # a restarted replica's actor (its bundle may be on a lost node)


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise InvalidArgumentError('--distributed-executor-backend ray needs Ray: pip install "surge[ray]"') from exc
    return ray


class _ReplicaActor:
    """One replica's process on a Ray node (made a Ray actor class by RayPlacement)."""

    def listen(self, authkey: bytes, level: int) -> tuple[Any, str]:
        import ray

        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s [replica %(process)d]: "
                                                "%(message)s")
        self._listener = mpc.Listener((ray.util.get_node_ip_address(), 0), authkey=authkey)
        self._where = ray.get_runtime_context().get_node_id()
        return self._listener.address, self._where

    def run(self) -> int:
        from surge.engine.replica import serve

        conn = self._listener.accept()
        self._listener.close()
        return serve(conn, self._where)


def _check_reachable(address: str) -> None:
    """A HOST:PORT that nothing answers on is refused at once (ray.init would wait for it for minutes)."""
    if address == "auto":
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5.0).close()
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(f"--ray-address {address}: no Ray cluster answers there ({exc}); give auto or "
                                   f"the HOST:PORT that `ray start --head` printed") from exc


class _RayOwner:
    """ray.init and ray.shutdown on one thread that lives as long as the connection: a local
    cluster's processes are started with Linux's parent-death signal, which fires when the
    *thread* that started them ends, so they must not be started from a passing thread."""

    def __init__(self, ray: Any, address: str, kwargs: dict[str, Any], timeout: float):
        self.ray = ray
        self.address = address
        self.users = 1  # the placements sharing this process's one Ray connection
        self._outcome: list[BaseException | None] = []
        self._started = threading.Event()
        self._release = threading.Event()
        self._thread = threading.Thread(target=self._own, args=(address, kwargs), name="surge-ray", daemon=True)
        self._thread.start()
        where = "a new local Ray cluster" if address == "local" else f"the Ray cluster at {address}"
        if not self._started.wait(timeout):
            raise InvalidArgumentError(f"cannot join {where}: not connected within {timeout:.0f}s")
        exc = self._outcome[0]
        if exc is not None:
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise InvalidArgumentError(f"cannot join {where}: {type(exc).__name__}: {first}") from exc

    def _own(self, address: str, kwargs: dict[str, Any]) -> None:
        try:
            self.ray.init(address=address, **kwargs)
            self._outcome.append(None)
        except BaseException as exc:  # Ray's own errors: ConnectionError, RuntimeError, ValueError ...
            self._outcome.append(exc)
            return
        finally:
            self._started.set()
        self._release.wait()
        self.ray.shutdown()

    def close(self, timeout: float = 30.0) -> None:
        self._release.set()
        self._thread.join(timeout)


# A process has one Ray connection: every engine on Ray in it (the models of a repository, the
# old and new version during a reload) shares it; the last one to close ends it.
_owner_lock = threading.Lock()
_owner: _RayOwner | None = None
_groups = itertools.count()


def _join(ray: Any, address: str, kwargs: dict[str, Any]) -> _RayOwner:
    global _owner
    with _owner_lock:
        if _owner is not None:
            if _owner.address != address:
                where = "a local Ray cluster" if _owner.address == "local" else f"the Ray cluster at {_owner.address}"
                raise InvalidArgumentError(f"this server is joined to {where} already; one server joins one "
                                           f"cluster (asked: {address})")
            _owner.users += 1
            return _owner
        _owner = _RayOwner(ray, address, kwargs, CONNECT_TIMEOUT_S)
        return _owner


def _leave(owner: _RayOwner) -> None:
    global _owner
    with _owner_lock:
        owner.users -= 1
        if owner.users > 0:
            return
        if _owner is owner:
            _owner = None
    owner.close()


class RayPlacement:
    """This server's hold on a Ray cluster: joined (`address`) or started here, and one placement
    group with a bundle per replica it may run."""

    def __init__(self, parallel: ParallelConfig, bundles: int, cpus: int):
        ray = import_ray()
        self.ray = ray
        address = parallel.ray_address
        kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=True, namespace="surge",
                                      logging_level=logging.WARNING,
                                      runtime_env={"env_vars": {"PYTHONPATH": surge_root()}})
        if address is None:
            kwargs["num_cpus"] = max(os.cpu_count() or 1, bundles * cpus)  # a local cluster: this machine
        else:
            _check_reachable(address)
        self._owner = _join(ray, address or "local", kwargs)
        from ray.util.placement_group import placement_group, remove_placement_group

        self._remove = remove_placement_group
        self.bundle = {"CPU": float(cpus)}
        total = ray.cluster_resources().get("CPU", 0.0)
        if bundles * cpus > total:
            _leave(self._owner)
            raise InvalidArgumentError(
                f"cannot place {bundles} replicas of {cpus} CPU each (--threads) on the Ray cluster: it has "
                f"{total:g} CPUs in all; lower --data-parallel-size / --max-replicas or --threads, or add nodes")
        self.group = placement_group([dict(self.bundle) for _ in range(bundles)], strategy="SPREAD",
                                     name=f"surge-replicas-{os.getpid()}-{next(_groups)}")
        try:
            ray.get(self.group.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except Exception as exc:
            self.close()
            raise InvalidArgumentError(
                f"cannot place {bundles} replicas of {cpus} CPU each on the Ray cluster ({total:g} CPUs in all) "
                f"within {PLACEMENT_TIMEOUT_S:.0f}s (other work holds them): {type(exc).__name__}") from exc
        self.actor_class = ray.remote(_ReplicaActor)

    def close(self) -> None:
        if self.ray.is_initialized():
            try:
                self._remove(self.group)
            except Exception:  # the cluster is already gone
                pass
        _leave(self._owner)


class RayLink(ReplicaLink):
    """A replica in a Ray actor placed in its bundle of the placement group. A `restart`ed one
    waits less for its bundle: on a lost node the bundle is placed again only once Ray has
    declared the node dead (its health checks, ~15 s) and only where it fits; the front tries
    again."""

    def __init__(self, index: int, placement: RayPlacement, restart: bool = False) -> None:
        super().__init__(index)
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        ray = placement.ray
        self.ray = ray
        strategy = PlacementGroupSchedulingStrategy(placement.group, placement_group_bundle_index=index)
        self.actor = placement.actor_class.options(num_cpus=placement.bundle["CPU"], max_restarts=0,
                                                   max_concurrency=1, scheduling_strategy=strategy).remote()
        self.where = ""
        self.done: Any = None  # run()'s result: the replica's exit code, or the actor's death
        self._authkey = secrets.token_bytes(32)
        self._timeout = RESTART_TIMEOUT_S if restart else ACTOR_TIMEOUT_S
        # scheduled now, connected in start(): replicas started together are placed side by side
        self._listening = self.actor.listen.remote(self._authkey, logging.getLogger().getEffectiveLevel())

    def start(self, config: Any, warmup: bool) -> Any:
        ray = self.ray
        try:
            address, self.where = ray.get(self._listening, timeout=self._timeout)
            self.done = self.actor.run.remote()  # accepts (and authenticates) the connection made next
            self.conn = mpc.Client(address, authkey=self._authkey)
        except Exception as exc:
            self.kill()
            raise InvalidArgumentError(f"replica {self.index}: its Ray actor did not start within "
                                       f"{self._timeout:.0f}s ({type(exc).__name__}: {exc})") from exc
        return super().start(config, warmup)

    def describe(self) -> str:
        return f"Ray actor on node {self.where[:12]}"

    def kill(self) -> None:
        try:
            self.ray.kill(self.actor, no_restart=True)
        except Exception:  # already gone
            pass

    def exit_code(self, wait: float) -> int | None:
        if self.done is None:
            return None
        ready, _ = self.ray.wait([self.done], timeout=max(0.0, wait))
        if not ready:
            return None
        try:
            return int(self.ray.get(ready[0]))
        except Exception:  # the actor died
            return -1

    def _stop(self, timeout: float) -> None:
        if self.exit_code(timeout) is None:
            self.kill()


