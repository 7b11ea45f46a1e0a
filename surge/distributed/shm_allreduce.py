"""All-reduce for the ranks of one host through shared memory: each rank writes its tensor (as
float32) into its slot of a segment they all map, tells every peer over a Unix socket, waits for
every peer's word, and sums the slots in rank order, so every rank gets the same bits.

    segment  [2 buffers][ranks][max_elements] float32   (the buffers alternate between calls)

A rank cannot start call k+2 (which reuses call k's buffer) before every peer has finished
writing call k+1, which each does only after reading call k: two buffers are enough. The waits
block in the kernel (recv on a socket): no rank spins, which on a box with fewer cores than ranks
would take the core from the rank it waits for. A peer that dies closes its sockets (the wait
ends with an error at once); every wait is bounded by the group's timeout.

The segment is unlinked as soon as every rank has mapped it, so nothing is left in /dev/shm
whatever way the processes end. gloo's all-reduce costs ~1 ms a call on the test box whatever the
size (docs/performance.md); this one a few tens of microseconds for a decode step's rows; larger
tensors (a prefill chunk's) go to gloo, whose cost there is the bandwidth.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
import uuid

import torch
import torch.distributed as dist

MAX_BYTES = 1 << 20  # per rank and buffer: tensors up to 256k float32 values take this path
SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"


class SharedMemoryAllReduce:
    def __init__(self, store: dist.Store, rank: int, size: int, timeout_s: float, max_bytes: int = MAX_BYTES):
        self.rank, self.size = rank, size
        self.max_elements = max_bytes // 4
        nbytes = 2 * size * self.max_elements * 4
        if rank == 0:
            path = os.path.join(SHM_DIR, f"surge-allreduce-{uuid.uuid4().hex[:16]}")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(fd, nbytes)
            store.set("shm", path)
        else:
            path = store.get("shm").decode()
            fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        self.buffers = torch.frombuffer(self._map, dtype=torch.float32).view(2, size, self.max_elements)
        self._turn = 0
        # a socket to every peer: rank r listens, lower ranks connect and say who they are
        address = f"\0surge-ar-{uuid.uuid4().hex}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(address)
        listener.listen(size)
        store.set(f"addr{rank}", address.encode("latin-1"))
        self.peers: dict[int, socket.socket] = {}
        for peer in range(rank + 1, size):
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(store.get(f"addr{peer}").decode("latin-1"))
            conn.sendall(struct.pack("<i", rank))
            self.peers[peer] = conn
        listener.settimeout(timeout_s)
        for _ in range(rank):
            conn, _ = listener.accept()
            (peer,) = struct.unpack("<i", _recv_exact(conn, 4))
            self.peers[peer] = conn
        listener.close()
        for conn in self.peers.values():
            conn.settimeout(timeout_s)
        store.set(f"mapped{rank}", b"1")
        if rank == 0:  # every rank has mapped it: the name can go, the mappings stay
            store.wait([f"mapped{r}" for r in range(size)])
            os.unlink(path)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The elementwise sum over ranks in float32 (None when the tensor is too large: the
        caller reduces it another way)."""
        n = tensor.numel()
        if n > self.max_elements:
            return None
        buffer = self.buffers[self._turn]
        self._turn ^= 1
        buffer[self.rank, :n].copy_(tensor.reshape(-1))
        peer = -1
        try:
            for peer, conn in self.peers.items():
                conn.sendall(b"\1")
            for peer, conn in self.peers.items():
                if not conn.recv(1):
                    raise ConnectionResetError
        except TimeoutError as exc:
            raise RuntimeError(f"all-reduce: rank {peer} did not take part in time") from exc
        except OSError as exc:  # its socket closed: the process is gone
            raise RuntimeError(f"all-reduce: rank {peer} left the group") from exc
        return buffer[:, :n].sum(0).view(tensor.shape)

    def close(self) -> None:
        for conn in self.peers.values():
            conn.close()
        self.peers = {}
        self.buffers = None  # type: ignore[assignment]
        try:
            self._map.close()
        except BufferError:  # a view of it still alive somewhere: the mapping goes with the process
            pass


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise RuntimeError("all-reduce: a peer left while the group was being made")
        data += chunk
    return data
