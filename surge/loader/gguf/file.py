"""A GGUF file's header, metadata and tensor table, parsed in one pass over a memory map.

gguf-py's GGUFReader builds a numpy view for every part of every field: on a 151k-token
vocabulary (tokens, scores, types, merges) that is millions of small arrays and 26 s per open.
Here strings are decoded straight from the map and numeric arrays come from one `frombuffer`
each, so opening any GGUF takes well under a second. Tensor data stay views of the map, in the
layout gguf-py gives them (its type table and quantized byte shapes are used as they are),
so `gguf.quants` decodes them unchanged.

Format (little-endian): magic "GGUF", uint32 version (2 or 3), uint64 tensor count, uint64
metadata count; metadata as (string key, uint32 type, value); tensor infos as (string name,
uint32 n_dims, uint64 dims fastest-first, uint32 type, uint64 offset); data aligned to
`general.alignment` (32 by default).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape

MAGIC = b"GGUF"
_SCALARS = {  # metadata value type -> struct format
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
_PLAIN = {  # tensor types stored as plain numbers (else: bytes of blocks)
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


class GgufError(ValueError):
    """The bytes are not a well-formed GGUF file."""


@dataclass(frozen=True)
class GgufTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray  # dims fastest-first, as the file lists them
    n_elements: int
    n_bytes: int
    data_offset: int
    data: np.ndarray  # read-only view of the map: numbers, or (rows, bytes per row) of blocks


class GgufFile:
    """`metadata` (key -> str, int, float, bool or list) and `tensors`, in file order."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise GgufError(f"{size} bytes is too short for a GGUF header")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.size = size
        self.metadata: dict[str, Any] = {}
        self.tensors: list[GgufTensor] = []
        self._parse()

    # -- primitives ---------------------------------------------------------------------------
    def _unpack(self, fmt: str, offset: int) -> tuple[Any, int]:
        return struct.unpack_from(fmt, self._map, offset)[0], offset + struct.calcsize(fmt)

    def _string(self, offset: int) -> tuple[str, int]:
        length, offset = self._unpack("<Q", offset)
        end = offset + length
        if end > self.size:
            raise GgufError(f"a string of {length} bytes at offset {offset} runs past the end of the file")
        return self._map[offset:end].decode("utf-8", errors="replace"), end

    def _value(self, vtype: int, offset: int) -> tuple[Any, int]:
        if vtype in _SCALARS:
            return self._unpack(_SCALARS[vtype], offset)
        if vtype == _STRING:
            return self._string(offset)
        if vtype == _ARRAY:
            etype, offset = self._unpack("<I", offset)
            count, offset = self._unpack("<Q", offset)
            if etype in _NUMPY:
                dtype = np.dtype(_NUMPY[etype]).newbyteorder("<")
                end = offset + count * dtype.itemsize
                if end > self.size:
                    raise GgufError(f"an array of {count} values at offset {offset} runs past the end of the file")
                return np.frombuffer(self._map, dtype, count, offset).tolist(), end
            if etype == _STRING:
                items, unpack, data = [], struct.Struct("<Q").unpack_from, self._map
                for _ in range(count):
                    (length,) = unpack(data, offset)
                    offset += 8
                    items.append(data[offset: offset + length].decode("utf-8", errors="replace"))
                    offset += length
                if offset > self.size:
                    raise GgufError("a string array runs past the end of the file")
                return items, offset
            values = []
            for _ in range(count):
                value, offset = self._value(etype, offset)
                values.append(value)
            return values, offset
        raise GgufError(f"unknown metadata value type {vtype} at offset {offset}")

    # -- the file -----------------------------------------------------------------------------
    def _parse(self) -> None:
        if self._map[:4] != MAGIC:
            raise GgufError("no GGUF magic at the start of the file")
        version, offset = self._unpack("<I", 4)
        if version not in (2, 3):
            raise GgufError(f"GGUF version {version} is not supported (2 and 3 are; big-endian files are not)")
        n_tensors, offset = self._unpack("<Q", offset)
        n_fields, offset = self._unpack("<Q", offset)
        for _ in range(n_fields):
            key, offset = self._string(offset)
            vtype, offset = self._unpack("<I", offset)
            self.metadata[key], offset = self._value(vtype, offset)
        infos = []
        for _ in range(n_tensors):
            name, offset = self._string(offset)
            n_dims, offset = self._unpack("<I", offset)
            dims = np.frombuffer(self._map, np.dtype("<u8"), n_dims, offset).astype(np.int64)
            offset += 8 * n_dims
            raw_type, offset = self._unpack("<I", offset)
            rel, offset = self._unpack("<Q", offset)
            infos.append((name, dims, raw_type, rel))
        alignment = int(self.metadata.get("general.alignment", 32))
        start = offset + (-offset % alignment)
        seen = set()
        for name, dims, raw_type, rel in infos:
            if name in seen:
                raise GgufError(f"tensor {name!r} appears twice")
            seen.add(name)
            try:
                qtype = GGMLQuantizationType(raw_type)
            except ValueError:
                raise GgufError(f"tensor {name!r} has unknown type {raw_type}") from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            if len(dims) and int(dims[0]) % block:
                raise GgufError(f"tensor {name!r} of type {qtype.name} has rows of {int(dims[0])} values, which is "
                                f"not a multiple of the type's block of {block}")
            n_elements = int(np.prod(dims)) if len(dims) else 1
            n_bytes = n_elements * type_size // block
            data_offset = start + int(rel)
            if data_offset + n_bytes > self.size:
                raise GgufError(
                    f"truncated GGUF file: tensor {name!r} needs bytes up to {data_offset + n_bytes}, "
                    f"the file has {self.size}; download it again"
                )
            np_dims = tuple(int(d) for d in reversed(dims.tolist()))
            if qtype in _PLAIN:
                dtype = np.dtype(_PLAIN[qtype]).newbyteorder("<")
                data = np.frombuffer(self._map, dtype, n_elements, data_offset).reshape(np_dims)
            else:
                data = np.frombuffer(self._map, np.uint8, n_bytes, data_offset).reshape(
                    quant_shape_to_byte_shape(np_dims, qtype))
            self.tensors.append(GgufTensor(name, qtype, dims, n_elements, n_bytes, data_offset, data))
