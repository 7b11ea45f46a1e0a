"""Model parallelism across processes on torch.distributed: the communicator (comm.py) and how a
model is split between tensor-parallel ranks (tensor_parallel.py)."""
