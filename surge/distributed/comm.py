"""The communicator of one tensor-parallel group: torch.distributed's process group (gloo on CPU,
NCCL on CUDA) made from a TCP rendezvous on this host, with the few collectives the model needs.

The group is its own object, not torch.distributed's process-wide default group, so one process
can hold several engines' groups (a repository's models, a model and its reload) and close each
one alone. Every collective waits at most `timeout`; a peer that died fails it sooner (its
connection closes). gloo has no bf16/fp16 reductions: those tensors are reduced in float32 (the
sum of two bf16 values rounded once, as a single-process matmul would). On CPU, all-reduces of up
to 256k values go through shared memory (shm_allreduce.py: ~1 ms a call with gloo on the test
box, tens of microseconds this way; SURGE_SHM_ALLREDUCE=0 turns it off).
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

RENDEZVOUS_HOST = "127.0.0.1"


def free_port(host: str = RENDEZVOUS_HOST) -> int:
    """A TCP port nothing listens on now (the rendezvous's)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks of one group meet: rank 0 hosts the store on `port`."""

    port: int
    world_size: int
    timeout_s: float = 60.0
    host: str = RENDEZVOUS_HOST


def connect(rendezvous: Rendezvous, rank: int) -> dist.TCPStore:
    """The rendezvous's store (rank 0 hosts it); groups of some of the ranks meet under prefixes of it."""
    return dist.TCPStore(rendezvous.host, rendezvous.port, rendezvous.world_size, rank == 0,
                         timeout=datetime.timedelta(seconds=rendezvous.timeout_s), wait_for_workers=False)


class ParallelGroups:
    """A rank's groups in a grid of `pipeline` stages of `tensor` ranks each (rank = stage *
    tensor + t): `tensor` the ranks of its stage (all-reduce, gather), `pipeline` the ranks of its
    column, one a stage (send / recv between stages); None where the size is 1."""

    def __init__(self, rendezvous: Rendezvous, rank: int, tensor: int, pipeline: int, device: str = "cpu"):
        assert tensor * pipeline == rendezvous.world_size
        self.store = connect(rendezvous, rank)
        self.stage, self.tensor_rank = divmod(rank, tensor)
        self.tensor = (Communicator(self.store, f"tp{self.stage}", self.tensor_rank, tensor, rendezvous, device)
                       if tensor > 1 else None)
        self.pipeline = (Communicator(self.store, f"pp{self.tensor_rank}", self.stage, pipeline, rendezvous, device,
                                      reduces=False) if pipeline > 1 else None)

    def close(self) -> None:
        for comm in (self.tensor, self.pipeline):
            if comm is not None:
                comm.close()
        self.store = None  # type: ignore[assignment]


class Communicator:
    """rank / world_size, and all_reduce, gather, all_gather, send, recv, barrier on tensors.

    Results equal their definitions: all_reduce leaves the elementwise sum on every rank,
    gather the ranks' tensors in rank order on `dst`, recv what the peer sent."""

    def __init__(self, store: dist.Store, name: str, rank: int, size: int, rendezvous: Rendezvous,
                 device: str = "cpu", reduces: bool = True):
        """Rank `rank` of the `size` members of group `name`, met through `store`; `reduces`:
        it will all-reduce (a group that only sends and receives needs no shared segment)."""
        self.rank, self.world_size = rank, size
        self.device = device
        self._store = dist.PrefixStore(f"{name}/", store)
        timeout = datetime.timedelta(seconds=rendezvous.timeout_s)
        if device.startswith("cuda"):
            self._reduce_dtypes = None  # NCCL reduces every float dtype itself
            self.group = dist.ProcessGroupNCCL(self._store, rank, size)
        else:
            self._reduce_dtypes = (torch.float32, torch.float64, torch.int32, torch.int64, torch.uint8, torch.int8)
            options = dist.ProcessGroupGloo._Options()
            options._timeout = timeout
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=rendezvous.host)]
            self.group = dist.ProcessGroupGloo(self._store, rank, size, options)
        # small all-reduces (a decode step's rows) through shared memory: the ranks share this host
        self._shm = None
        if reduces and size > 1 and not device.startswith("cuda") and os.environ.get("SURGE_SHM_ALLREDUCE", "1") != "0":
            from surge.distributed.shm_allreduce import SharedMemoryAllReduce

            self._shm = SharedMemoryAllReduce(dist.PrefixStore("shm/", self._store), rank, size,
                                              rendezvous.timeout_s)
        self.closed = False

    @classmethod
    def world(cls, rendezvous: Rendezvous, rank: int, device: str = "cpu") -> "Communicator":
        """Rank `rank` of one group of every rank of the rendezvous."""
        return cls(connect(rendezvous, rank), "world", rank, rendezvous.world_size, rendezvous, device)

    def _wire(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor as the backend can reduce it: contiguous, float32 for gloo's missing dtypes."""
        if self._reduce_dtypes is not None and tensor.dtype not in self._reduce_dtypes:
            return tensor.float()
        return tensor if tensor.is_contiguous() else tensor.contiguous()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over ranks (every rank gets it). Returns a tensor of `tensor`'s
        dtype: `tensor` itself where it was reduced in place."""
        if self.world_size == 1:
            return tensor
        if self._shm is not None:
            summed = self._shm(tensor)
            if summed is not None:
                return summed.to(tensor.dtype)
        wire = self._wire(tensor)
        self.group.allreduce([wire]).wait()
        if wire is tensor:
            return tensor
        return wire.to(tensor.dtype)

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's tensor (all of one shape), in rank order, on every rank."""
        if self.world_size == 1:
            return [tensor]
        wire = self._wire(tensor)
        out = [torch.empty_like(wire) for _ in range(self.world_size)]
        self.group.allgather([out], [wire]).wait()
        return [t.to(tensor.dtype) for t in out]

    def gather(self, tensor: torch.Tensor, dst: int = 0) -> list[torch.Tensor] | None:
        """Every rank's tensor (all of one shape), in rank order, on `dst`; None elsewhere."""
        if self.world_size == 1:
            return [tensor]
        wire = self._wire(tensor)
        opts = dist.GatherOptions()
        opts.rootRank = dst
        if self.rank == dst:
            out = [torch.empty_like(wire) for _ in range(self.world_size)]
            self.group.gather([out], [wire], opts).wait()
            return [t.to(tensor.dtype) for t in out]
        self.group.gather([], [wire], opts).wait()
        return None

    def send(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> None:
        self.group.send([self._wire(tensor)], dst, tag).wait()

    def isend(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> Callable[[], None]:
        """Start sending; the returned call waits until the tensor has gone (keep it until then)."""
        wire = self._wire(tensor)
        work = self.group.send([wire], dst, tag)
        return lambda: (work.wait(), wire)[0]

    def recv(self, like: torch.Tensor, src: int, tag: int = 0) -> torch.Tensor:
        """A tensor of `like`'s shape and dtype, as `src` sent it."""
        wire = self._wire(torch.empty_like(like))
        self.group.recv([wire], src, tag).wait()
        return wire.to(like.dtype)

    def barrier(self) -> None:
        if self.world_size > 1:
            self.group.barrier().wait()

    def close(self) -> None:
        """Leave the group (idempotent); peers' pending collectives with this rank fail."""
        if self.closed:
            return
        self.closed = True
        if self._shm is not None:
            self._shm.close()
        try:
            self.group.shutdown()
        except Exception:  # noqa: BLE001 (a group whose peers are gone may refuse an orderly shutdown)
            pass
        self.group = None  # type: ignore[assignment]
        self._store = None  # type: ignore[assignment]
