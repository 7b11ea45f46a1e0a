"""The KServe v2 inference protocol's tensors (Triton's), apart from HTTP: a request body in JSON
or with the binary-tensor extension into named numpy arrays, and output arrays back into either.

Binary extension: the body is the JSON header (its length in the `Inference-Header-Content-Length`
header) followed by each input's raw bytes, an input's `parameters.binary_data_size` saying how
many; BYTES elements are each a 4-byte little-endian length and the bytes. Outputs go back the
same way when the request asks (`binary_data_output`, or an output's `binary_data`).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from surge.tensor.config import NUMPY_TYPES

DTYPES = NUMPY_TYPES  # the protocol's datatypes and their numpy types


class ProtocolError(ValueError):
    """A request the protocol cannot read: a 400 with this message."""


@dataclass
class KServeError(Exception):
    """A request that fails with the HTTP status it means (gRPC maps it to its status codes)."""

    status: int
    message: str
    headers: dict[str, str] | None = None

    def __str__(self) -> str:
        return self.message


@dataclass
class InferRequest:
    inputs: dict[str, np.ndarray]
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[dict[str, Any]] | None = None  # the outputs asked for (None: all)
    id: str | None = None


def _bytes_elements(raw: bytes, count: int, name: str) -> list[bytes]:
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise ProtocolError(f"input '{name}': a BYTES element's length is cut short")
        (n,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + n > len(raw):
            raise ProtocolError(f"input '{name}': a BYTES element runs past its data ({n} bytes)")
        out.append(raw[at:at + n])
        at += n
    if len(out) != count:
        raise ProtocolError(f"input '{name}': {len(out)} BYTES elements for a shape of {count}")
    return out


def array_from_raw(raw: bytes, datatype: str, count: int, name: str) -> np.ndarray:
    """A tensor's `count` elements from its raw bytes (the binary extension's, gRPC's
    raw_input_contents), flat."""
    if datatype == "BYTES":
        return np.array(_bytes_elements(raw, count, name), dtype=np.object_)
    dtype = np.dtype(DTYPES[datatype]).newbyteorder("<")
    if len(raw) != count * dtype.itemsize:
        raise ProtocolError(f"input '{name}': {len(raw)} bytes for {count} {datatype} elements")
    return np.frombuffer(raw, dtype=dtype).astype(DTYPES[datatype])


def check_tensor(name: str, datatype: Any, shape: Any) -> int:
    """The element count of a declared tensor; ProtocolError for an unknown datatype or a bad shape."""
    if not isinstance(datatype, str) or datatype not in DTYPES:
        raise ProtocolError(f"input '{name}': unknown datatype {datatype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise ProtocolError(f"input '{name}': 'shape' must be a list of non-negative integers")
    return int(np.prod(shape)) if shape else 1


def _json_elements(data: Any, datatype: str, count: int, name: str) -> np.ndarray:
    flat = _flatten(data)
    if len(flat) != count:
        raise ProtocolError(f"input '{name}': {len(flat)} elements for a shape of {count}")
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise ProtocolError(f"input '{name}': BYTES data must be strings in JSON")
        return np.array([v.encode("utf-8") for v in flat] or [], dtype=np.object_)
    if datatype == "BOOL" and not all(isinstance(v, bool) for v in flat):
        raise ProtocolError(f"input '{name}': BOOL data must be true or false")
    if datatype != "BOOL" and not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
        raise ProtocolError(f"input '{name}': {datatype} data must be numbers")
    if "INT" in datatype and not all(isinstance(v, int) for v in flat):  # no silent truncation of 1.5 to 1
        raise ProtocolError(f"input '{name}': {datatype} data must be integers")
    try:
        return np.array(flat, dtype=DTYPES[datatype])
    except (OverflowError, ValueError) as exc:
        raise ProtocolError(f"input '{name}': {exc}") from None


def _flatten(data: Any) -> list[Any]:
    """The leaves of nested lists, in order (without recursion: the nesting is the client's)."""
    out: list[Any] = []
    stack = [iter([data])]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def parse_request(body: bytes, header_length: str | None) -> InferRequest:
    """The request's inputs as arrays shaped as declared; ProtocolError naming what is wrong."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError("Inference-Header-Content-Length is not a number") from None
        if not 0 < n <= len(body):
            raise ProtocolError(f"Inference-Header-Content-Length {n} is outside the body of {len(body)} bytes")
        head, rest = body[:n], body[n:]
    else:
        head, rest = body, b""
    try:
        doc = json.loads(head)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"the request is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ProtocolError("the request must be a JSON object")
    unknown = set(doc) - {"id", "parameters", "inputs", "outputs"}
    if unknown:
        raise ProtocolError(f"unknown request field(s): {', '.join(sorted(unknown))}")
    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError("'parameters' must be an object")
    inputs_doc = doc.get("inputs")
    if not isinstance(inputs_doc, list) or not inputs_doc:
        raise ProtocolError("'inputs' must be a non-empty list")
    inputs: dict[str, np.ndarray] = {}
    at = 0
    for item in inputs_doc:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ProtocolError("each input needs a 'name'")
        name = item["name"]
        if name in inputs:
            raise ProtocolError(f"input '{name}' is given twice")
        datatype, shape = item.get("datatype"), item.get("shape")
        count = check_tensor(name, datatype, shape)
        own = item.get("parameters") or {}
        if not isinstance(own, dict):
            raise ProtocolError(f"input '{name}': 'parameters' must be an object")
        size = own.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or at + size > len(rest):
                raise ProtocolError(f"input '{name}': binary_data_size {size!r} runs past the body")
            array = array_from_raw(rest[at:at + size], datatype, count, name)
            at += size
        elif "data" in item:
            array = _json_elements(item["data"], datatype, count, name)
        else:
            raise ProtocolError(f"input '{name}' has neither 'data' nor binary data")
        inputs[name] = array.reshape(shape)
    if at != len(rest):
        raise ProtocolError(f"{len(rest) - at} bytes of binary data belong to no input")
    outputs = doc.get("outputs")
    if outputs is not None and (not isinstance(outputs, list)
                                or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                           and isinstance(o.get("parameters") or {}, dict) for o in outputs)):
        raise ProtocolError("'outputs' must be a list of objects with a 'name' (and object 'parameters')")
    rid = doc.get("id")
    return InferRequest(inputs, parameters, outputs, rid if isinstance(rid, str) else None)


def to_raw(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in array.reshape(-1))
    return np.ascontiguousarray(array, dtype=np.dtype(DTYPES[datatype]).newbyteorder("<")).tobytes()


def encode_response(head: dict[str, Any], outputs: list[tuple[str, str, np.ndarray]],
                    request: InferRequest) -> tuple[bytes, int | None]:
    """(the body, the JSON header's length when binary data follows it) for `outputs` as
    (name, datatype, array), in binary where the request asked for it."""
    wanted = {o["name"]: o for o in request.outputs} if request.outputs is not None else None
    all_binary = bool(request.parameters.get("binary_data_output"))
    tensors, blobs = [], []
    for name, datatype, array in outputs:
        if wanted is not None and name not in wanted:
            continue
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        own = (wanted or {}).get(name, {}).get("parameters") or {}
        if own.get("binary_data", all_binary):
            blob = to_raw(array, datatype)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "BYTES":
            tensor["data"] = [v.decode("utf-8", "replace") for v in array.reshape(-1)]
        else:
            tensor["data"] = array.reshape(-1).tolist()
        tensors.append(tensor)
    text = json.dumps({**head, "outputs": tensors}).encode("utf-8")
    return (text + b"".join(blobs), len(text)) if blobs else (text, None)
