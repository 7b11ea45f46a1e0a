"""surge's C++ CPU kernels (csrc/), built on first use with PyTorch's extension builder.

The kernels are compiled for the machine they run on (the vector ISA ATen reports for it)
and cached under ~/.cache/surge/native, so a process pays the build (~15 s on 2 cores) once
per machine and source version. Where no compiler is available, or with
SURGE_NATIVE_KERNELS=0, `native_ops()` returns None and callers keep their PyTorch path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = [_CSRC / name for name in (
    "paged_attention.cpp", "prefill_attention.cpp", "linear.cpp", "sampling.cpp", "decoder.cpp")]
_HEADERS = [_CSRC / "kernels.h"]
_lock = threading.Lock()
_state: dict[str, Any] = {}


def _isa_flags() -> list[str]:
    """Compiler flags for the vector ISA ATen's Vectorized should target on this CPU."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        flags = ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma", "-DCPU_CAPABILITY_AVX512"]
        flags = flags + ["-mavx512bf16", "-mf16c"] if has_avx512_bf16() else flags
        return flags + ["-mavx512vnni"] if has_avx512_vnni() else flags
    if capability == "AVX2":
        # F16C: ATen's AVX2 Vectorized<Half> converts with _cvtss_sh (every AVX2 CPU has it)
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"]
    return []


def _runs_avx512() -> bool:
    """ATen runs its AVX-512 code here, so the kernels are built for it (`_isa_flags`); a CPU
    that has AVX-512 runs lower code where ATEN_CPU_CAPABILITY says so (avx2, default)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def has_avx512_bf16() -> bool:
    """The CPU has AVX-512 BF16 (vdpbf16ps), which the linear kernels (csrc/linear.cpp) are built
    on, and the kernels are built for it."""
    return _runs_avx512() and torch.cpu._is_avx512_bf16_supported()


def has_avx512_vnni() -> bool:
    """The CPU has AVX-512 VNNI (vpdpbusd), which the few-row W8A8 kernel is built on, and the
    kernels are built for it."""
    return _runs_avx512() and torch.cpu._is_vnni_supported()


def w8a8_ops() -> Any | None:
    """torch.ops.surge_native where its W8A8 kernel runs (AVX-512 VNNI and BF16), else None
    (also with SURGE_NATIVE_LINEAR=0)."""
    return linear_ops() if has_avx512_vnni() else None


def linear_ops() -> Any | None:
    """torch.ops.surge_native where its bf16 / int4 linear kernels run on this CPU, else None
    (also with SURGE_NATIVE_LINEAR=0)."""
    if os.environ.get("SURGE_NATIVE_LINEAR", "1") == "0" or not has_avx512_bf16():
        return None
    return native_ops()


def sources_version() -> str:
    """A digest of the kernels' sources: compiled graphs that call the kernels are cached under
    it, since Inductor's cache key does not cover a custom op's schema."""
    digest = hashlib.sha256()
    for path in (*_SOURCES, *_HEADERS):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def cache_dir() -> Path:
    return Path(os.environ.get("SURGE_NATIVE_CACHE", Path.home() / ".cache" / "surge" / "native"))


def native_ops() -> Any | None:
    """torch.ops.surge_native once built and loaded; None where it cannot be (reason logged once)."""
    if "ops" in _state:
        return _state["ops"]
    with _lock:
        if "ops" in _state:
            return _state["ops"]
        ops = None
        if os.environ.get("SURGE_NATIVE_KERNELS", "1") == "0":
            logger.info("native kernels disabled by SURGE_NATIVE_KERNELS=0")
        elif not torch.backends.cpu.get_cpu_capability():
            logger.warning("native kernels unavailable: unknown CPU capability")
        else:
            try:
                ops = _build()
            except Exception as exc:  # no compiler, no ninja, a broken toolchain: keep the torch path
                lines = str(exc).strip().splitlines()
                logger.warning("native kernels unavailable, using the PyTorch path (%s)",
                               lines[-1] if lines else type(exc).__name__)
        _state["ops"] = ops
        return ops


def _ninja_on_path() -> None:
    """PyTorch's builder runs `ninja` from PATH: put the `ninja` package's binary there for
    processes started without their virtual environment's bin/ on PATH."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _build() -> Any:
    from torch.utils import cpp_extension

    _ninja_on_path()
    build_dir = cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="surge_native",
        sources=[str(p) for p in _SOURCES],
        # OpenMP: at::parallel_for is inlined into the kernel and runs on torch's own libgomp.
        # the sources' digest as a flag: a changed header changes the build's key too
        # no fused multiply-adds the source does not ask for: the decoder's elementwise rounding
        # must equal ATen's
        extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off", *_isa_flags(), f"-DSURGE_SOURCES_VERSION={sources_version()}"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    _register_fakes()
    return torch.ops.surge_native


def _register_fakes() -> None:
    """Shapes of the outputs, for tracing under torch.compile (the kernels run on real tensors only)."""

    def attention_fake(q, kv_cache, block_tables, seq_lens, scale, window):  # noqa: ANN001, ANN202
        return q.new_empty(q.shape)

    def step_fake(q, k, v, kv_cache, slot_mapping, block_tables, seq_lens, scale, window):  # noqa: ANN001, ANN202
        return q.new_empty(q.shape)

    def linear_bf16_fake(x, w, bias):  # noqa: ANN001, ANN202
        return x.new_empty((x.shape[0], w.shape[0] * w.shape[2] // 2))

    def linear_quant_fake(x, q, qh, s, kind, group_size, bias, planes, tile_min_rows):  # noqa: ANN001, ANN202
        return x.new_empty((x.shape[0], q.shape[0] * q.shape[2] // planes))

    def quant_rows_fake(ids, q, qh, s, kind, group_size, planes):  # noqa: ANN001, ANN202
        return q.new_empty((ids.shape[0], 2 * q.shape[1]), dtype=torch.float32)

    torch.library.register_fake("surge_native::linear_bf16", linear_bf16_fake)
    def quantize_u8_fake(x, inv):  # noqa: ANN001, ANN202
        return x.new_empty(x.shape, dtype=torch.uint8)

    def linear_w8a8_fake(codes, w, comp, corr, bias, out_bf16):  # noqa: ANN001, ANN202
        return codes.new_empty((codes.shape[0], comp.shape[0]), dtype=torch.bfloat16 if out_bf16 else torch.float32)

    def norm_fake(x, weight, bias, eps, mode):  # noqa: ANN001, ANN202
        return torch.empty_like(x)

    torch.library.register_fake("surge_native::norm", norm_fake)
    torch.library.register_fake("surge_native::linear_quant", linear_quant_fake)
    torch.library.register_fake("surge_native::quant_rows", quant_rows_fake)
    torch.library.register_fake("surge_native::quantize_u8", quantize_u8_fake)
    torch.library.register_fake("surge_native::linear_w8a8", linear_w8a8_fake)
    torch.library.register_fake("surge_native::paged_decode_attention", attention_fake)
    torch.library.register_fake("surge_native::paged_decode_step", step_fake)
