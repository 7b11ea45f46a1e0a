"""The communicator's collectives at world sizes 2 and 3 (gloo, one host): each equals its
definition exactly. Integer-valued tensors, so a float sum is exact in any order."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback

import pytest
import torch

from surge.distributed.comm import Communicator, Rendezvous, free_port
from surge.distributed.shm_allreduce import SHM_DIR


def _tensor(rank: int, dtype: torch.dtype, shape: tuple[int, ...] = (5, 7)) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + rank)
    return torch.randint(-64, 64, shape, generator=g).to(dtype)


def _check(rank: int, rendezvous: Rendezvous, results: "mp.Queue") -> None:
    try:
        torch.set_num_threads(1)
        comm = Communicator.world(rendezvous, rank)
        world = rendezvous.world_size
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64):
            mine = _tensor(rank, dtype)
            expected = sum(_tensor(r, torch.float64) for r in range(world)).to(dtype)
            reduced = comm.all_reduce(mine.clone())
            assert reduced.dtype == dtype and torch.equal(reduced, expected), f"all_reduce {dtype}"
            gathered = comm.gather(mine, dst=world - 1)
            if rank == world - 1:
                assert gathered is not None and len(gathered) == world
                assert all(torch.equal(g, _tensor(r, dtype)) for r, g in enumerate(gathered)), f"gather {dtype}"
            else:
                assert gathered is None
            everyone = comm.all_gather(mine)
            assert all(torch.equal(g, _tensor(r, dtype)) for r, g in enumerate(everyone)), f"all_gather {dtype}"
            # a ring: each rank sends to the next and receives from the previous
            nxt, prev = (rank + 1) % world, (rank - 1) % world
            if rank % 2 == 0:
                comm.send(mine, nxt)
                got = comm.recv(mine, prev)
            else:
                got = comm.recv(mine, prev)
                comm.send(mine, nxt)
            assert got.dtype == dtype and torch.equal(got, _tensor(prev, dtype)), f"send/recv {dtype}"
        # past the shared-memory path's size: the backend's all-reduce, the same sums
        big = _tensor(rank, torch.float32, (600, 512))
        assert torch.equal(comm.all_reduce(big.clone()), sum(_tensor(r, torch.float32, (600, 512)) for r in range(world)))
        # a non-contiguous view reduces like its contiguous copy
        view = _tensor(rank, torch.float32, (7, 5)).t()
        assert torch.equal(comm.all_reduce(view), sum(_tensor(r, torch.float32, (7, 5)) for r in range(world)).t())
        comm.barrier()
        comm.close()
        results.put((rank, None))
    except BaseException:  # noqa: BLE001 (reported to the test)
        results.put((rank, traceback.format_exc()))


@pytest.mark.parametrize("shm", ["1", "0"], ids=["shared-memory", "gloo-only"])
@pytest.mark.parametrize("world", [2, 3])
def test_collectives_equal_their_definitions(world: int, shm: str, monkeypatch) -> None:
    monkeypatch.setenv("SURGE_SHM_ALLREDUCE", shm)
    ctx = mp.get_context("spawn")
    rendezvous = Rendezvous(free_port(), world, timeout_s=30)
    results = ctx.Queue()
    procs = [ctx.Process(target=_check, args=(rank, rendezvous, results)) for rank in range(world)]
    for p in procs:
        p.start()
    try:
        reports = dict(results.get(timeout=120) for _ in range(world))
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    failures = {rank: tb for rank, tb in reports.items() if tb}
    assert not failures, "\n".join(f"rank {r}:\n{tb}" for r, tb in failures.items())
    assert all(p.exitcode == 0 for p in procs)
    assert not [f for f in os.listdir(SHM_DIR) if f.startswith("surge-allreduce-")], "a segment was left behind"


def test_a_peer_that_dies_fails_the_shared_memory_all_reduce_at_once() -> None:
    ctx = mp.get_context("spawn")
    rendezvous = Rendezvous(free_port(), 2, timeout_s=30)
    peer = ctx.Process(target=_join_and_exit, args=(rendezvous,))
    peer.start()
    comm = Communicator.world(rendezvous, 0)
    peer.join(30)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 left the group"):
        comm.all_reduce(torch.ones(4))
    assert time.monotonic() - start < 5
    comm.close()


def _join_and_exit(rendezvous: Rendezvous) -> None:
    Communicator.world(rendezvous, 1)
    os._exit(0)


def test_world_of_one_is_the_identity() -> None:
    comm = Communicator.world(Rendezvous(free_port(), 1), 0)
    x = torch.arange(6.0)
    assert comm.all_reduce(x) is x and comm.gather(x)[0] is x and comm.all_gather(x)[0] is x
    comm.close()
    comm.close()
