"""Unit tests of the Open Inference Protocol codec against the official Triton client's own encoders."""

from __future__ import annotations

import gzip
import json
import zlib

import numpy as np
import pytest
import tritonclient.http as httpclient
from dropwise.service.v2_codec import (
    V2CodecError,
    datatype_of,
    decode_body,
    decompress_body,
    encode_response,
    parse_header_length,
)
from tritonclient.http._utils import _get_inference_request
from tritonclient.utils import serialize_byte_tensor

NUMERIC = [
    ("FP32", np.float32),
    ("FP64", np.float64),
    ("FP16", np.float16),
    ("INT8", np.int8),
    ("INT16", np.int16),
    ("INT32", np.int32),
    ("INT64", np.int64),
    ("UINT8", np.uint8),
    ("UINT64", np.uint64),
    ("BOOL", np.bool_),
]


def _client_body(
    inputs: list[httpclient.InferInput],
    outputs: list[httpclient.InferRequestedOutput] | None = None,
    parameters: dict | None = None,
    request_id: str = "",
) -> tuple[bytes, int | None]:
    """The exact body and header length the Triton HTTP client would send."""
    return _get_inference_request(
        inputs=inputs,
        request_id=request_id,
        outputs=outputs,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        custom_parameters=parameters,
    )


def _sample(np_dtype: type, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if np_dtype is np.bool_:
        return rng.random(shape) > 0.5
    if np.issubdtype(np_dtype, np.integer):
        info = np.iinfo(np_dtype)
        return rng.integers(max(info.min, -1000), min(info.max, 1000), size=shape).astype(np_dtype)
    return rng.standard_normal(shape).astype(np_dtype)


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize(("datatype", "np_dtype"), NUMERIC)
def test_decode_matches_client_encoding(datatype: str, np_dtype: type, binary: bool) -> None:
    rng = np.random.default_rng(7)
    first = _sample(np_dtype, (3, 4), rng)
    second = _sample(np.float32, (3, 2, 2), rng)
    a = httpclient.InferInput("a", list(first.shape), datatype)
    a.set_data_from_numpy(first, binary_data=binary)
    b = httpclient.InferInput("b", list(second.shape), "FP32")
    b.set_data_from_numpy(second, binary_data=True)
    body, header_length = _client_body([a, b], parameters={"mode": "mc", "samples": 8}, request_id="r-1")
    assert header_length is not None
    decoded = decode_body(body, parse_header_length(str(header_length), len(body)))
    assert decoded.id == "r-1"
    assert decoded.parameters == {"binary_data_output": True, "mode": "mc", "samples": 8}
    assert decoded.outputs is None
    assert [t.name for t in decoded.inputs] == ["a", "b"]
    assert decoded.inputs[0].datatype == datatype
    assert decoded.inputs[0].data.dtype == np.dtype(np_dtype)
    np.testing.assert_array_equal(decoded.inputs[0].data, first)
    np.testing.assert_array_equal(decoded.inputs[1].data, second)
    assert decoded.inputs[1].shape == (3, 2, 2)


def test_decode_json_only_request_and_requested_outputs() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    inp = httpclient.InferInput("x", [2, 3], "FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    outs = [
        httpclient.InferRequestedOutput("probabilities", binary_data=False),
        httpclient.InferRequestedOutput("std", binary_data=True),
    ]
    body, header_length = _client_body([inp], outs)
    assert header_length is None
    decoded = decode_body(body, None)
    np.testing.assert_array_equal(decoded.inputs[0].data, x)
    assert [(o.name, o.binary) for o in decoded.outputs or []] == [("probabilities", False), ("std", True)]


def test_nested_json_data_is_accepted() -> None:
    body = json.dumps(
        {"inputs": [{"name": "x", "datatype": "INT64", "shape": [2, 2], "data": [[1, 2], [3, 4]]}]}
    ).encode()
    decoded = decode_body(body, None)
    np.testing.assert_array_equal(decoded.inputs[0].data, np.array([[1, 2], [3, 4]], dtype=np.int64))


def test_bytes_input_binary_and_json() -> None:
    words = np.array([b"alpha", b"", "βeta".encode()], dtype=object)
    inp = httpclient.InferInput("w", [3], "BYTES")
    inp.set_data_from_numpy(words, binary_data=True)
    body, header_length = _client_body([inp])
    decoded = decode_body(body, header_length)
    assert list(decoded.inputs[0].data) == list(words)
    inp.set_data_from_numpy(np.array(["alpha", "", "βeta"], dtype=object), binary_data=False)
    body, header_length = _client_body([inp])
    assert list(decode_body(body, header_length).inputs[0].data) == list(words)
    payload = serialize_byte_tensor(words).item()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "w",
                    "datatype": "BYTES",
                    "shape": [3],
                    "parameters": {"binary_data_size": len(payload)},
                }
            ]
        }
    ).encode()
    assert list(decode_body(head + payload, len(head)).inputs[0].data) == list(words)
    with pytest.raises(V2CodecError, match="BYTES data ends"):
        decode_body(head.replace(b'"shape": [3]', b'"shape": [4]') + payload, len(head))


def _json_body(tensor: dict) -> bytes:
    return json.dumps({"inputs": [tensor]}).encode()


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"inputs": [], "x": ' + b"1" * 5000 + b"}", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b"{}", "non-empty 'inputs'"),
        (_json_body({"name": "x", "datatype": "FP33", "shape": [1], "data": [1]}), "datatype"),
        (_json_body({"name": "x", "datatype": "FP32", "shape": [2, -1], "data": [1]}), "shape"),
        (_json_body({"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3]}), "needs 4"),
        (_json_body({"name": "x", "datatype": "FP32", "shape": [1], "data": ["a"]}), "only numbers"),
        (_json_body({"name": "x", "datatype": "INT64", "shape": [1], "data": [1.5]}), "only integers"),
        (_json_body({"name": "x", "datatype": "INT8", "shape": [1], "data": [300]}), "outside the range"),
        (_json_body({"name": "x", "datatype": "BOOL", "shape": [1], "data": [1]}), "true/false"),
        (_json_body({"name": "x", "datatype": "FP32", "shape": [1]}), "neither 'data'"),
        (_json_body({"name": "", "datatype": "FP32", "shape": [1], "data": [1]}), "name"),
        (
            json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}], "id": 3}).encode(),
            "'id'",
        ),
        (
            json.dumps(
                {
                    "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
                    "outputs": [{"n": 1}],
                }
            ).encode(),
            "outputs[0]",
        ),
    ],
)
def test_malformed_json_bodies(body: bytes, fragment: str) -> None:
    with pytest.raises(V2CodecError) as info:
        decode_body(body, None)
    assert info.value.status == 400
    assert fragment in info.value.message


def _binary_body() -> tuple[bytes, int]:
    x = np.ones((2, 3), dtype=np.float32)
    inp = httpclient.InferInput("x", [2, 3], "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    body, header_length = _client_body([inp])
    assert header_length is not None
    return body, header_length


def test_truncated_and_padded_binary_bodies() -> None:
    body, header_length = _binary_body()
    with pytest.raises(V2CodecError, match="runs past the end"):
        decode_body(body[:-1], header_length)
    with pytest.raises(V2CodecError, match="unclaimed"):
        decode_body(body + b"\0\0\0\0", header_length)
    with pytest.raises(V2CodecError, match="not valid JSON"):
        decode_body(body, None)


def test_binary_size_must_match_shape() -> None:
    header = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 4}}]}
    head = json.dumps(header).encode()
    with pytest.raises(V2CodecError, match="does not match shape"):
        decode_body(head + b"\0" * 4, len(head))


@pytest.mark.parametrize("value", ["abc", "-3", "0", "1000000", " ", "1.5", "\u00b2", "\u0663", "9" * 5000])
def test_bad_header_length(value: str) -> None:
    with pytest.raises(V2CodecError, match="Inference-Header-Content-Length"):
        parse_header_length(value, 100)


def test_header_length_none_and_valid() -> None:
    assert parse_header_length(None, 10) is None
    assert parse_header_length(" 10 ", 10) == 10


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_decompress_round_trip_and_limit(algorithm: str) -> None:
    raw = b'{"inputs": []}' * 100
    packed = gzip.compress(raw) if algorithm == "gzip" else zlib.compress(raw)
    assert decompress_body(packed, algorithm, limit=len(raw)) == raw
    with pytest.raises(V2CodecError) as info:
        decompress_body(packed, algorithm, limit=len(raw) - 1)
    assert info.value.status == 413
    with pytest.raises(V2CodecError, match="truncated"):
        decompress_body(packed[:-6], algorithm, limit=len(raw))
    with pytest.raises(V2CodecError) as info:
        decompress_body(packed, "br", limit=len(raw))
    assert info.value.status == 415


@pytest.mark.parametrize("compression", [None, "gzip", "deflate"])
def test_encode_response_read_by_client(compression: str | None) -> None:
    rng = np.random.default_rng(3)
    probs = rng.random((4, 10)).astype(np.float32)
    preds = rng.integers(0, 10, size=4).astype(np.int64)
    mi = rng.random(4).astype(np.float64)
    labels = np.array(["zero", "ünï", "", "three"], dtype=object)
    encoded = encode_response(
        "cnn",
        "2",
        [
            ("probabilities", probs, True),
            ("predictions", preds, False),
            ("mi", mi, True),
            ("labels", labels, True),
        ],
        request_id="abc",
        parameters={"mode": "mc"},
        compression=compression,
    )
    assert encoded.header_length is not None
    assert encoded.headers["Inference-Header-Content-Length"] == str(encoded.header_length)
    result = httpclient.InferResult.from_response_body(
        encoded.body, header_length=encoded.header_length, content_encoding=compression
    )
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probs)
    np.testing.assert_array_equal(result.as_numpy("predictions"), preds)
    np.testing.assert_array_equal(result.as_numpy("mi"), mi)
    assert [v.decode() for v in result.as_numpy("labels")] == list(labels)
    response = result.get_response()
    assert response["id"] == "abc"
    assert response["model_name"] == "cnn"
    assert response["model_version"] == "2"
    assert response["parameters"] == {"mode": "mc"}
    assert result.get_output("predictions")["datatype"] == "INT64"
    assert result.get_output("mi")["datatype"] == "FP64"


def test_encode_json_only_response() -> None:
    probs = np.array([[0.25, 0.75]], dtype=np.float32)
    encoded = encode_response("m", "1", [("probabilities", probs, False)])
    assert encoded.header_length is None
    assert encoded.headers["Content-Type"] == "application/json"
    result = httpclient.InferResult.from_response_body(encoded.body)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probs)


def test_datatype_of() -> None:
    assert datatype_of(np.dtype(np.float32)) == "FP32"
    assert datatype_of(np.dtype(np.int64)) == "INT64"
    assert datatype_of(np.dtype("<U3")) == "BYTES"
    with pytest.raises(ValueError):
        datatype_of(np.dtype(np.complex64))


def mutations(body: bytes, header_length: int, rng: np.random.Generator) -> list[tuple[bytes, int | None]]:
    """Seeded corruptions of a valid binary request: cuts, byte flips in the header and the tensor data,
    spliced JSON values, wrong header lengths."""
    cases: list[tuple[bytes, int | None]] = []
    for _ in range(150):
        kind = int(rng.integers(0, 5))
        data = bytearray(body)
        length: int | None = header_length
        if kind == 0:
            data = data[: int(rng.integers(0, len(data)))]
        elif kind == 1:
            for _ in range(int(rng.integers(1, 4))):
                data[int(rng.integers(0, header_length))] = int(rng.integers(0, 256))
        elif kind == 2:
            data[int(rng.integers(header_length, len(data)))] ^= 0xFF
        elif kind == 3:
            start = int(rng.integers(0, header_length))
            splice = [b"1e999", b'"x"', b"[[[[", b"-1", b"null", b"18446744073709551616", b"true", b"{}"]
            data[start : start + int(rng.integers(1, 6))] = splice[int(rng.integers(0, len(splice)))]
            length = None if rng.random() < 0.3 else min(len(data), header_length)
        else:
            length = int(rng.integers(1, len(data) + 1))
        cases.append((bytes(data), length))
    return cases


def test_fuzzed_bodies_only_raise_codec_errors() -> None:
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 8)).astype(np.float32)
    tokens = rng.integers(0, 50, size=(2, 3)).astype(np.int64)
    a = httpclient.InferInput("x", [2, 8], "FP32")
    a.set_data_from_numpy(x)
    b = httpclient.InferInput("t", [2, 3], "INT64")
    b.set_data_from_numpy(tokens, binary_data=False)
    c = httpclient.InferInput("w", [2], "BYTES")
    c.set_data_from_numpy(np.array([b"ab", b"cde"], dtype=object))
    body, header_length = _client_body(
        [a, b, c], [httpclient.InferRequestedOutput("std")], parameters={"mode": "mc", "samples": 4}
    )
    assert header_length is not None
    decoded = 0
    for data, length in mutations(body, header_length, rng):
        try:
            checked = parse_header_length(None if length is None else str(length), len(data))
            decode_body(data, checked)
            decoded += 1
        except V2CodecError as exc:
            assert exc.status == 400
            assert exc.message
    assert decoded < 150  # the corruptions do reach the error paths
