"""Decode and encode Open Inference Protocol (KServe V2 / Triton REST) bodies.

Pure functions, no FastAPI: the route module ``dropwise.service.routes.v2`` calls them.

Supported on the way in: a JSON request, optionally followed by the binary tensor data extension (the JSON
header length travels in the ``Inference-Header-Content-Length`` header and each binary input carries
``parameters.binary_data_size``), with every numeric datatype numpy knows plus ``BYTES`` (4-byte little-endian
length-prefixed elements in binary form, strings in JSON form). On the way out each output goes as JSON
``data`` or as binary data, chosen per output (``parameters.binary_data``) or for the whole request
(``parameters.binary_data_output``), as Triton does.

Every malformed body raises :class:`V2CodecError`, a :class:`~dropwise.service.errors.ServiceError` that carries
the HTTP status to answer (400; 413 for a body over the size limit; 415 for an unknown Content-Encoding), so
the app's exception handlers render it; nothing in here lets a bad body escape as another exception.
Declared sizes (shapes, ``binary_data_size``, BYTES element counts) are checked against the bytes actually
sent before anything is allocated for them.
"""

from __future__ import annotations

import gzip
import json
import math
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from dropwise.service.errors import InvalidInput

__all__ = [
    "DATATYPE_TO_NUMPY",
    "DecodedRequest",
    "EncodedResponse",
    "RequestedOutput",
    "TensorInput",
    "V2CodecError",
    "datatype_of",
    "decode_body",
    "decompress_body",
    "encode_response",
    "parse_header_length",
]

DATATYPE_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
"""V2 datatype name -> little-endian numpy dtype (``BYTES`` is handled separately)."""

_NUMPY_TO_DATATYPE: dict[np.dtype[Any], str] = {dtype: name for name, dtype in DATATYPE_TO_NUMPY.items()}
_BYTES = "BYTES"
_MAX_RANK = 16


class V2CodecError(InvalidInput):
    """A request body that cannot be decoded; ``status`` is the HTTP status to answer (400 by default)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message, status=status)


@dataclass(frozen=True)
class TensorInput:
    """One decoded input tensor: ``data`` already has ``shape`` and the numpy dtype of ``datatype``."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestedOutput:
    """One entry of the request's ``outputs`` list; ``binary`` is None when the client left it unset."""

    name: str
    binary: bool | None = None


@dataclass(frozen=True)
class DecodedRequest:
    """A decoded inference request."""

    id: str | None
    inputs: list[TensorInput]
    outputs: list[RequestedOutput] | None
    parameters: dict[str, Any]


@dataclass(frozen=True)
class EncodedResponse:
    """A response body ready to send; ``header_length`` is set when binary data follows the JSON."""

    body: bytes
    header_length: int | None

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers that must accompany :attr:`body`."""
        if self.header_length is None:
            return {"Content-Type": "application/json"}
        return {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(self.header_length),
        }


def datatype_of(dtype: np.dtype[Any]) -> str:
    """The V2 datatype name of a numpy dtype (strings and objects map to ``BYTES``)."""
    if dtype.kind in "USO":
        return _BYTES
    name = _NUMPY_TO_DATATYPE.get(dtype.newbyteorder("=") if dtype.byteorder in "<>" else dtype)
    if name is None:
        raise ValueError(f"numpy dtype {dtype} has no Open Inference Protocol datatype")
    return name


def parse_header_length(value: str | None, body_length: int) -> int | None:
    """Validate the ``Inference-Header-Content-Length`` header against the body it describes."""
    if value is None:
        return None
    text = value.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        raise V2CodecError(f"Inference-Header-Content-Length must be a non-negative integer, got {value[:40]!r}")
    length = int(text)
    if length == 0 or length > body_length:
        raise V2CodecError(f"Inference-Header-Content-Length {length} does not fit a body of {body_length} bytes")
    return length


def decompress_body(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo a request ``Content-Encoding`` (gzip or deflate, as the Triton client sends), bounded by
    ``limit`` bytes once inflated."""
    if encoding is None or encoding.strip().lower() in ("", "identity"):
        return body
    name = encoding.strip().lower()
    if name == "gzip":
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    elif name == "deflate":
        inflater = zlib.decompressobj()
    else:
        raise V2CodecError(f"unsupported Content-Encoding {encoding[:40]!r}; use gzip or deflate", 415)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise V2CodecError(f"body is not valid {name} data: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise V2CodecError(f"decompressed body exceeds the limit of {limit} bytes", 413)
    if not inflater.eof:
        raise V2CodecError(f"body is truncated {name} data")
    return out


def _check_shape(raw: Any, where: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or len(raw) > _MAX_RANK:
        raise V2CodecError(f"{where}.shape must be a list of at most {_MAX_RANK} integers")
    shape: list[int] = []
    for dim in raw:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise V2CodecError(f"{where}.shape must hold non-negative integers, got {raw!r}")
        shape.append(dim)
    return tuple(shape)


def _element_count(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


def _deserialize_bytes(buffer: memoryview, count: int, where: str) -> np.ndarray:
    # every element carries a 4-byte length prefix: a declared count the payload cannot hold is refused
    # before the object array is allocated (a shape of [1, 10**12] with 8 bytes must not reach np.empty)
    if count * 4 > len(buffer):
        raise V2CodecError(
            f"{where}: shape declares {count} BYTES elements but the {len(buffer)}-byte payload holds at most "
            f"{len(buffer) // 4}"
        )
    out = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if offset + 4 > len(buffer):
            raise V2CodecError(f"{where}: BYTES data ends inside element {i}")
        (length,) = struct.unpack_from("<I", buffer, offset)
        offset += 4
        if offset + length > len(buffer):
            raise V2CodecError(f"{where}: BYTES data ends inside element {i}")
        out[i] = bytes(buffer[offset : offset + length])
        offset += length
    if offset != len(buffer):
        raise V2CodecError(f"{where}: {len(buffer) - offset} bytes left after {count} BYTES elements")
    return out


def _flatten_json(data: Any, where: str) -> list[Any]:
    """Flatten nested JSON lists (V2 allows both flat and nested ``data``) without numpy guessing."""
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    stack: list[Any] = [iter(data)]
    depth = 1
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                depth += 1
                if depth > _MAX_RANK + 1:
                    raise V2CodecError(f"{where}.data is nested deeper than {_MAX_RANK} levels")
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
            depth -= 1
    return flat


def _json_values(values: list[Any], datatype: str, dtype: np.dtype[Any] | None, where: str) -> np.ndarray:
    if datatype == _BYTES:
        out = np.empty(len(values), dtype=object)
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise V2CodecError(f"{where}.data[{i}] must be a string for datatype BYTES")
            out[i] = value.encode("utf-8")
        return out
    assert dtype is not None
    if dtype.kind == "b":
        if not all(isinstance(v, bool) for v in values):
            raise V2CodecError(f"{where}.data must hold only true/false for datatype BOOL")
        return np.asarray(values, dtype=dtype)
    if dtype.kind in "iu":
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise V2CodecError(f"{where}.data must hold only integers for datatype {datatype}")
        info = np.iinfo(dtype)
        if values and (min(values) < info.min or max(values) > info.max):
            raise V2CodecError(f"{where}.data holds a value outside the range of {datatype}")
        return np.asarray(values, dtype=dtype)
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise V2CodecError(f"{where}.data must hold only numbers for datatype {datatype}")
    try:
        with np.errstate(over="ignore"):
            return np.asarray(values, dtype=dtype)
    except OverflowError:
        raise V2CodecError(f"{where}.data holds a number too large for {datatype}") from None


def _decode_inputs(header: Mapping[str, Any], binary: memoryview) -> list[TensorInput]:
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise V2CodecError("request must hold a non-empty 'inputs' list")
    inputs: list[TensorInput] = []
    offset = 0
    seen: set[str] = set()
    for index, raw in enumerate(raw_inputs):
        where = f"inputs[{index}]"
        if not isinstance(raw, dict):
            raise V2CodecError(f"{where} must be an object")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise V2CodecError(f"{where}.name must be a non-empty string")
        where = f"input '{name}'"
        if name in seen:
            raise V2CodecError(f"{where} appears twice")
        seen.add(name)
        datatype = raw.get("datatype")
        if datatype != _BYTES and datatype not in DATATYPE_TO_NUMPY:
            raise V2CodecError(f"{where}.datatype {datatype!r} is not one of {[*DATATYPE_TO_NUMPY, _BYTES]}")
        dtype = DATATYPE_TO_NUMPY.get(datatype)
        shape = _check_shape(raw.get("shape"), where)
        count = _element_count(shape)
        parameters = raw.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise V2CodecError(f"{where}.parameters must be an object")
        if "shared_memory_region" in parameters:
            raise V2CodecError(f"{where}: the shared-memory extension is not supported")
        size = parameters.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise V2CodecError(f"{where}.parameters.binary_data_size must be a non-negative integer")
            if "data" in raw:
                raise V2CodecError(f"{where} carries both JSON 'data' and binary_data_size")
            if offset + size > len(binary):
                raise V2CodecError(
                    f"{where}: binary_data_size {size} runs past the end of the body "
                    f"({len(binary) - offset} bytes left)"
                )
            chunk = binary[offset : offset + size]
            offset += size
            if dtype is None:
                flat = _deserialize_bytes(chunk, count, where)
            else:
                if size != count * dtype.itemsize:
                    raise V2CodecError(
                        f"{where}: binary_data_size {size} does not match shape {list(shape)} of "
                        f"{datatype} ({count * dtype.itemsize} bytes)"
                    )
                flat = np.frombuffer(chunk, dtype=dtype.newbyteorder("<")).astype(dtype, copy=True)
        else:
            if "data" not in raw:
                raise V2CodecError(f"{where} has neither 'data' nor parameters.binary_data_size")
            values = _flatten_json(raw["data"], where)
            if len(values) != count:
                raise V2CodecError(f"{where}: shape {list(shape)} needs {count} elements, data holds {len(values)}")
            flat = _json_values(values, datatype, dtype, where)
        inputs.append(TensorInput(name, datatype, shape, flat.reshape(shape), parameters))
    if offset != len(binary):
        raise V2CodecError(f"{len(binary) - offset} bytes of binary data follow the inputs unclaimed")
    return inputs


def _decode_outputs(raw_outputs: Any) -> list[RequestedOutput] | None:
    if raw_outputs is None:
        return None
    if not isinstance(raw_outputs, list):
        raise V2CodecError("'outputs' must be a list")
    outputs: list[RequestedOutput] = []
    for index, raw in enumerate(raw_outputs):
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise V2CodecError(f"outputs[{index}] must be an object with a string 'name'")
        parameters = raw.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise V2CodecError(f"outputs[{index}].parameters must be an object")
        if "shared_memory_region" in parameters:
            raise V2CodecError(f"output '{raw['name']}': the shared-memory extension is not supported")
        if "classification" in parameters:
            raise V2CodecError(f"output '{raw['name']}': the classification extension is not supported")
        binary = parameters.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise V2CodecError(f"outputs[{index}].parameters.binary_data must be true or false")
        outputs.append(RequestedOutput(raw["name"], binary))
    return outputs


def decode_body(body: bytes, header_length: int | None) -> DecodedRequest:
    """Decode a V2 inference request body.

    ``header_length`` is the already validated ``Inference-Header-Content-Length`` (see
    :func:`parse_header_length`); None means the whole body is JSON.
    """
    view = memoryview(body)
    header_bytes = view if header_length is None else view[:header_length]
    binary = view[len(header_bytes) :]
    try:
        header = json.loads(bytes(header_bytes))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        hint = "" if header_length is not None else " (binary data needs Inference-Header-Content-Length)"
        raise V2CodecError(f"request header is not valid JSON: {exc}{hint}") from None
    if not isinstance(header, dict):
        raise V2CodecError("request body must be a JSON object")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise V2CodecError("'id' must be a string")
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise V2CodecError("'parameters' must be an object")
    inputs = _decode_inputs(header, binary)
    outputs = _decode_outputs(header.get("outputs"))
    return DecodedRequest(request_id, inputs, outputs, parameters)


def _bytes_payload(array: np.ndarray) -> bytes:
    parts: list[bytes] = []
    for item in array.ravel():
        raw = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(struct.pack("<I", len(raw)))
        parts.append(raw)
    return b"".join(parts)


def _json_data(array: np.ndarray) -> list[Any]:
    if array.dtype.kind in "USO":
        return [item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item) for item in array.ravel()]
    return array.ravel().tolist()


def encode_response(
    model_name: str,
    model_version: str,
    outputs: Sequence[tuple[str, np.ndarray, bool]],
    *,
    request_id: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    compression: str | None = None,
) -> EncodedResponse:
    """Encode a V2 inference response.

    ``outputs`` holds ``(name, array, binary)`` triples in answer order; binary outputs are appended after the
    JSON header in that order, each announced by ``parameters.binary_data_size``. ``compression``
    ("gzip"/"deflate") compresses the whole body; the caller then sets ``Content-Encoding``.
    """
    header: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        header["id"] = request_id
    if parameters:
        header["parameters"] = dict(parameters)
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, array, binary in outputs:
        tensor: dict[str, Any] = {
            "name": name,
            "datatype": datatype_of(array.dtype),
            "shape": list(array.shape),
        }
        if binary:
            if array.dtype.kind in "USO":
                blob = _bytes_payload(array)
            else:
                blob = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = _json_data(array)
        tensors.append(tensor)
    header["outputs"] = tensors
    head = json.dumps(header, separators=(",", ":")).encode()
    body = head + b"".join(blobs) if blobs else head
    if compression == "gzip":
        body = gzip.compress(body, compresslevel=1)
    elif compression == "deflate":
        body = zlib.compress(body, 1)
    return EncodedResponse(body, len(head) if blobs else None)
