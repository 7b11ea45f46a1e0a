"""Weight quantization: int4 group-wise and int8 per-channel formats on PyTorch's packed CPU kernels."""
