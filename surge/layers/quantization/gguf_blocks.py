"""GGUF matrices kept in their blocks (K-quants Q4_K / Q5_K / Q6_K, and Q5_0 / Q5_1), and their
blocks decoded into integer codes and scales, exactly (ggml's own formulas, no float round
trip of the weights):

    Q4_K, Q5_K  per 256 values: fp16 d, dmin; per 32: 6-bit sc, m;  w = d sc c - dmin m   (c: 4 / 5 bits)
    Q6_K        per 256 values: fp16 d;       per 16: int8 sc;      w = d sc (c - 32)      (c: 6 bits)
    Q5_0        per 32: fp16 d;               w = d (c - 16)                               (c: 5 bits)
    Q5_1        per 32: fp16 d, m;            w = d c + m

surge.layers.native_linear lays the codes and scales out for the CPU kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch

T = gguf.GGMLQuantizationType
BLOCK_TYPES = {T.Q4_K: "q4_k", T.Q5_K: "q5_k", T.Q6_K: "q6_k", T.Q5_0: "q5", T.Q5_1: "q5"}


@dataclass
class GgufBlockWeight:
    """A GGUF matrix in its own blocks: raw uint8 [rows, bytes per row], type `qtype`, `cols` values a row."""

    raw: torch.Tensor
    qtype: int
    cols: int

    @property
    def rows(self) -> int:
        return int(self.raw.shape[0])

    @property
    def kind(self) -> str:
        return BLOCK_TYPES[T(self.qtype)]

    def dequantize(self) -> torch.Tensor:
        data = gguf.quants.dequantize(self.raw.numpy(), T(self.qtype))
        return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).reshape(self.rows, self.cols)

    def take_rows(self, rows: slice | torch.Tensor) -> "GgufBlockWeight":
        return GgufBlockWeight(self.raw[rows].contiguous(), self.qtype, self.cols)

    @property
    def block(self) -> int:
        """Values per block (32, or 256 for the K-quants): a row is cut only between blocks."""
        return int(gguf.GGML_QUANT_SIZES[T(self.qtype)][0])

    def take_cols(self, start: int, end: int) -> "GgufBlockWeight":
        """Input columns start..end of every row; both on block boundaries."""
        block, size = gguf.GGML_QUANT_SIZES[T(self.qtype)]
        assert start % block == 0 and end % block == 0, (start, end, block)
        return GgufBlockWeight(self.raw[:, start // block * size:end // block * size].contiguous(), self.qtype,
                               end - start)

    @staticmethod
    def cat(parts: list["GgufBlockWeight"]) -> "GgufBlockWeight":
        """Stack along output rows (fusing q/k/v or gate/up); the parts must share their type."""
        assert len({(p.qtype, p.cols) for p in parts}) == 1
        return GgufBlockWeight(torch.cat([p.raw for p in parts]), parts[0].qtype, parts[0].cols)


@dataclass
class BlockCodes:
    """Decoded blocks: codes uint8 [N, K] and the scales of `kind`:
    q4_k / q5_k: d, dmin fp16 [N, K/256], sc, m uint8 [N, K/32];  q6_k: d fp16 [N, K/256], sc int8 [N, K/16];
    q5: d, minimum fp16 [N, K/32] (w = d c + minimum)."""

    kind: str
    codes: torch.Tensor
    d: torch.Tensor
    sc: torch.Tensor | None = None
    dmin: torch.Tensor | None = None
    m: torch.Tensor | None = None
    minimum: torch.Tensor | None = None


def _half(b: np.ndarray) -> torch.Tensor:
    """The fp16 numbers stored in the last axis (pairs of bytes) of `b`."""
    return torch.from_numpy(np.ascontiguousarray(b).view(np.float16)[..., 0].copy())


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 bytes of a Q4_K / Q5_K block -> its eight 6-bit (sc, m) pairs (ggml's get_scale_min_k4)."""
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    m = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    return sc, m


def decode_blocks(weight: GgufBlockWeight) -> BlockCodes:
    qtype, n = T(weight.qtype), weight.rows
    raw = weight.raw.numpy()
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    b = raw.reshape(n, weight.cols // block, size)
    if qtype in (T.Q4_K, T.Q5_K):
        sc, m = _k_scales(b[..., 4:16])
        if qtype == T.Q4_K:  # four chunks of 64: low nibbles the first 32 values, high the next 32
            qs = b[..., 16:144].reshape(n, -1, 4, 1, 32)
            codes = np.concatenate([qs & 0xF, qs >> 4], axis=3)
        else:  # bit 2i + h of qh[l] is the fifth bit of value 64 i + 32 h + l
            qh = b[..., 16:48].reshape(n, -1, 1, 1, 32)
            qs = b[..., 48:176].reshape(n, -1, 4, 1, 32)
            shifts = np.arange(8, dtype=np.uint8).reshape(4, 2, 1)
            codes = np.concatenate([qs & 0xF, qs >> 4], axis=3) | (((qh >> shifts) & 1) << 4)
        return BlockCodes("q4_k" if qtype == T.Q4_K else "q5_k", torch.from_numpy(codes.reshape(n, -1)),
                          _half(b[..., 0:2]), torch.from_numpy(sc.reshape(n, -1)), _half(b[..., 2:4]),
                          torch.from_numpy(m.reshape(n, -1)))
    if qtype == T.Q6_K:  # two halves of 128: ql 64 bytes, qh 32 bytes each
        ql = b[..., 0:128].reshape(n, -1, 2, 2, 32)
        qh = b[..., 128:192].reshape(n, -1, 2, 1, 32)
        low = np.concatenate([ql & 0xF, ql >> 4], axis=3)  # [.., half, 4 (value // 32 of the half), 32]
        high = (qh >> (2 * np.arange(4, dtype=np.uint8)).reshape(4, 1)) & 3
        codes = low | (high << 4)
        sc = b[..., 192:208].copy().view(np.int8)
        return BlockCodes("q6_k", torch.from_numpy(codes.reshape(n, -1)), _half(b[..., 208:210]),
                          torch.from_numpy(sc.reshape(n, -1)))
    if qtype in (T.Q5_0, T.Q5_1):  # bit j of the 32-bit qh is the fifth bit of value j
        first = 2 if qtype == T.Q5_0 else 4
        qh = b[..., first:first + 4].copy().view("<u4")
        qs = b[..., first + 4:first + 20]
        bits = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
        codes = np.concatenate([qs & 0xF, qs >> 4], axis=-1) | (bits << 4)
        d = _half(b[..., 0:2])
        minimum = -16 * d if qtype == T.Q5_0 else _half(b[..., 2:4])  # exact in fp16: a power of two
        return BlockCodes("q5", torch.from_numpy(codes.reshape(n, -1)), d, minimum=minimum)
    raise ValueError(f"{qtype.name} is not kept in blocks")


def dequantize_codes(c: BlockCodes) -> torch.Tensor:
    """float32 [N, K] from decoded blocks (the reference the kernels and tests use)."""
    codes = c.codes.float()
    if c.kind == "q5":
        assert c.minimum is not None
        return codes * c.d.float().repeat_interleave(32, 1) + c.minimum.float().repeat_interleave(32, 1)
    assert c.sc is not None
    d = c.d.float().repeat_interleave(256, 1)
    if c.kind == "q6_k":
        return d * c.sc.float().repeat_interleave(16, 1) * (codes - 32)
    assert c.dmin is not None and c.m is not None
    return d * c.sc.float().repeat_interleave(32, 1) * codes - c.dmin.float().repeat_interleave(256, 1) * \
        c.m.float().repeat_interleave(32, 1)
