"""What the machine can do: bf16 support on this CPU or GPU, the default device, dtype
resolution; handing memory freed by a load back to the system."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import torch

from surge.config import normalize_dtype

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 GEMMs run natively instead of through float32 conversion."""
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str, checkpoint_dtype: str = "float32") -> str:
    """A concrete dtype name; an explicit one wins, "auto" follows the checkpoint and hardware.

    auto: a half-precision checkpoint keeps its dtype where the hardware runs it (fp16 only on
    GPUs; on CPU fp16 GEMMs are slow, so bf16 instead); a float32 or GGUF checkpoint runs in
    bf16 where the CPU has AVX512-BF16/AMX or the GPU supports bf16, else in float32.
    """
    name = normalize_dtype(dtype)
    if name != "auto":
        return name
    if device.startswith("cuda"):
        if checkpoint_dtype == "float16":
            return "float16"
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_fast_bf16() else "float32"


def release_free_memory() -> None:
    """Return the heap pages freed during a load to the system (glibc's malloc_trim): decoding
    and packing weights frees gigabytes in pieces glibc keeps mapped, which would otherwise stay
    in the process's resident memory for its whole life. A no-op where the C library has none."""
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if trim is not None:
        trim(0)
