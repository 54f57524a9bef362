"""The Open Inference Protocol routes against a real uvicorn process.

Called with the official Triton HTTP client (sync and asyncio), and with raw httpx requests for the malformed
bodies a client library never sends.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from dropwise.service.inference import ModelInfo
from test_service_fixtures import build_onnx_repository, build_service_repository, running_server
from test_service_v2_codec import mutations
from tritonclient.utils import InferenceServerException

MAX_SAMPLES = 64
MAX_BODY = 256 * 1024
MC_NAMES = ["predictive_entropy", "expected_entropy", "mutual_information", "variation_ratio", "std"]


@dataclass(frozen=True)
class ServedModel:
    """A model of the test repository, as its manifest describes it."""

    name: str
    version: int
    task: str
    input_name: str
    input_shape: tuple[int, ...]
    input_dtype: str
    labels: list[str] | None
    has_sites: bool


@dataclass(frozen=True)
class Server:
    """A running service: its address and the models it serves."""

    url: str
    host_port: str
    repository: Path
    models: dict[str, ServedModel]

    def pick(self, task: str = "classification", dtype: str = "float32", mc: bool = True) -> ServedModel:
        for model in sorted(self.models.values(), key=lambda m: m.name):
            if model.task == task and model.input_dtype == dtype and (model.has_sites or not mc):
                return model
        pytest.fail(f"the test repository has no {task} model with {dtype} input{' and MC sites' if mc else ''}")


def _scan(repository: Path) -> dict[str, ServedModel]:
    models: dict[str, ServedModel] = {}
    for manifest_path in sorted(repository.glob("*/*/manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        current = models.get(manifest["name"])
        if current is not None and current.version > int(manifest["version"]):
            continue
        models[manifest["name"]] = ServedModel(
            name=manifest["name"],
            version=int(manifest["version"]),
            task=manifest["task"],
            input_name=manifest["inputs"][0]["name"],
            input_shape=tuple(manifest["inputs"][0]["shape"]),
            input_dtype=manifest["inputs"][0]["dtype"],
            labels=manifest.get("labels"),
            has_sites=bool(manifest.get("sites")),
        )
    return models


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`dropwise serve` on a free loopback port over the shared service repository (built from the session's
    `quick_repository`), with small limits so the tests can cross them."""
    repository = build_service_repository(request, tmp_path_factory.mktemp("v2"))
    env = {
        "DROPWISE_MAX_SAMPLES": str(MAX_SAMPLES),
        "DROPWISE_MAX_BODY_BYTES": str(MAX_BODY),
        "DROPWISE_BACKEND": "torch",
        "DROPWISE_LOG_LEVEL": "warning",
    }
    with running_server(repository, "--device", "cpu", env=env, timeout=180) as url:
        host_port = url.removeprefix("http://")
        yield Server(url=url, host_port=host_port, repository=repository, models=_scan(repository))


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpclient.InferenceServerClient]:
    with httpclient.InferenceServerClient(server.host_port, network_timeout=120.0) as triton:
        yield triton


def _inputs_for(model: ServedModel, rows: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (rows, *model.input_shape[1:])
    if model.input_dtype == "int64":
        return rng.integers(0, 8, size=shape).astype(np.int64)
    return rng.standard_normal(shape).astype(np.float32)


def _datatype(model: ServedModel) -> str:
    return {"float32": "FP32", "int64": "INT64"}[model.input_dtype]


def _infer_input(
    model: ServedModel, x: np.ndarray, binary: bool = True, module: ModuleType = httpclient
) -> httpclient.InferInput:
    """The model's input tensor as the (sync or asyncio) Triton client builds it."""
    tensor = module.InferInput(model.input_name, list(x.shape), _datatype(model))
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def _native(server: Server, model: ServedModel, x: np.ndarray, **options: object) -> dict:
    """The native API's answer for the same rows and options."""
    response = httpx.post(
        f"{server.url}/v1/models/{model.name}/predict", json={"inputs": x.tolist(), **options}, timeout=120
    )
    assert response.status_code == 200, response.text
    return response.json()


def _expect_error(call: Callable[[], object], status: str, fragment: str) -> None:
    """`call` raises the Triton client's exception with this HTTP status and a message holding `fragment`."""
    with pytest.raises(InferenceServerException) as info:
        call()
    assert info.value.status() == status, info.value
    assert fragment in info.value.message(), info.value.message()


# ------------------------------------------------------------------------------------------- metadata
def test_health_and_server_metadata(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "dropwise"
    assert "binary_tensor_data" in meta["extensions"]
    assert meta["version"]


def test_model_metadata_and_readiness(server: Server, client: httpclient.InferenceServerClient) -> None:
    for model in server.models.values():
        meta = client.get_model_metadata(model.name)
        assert meta["name"] == model.name
        assert str(model.version) in meta["versions"]
        (tensor,) = meta["inputs"]
        assert tensor["name"] == model.input_name
        assert tensor["datatype"] == _datatype(model)
        assert tensor["shape"] == [-1, *model.input_shape[1:]]
        names = [output["name"] for output in meta["outputs"]]
        if model.task == "classification":
            assert names[:2] == ["probabilities", "predictions"]
            probabilities = meta["outputs"][0]
            assert probabilities["datatype"] == "FP32"
            assert probabilities["shape"] == [-1, len(model.labels or [])]
        else:
            assert names[0] == "mean"
        if model.has_sites:
            assert set(MC_NAMES if model.task == "classification" else ["mean", "std"]) <= set(names)
            # Every output the metadata lists comes back with that datatype and a matching shape.
            x = _inputs_for(model, rows=2)
            result = client.infer(
                model.name,
                [_infer_input(model, x)],
                parameters={
                    "mode": "mc",
                    "samples": 3,
                    "return_samples": True,
                    **({"abstain": 0.5} if model.task == "classification" else {}),
                },
            )
            for output in meta["outputs"]:
                answered = result.get_output(output["name"])
                assert answered is not None, output["name"]
                assert answered["datatype"] == output["datatype"], output
                assert len(answered["shape"]) == len(output["shape"]), (output, answered)
                for want, got in zip(output["shape"], answered["shape"], strict=True):
                    assert want in (-1, got), (output, answered)
        versioned = client.get_model_metadata(model.name, model_version=str(model.version))
        assert versioned == meta
        assert client.is_model_ready(model.name)
        assert client.is_model_ready(model.name, model_version=str(model.version))
    assert not client.is_model_ready("no-such-model")
    _expect_error(lambda: client.get_model_metadata("no-such-model"), "404", "no-such-model")
    some = next(iter(server.models.values()))
    _expect_error(lambda: client.get_model_metadata(some.name, model_version="999"), "404", "999")
    _expect_error(lambda: client.get_model_metadata(some.name, model_version="abc"), "400", "version")
    for odd in ("%C2%B2", "9" * 5000, "0"):
        for suffix in ("", "/ready"):
            response = httpx.get(f"{server.url}/v2/models/{some.name}/versions/{odd}{suffix}")
            assert response.status_code == 400, response.text
            assert "version" in response.json()["error"]


# ------------------------------------------------------------------------------------------- inference
@pytest.mark.parametrize("binary", [True, False])
def test_deterministic_matches_native(server: Server, client: httpclient.InferenceServerClient, binary: bool) -> None:
    model = server.pick(mc=False)
    x = _inputs_for(model, rows=5, seed=1)
    outputs = [
        httpclient.InferRequestedOutput("probabilities", binary_data=binary),
        httpclient.InferRequestedOutput("predictions", binary_data=binary),
    ]
    result = client.infer(model.name, [_infer_input(model, x, binary)], outputs=outputs, request_id="det-1")
    response = result.get_response()
    assert response["id"] == "det-1"
    assert response["model_name"] == model.name
    assert response["model_version"] == str(model.version)
    assert response["parameters"]["mode"] == "deterministic"
    probabilities = result.as_numpy("probabilities")
    predictions = result.as_numpy("predictions")
    assert probabilities.shape == (5, len(model.labels or []))
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(predictions, probabilities.argmax(axis=1))
    # With no outputs listed the client asks for everything in binary form.
    everything = client.infer(model.name, [_infer_input(model, x, binary)])
    assert {o["name"] for o in everything.get_response()["outputs"]} == {"probabilities", "predictions"}
    assert all("binary_data_size" in o["parameters"] for o in everything.get_response()["outputs"])
    np.testing.assert_array_equal(everything.as_numpy("probabilities"), probabilities)
    native = _native(server, model, x, mode="deterministic")
    np.testing.assert_allclose(probabilities, np.asarray(native["probabilities"]), rtol=1e-5, atol=1e-7)


def test_mc_matches_native_and_is_seeded(server: Server, client: httpclient.InferenceServerClient) -> None:
    model = server.pick()
    x = _inputs_for(model, rows=3, seed=2)
    params = {"mode": "mc", "num_samples": 16, "seed": 1234}
    first = client.infer(model.name, [_infer_input(model, x)], parameters=params)
    again = client.infer(model.name, [_infer_input(model, x, binary=False)], parameters=params)
    other = client.infer(model.name, [_infer_input(model, x)], parameters={**params, "seed": 99})
    names = {o["name"] for o in first.get_response()["outputs"]}
    assert names == {"probabilities", "predictions", *MC_NAMES}
    assert first.get_response()["parameters"] == {
        "mode": "mc",
        "num_samples": 16,
        "seed": 1234,
        "backend": "torch",
        "device": "cpu",
    }
    for name in names:
        np.testing.assert_array_equal(first.as_numpy(name), again.as_numpy(name))
    assert not np.array_equal(first.as_numpy("probabilities"), other.as_numpy("probabilities"))
    pe, ee, mi = (first.as_numpy(n) for n in ("predictive_entropy", "expected_entropy", "mutual_information"))
    assert pe.shape == ee.shape == mi.shape == (3,)
    assert np.all(mi >= 0)
    np.testing.assert_allclose(mi, np.maximum(pe - ee, 0.0), atol=1e-4)
    native = _native(server, model, x, mode="mc", samples=16, seed=1234)
    np.testing.assert_allclose(first.as_numpy("probabilities"), np.asarray(native["probabilities"]), rtol=1e-5)
    uncertainty = native["uncertainty"]
    for name in MC_NAMES:
        np.testing.assert_allclose(
            first.as_numpy(name), np.asarray(uncertainty[name]), rtol=1e-5, atol=1e-6, err_msg=name
        )


def test_requested_outputs_and_samples(server: Server, client: httpclient.InferenceServerClient) -> None:
    model = server.pick()
    x = _inputs_for(model, rows=4, seed=3)
    outputs = [
        httpclient.InferRequestedOutput("samples", binary_data=True),
        httpclient.InferRequestedOutput("probabilities", binary_data=False),
        httpclient.InferRequestedOutput("variation_ratio", binary_data=True),
    ]
    result = client.infer(
        model.name,
        [_infer_input(model, x)],
        outputs=outputs,
        parameters={"mode": "mc", "samples": 8, "seed": 5},
    )
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["samples", "probabilities", "variation_ratio"]
    assert "data" in response["outputs"][1]
    samples = result.as_numpy("samples")
    classes = len(model.labels or [])
    assert samples.shape == (8, 4, classes)
    np.testing.assert_allclose(samples.mean(axis=0), result.as_numpy("probabilities"), atol=1e-5)
    votes = samples.argmax(axis=2)
    modal = np.array([np.bincount(votes[:, row], minlength=classes).max() for row in range(4)])
    np.testing.assert_allclose(result.as_numpy("variation_ratio"), 1.0 - modal / 8, atol=1e-6)
    # return_samples as a parameter returns them too, with the same seed the same draws.
    full = client.infer(
        model.name,
        [_infer_input(model, x)],
        parameters={"mode": "mc", "samples": 8, "seed": 5, "return_samples": True},
    )
    np.testing.assert_array_equal(full.as_numpy("samples"), samples)


def test_regression_model(server: Server, client: httpclient.InferenceServerClient) -> None:
    model = server.pick(task="regression")
    x = _inputs_for(model, rows=3, seed=4)
    det = client.infer(model.name, [_infer_input(model, x)])
    assert [o["name"] for o in det.get_response()["outputs"]] == ["mean"]
    mc = client.infer(model.name, [_infer_input(model, x)], parameters={"mode": "mc", "samples": 8, "seed": 3})
    assert [o["name"] for o in mc.get_response()["outputs"]] == ["mean", "std"]
    meta = client.get_model_metadata(model.name)
    assert [o["name"] for o in meta["outputs"]] == ["mean", "std", "samples"]
    _expect_error(
        lambda: client.infer(
            model.name,
            [_infer_input(model, x)],
            outputs=[httpclient.InferRequestedOutput("mutual_information")],
            parameters={"mode": "mc", "samples": 2},
        ),
        "400",
        "mutual_information",
    )
    assert mc.as_numpy("mean").shape[0] == 3
    assert np.all(mc.as_numpy("std") >= 0)
    native = _native(server, model, x, mode="mc", samples=8, seed=3)
    np.testing.assert_allclose(
        mc.as_numpy("mean").reshape(-1), np.asarray(native["mean"]).reshape(-1), rtol=1e-5, atol=1e-6
    )


def test_model_info_output_names_follow_the_task() -> None:
    def info(task: str) -> ModelInfo:
        return ModelInfo(
            "m", 1, (1,), task, "x", (-1, 3), "float32", "none", None, (), "torch", "cpu", "cpu", True,
            True, 64, 16,
        )  # fmt: skip

    classification, regression = info("classification"), info("regression")
    assert classification.output_names("deterministic") == ["probabilities", "predictions"]
    assert classification.output_names("mc", return_samples=True) == [
        "probabilities",
        "predictions",
        "predictive_entropy",
        "expected_entropy",
        "mutual_information",
        "variation_ratio",
        "std",
        "samples",
    ]
    assert regression.output_names("deterministic", return_samples=True) == ["mean"]
    assert regression.output_names("mc") == ["mean", "std"]
    assert regression.output_names("mc", return_samples=True) == ["mean", "std", "samples"]


def test_token_model_int64_input(server: Server, client: httpclient.InferenceServerClient) -> None:
    model = server.pick(dtype="int64", mc=False)
    x = _inputs_for(model, rows=2, seed=5)
    result = client.infer(model.name, [_infer_input(model, x)])
    np.testing.assert_allclose(result.as_numpy("probabilities").sum(axis=1), 1.0, atol=1e-5)
    as_float = httpclient.InferInput(model.input_name, list(x.shape), "FP32")
    as_float.set_data_from_numpy(x.astype(np.float32))
    _expect_error(lambda: client.infer(model.name, [as_float]), "400", "INT64")


def test_async_client_concurrent_requests_are_batch_invariant(server: Server) -> None:
    model = server.pick()
    x = _inputs_for(model, rows=2, seed=6)

    async def scenario() -> None:
        async with aioclient.InferenceServerClient(server.host_port, conn_timeout=120) as triton:
            assert await triton.is_server_live()
            assert await triton.is_server_ready()
            assert await triton.is_model_ready(model.name)
            assert "binary_tensor_data" in (await triton.get_server_metadata())["extensions"]
            assert (await triton.get_model_metadata(model.name))["name"] == model.name

            async def one(seed: int, samples: int) -> dict[str, np.ndarray]:
                tensor = _infer_input(model, x, module=aioclient)
                result = await triton.infer(
                    model.name, [tensor], parameters={"mode": "mc", "samples": samples, "seed": seed}
                )
                return {name: result.as_numpy(name) for name in ("probabilities", "mutual_information")}

            alone = [await one(seed, samples) for seed, samples in [(11, 8), (12, 16), (13, 32)]]
            together = await asyncio.gather(*(one(s, t) for s, t in [(11, 8), (12, 16), (13, 32)] * 4))
            for index, result in enumerate(together):
                for name, value in result.items():
                    np.testing.assert_allclose(value, alone[index % 3][name], rtol=1e-5, atol=1e-6)
            with pytest.raises(InferenceServerException) as info:
                await triton.infer("no-such-model", [_infer_input(model, x, module=aioclient)])
            assert info.value.status() == "404"

    asyncio.run(scenario())


# ------------------------------------------------------------------------------------------- bad input
def test_bad_requests_through_the_client(server: Server, client: httpclient.InferenceServerClient) -> None:
    model = server.pick()
    x = _inputs_for(model, rows=2, seed=7)
    good = _infer_input(model, x)
    mc = {"mode": "mc", "samples": 4}
    _expect_error(lambda: client.infer("no-such-model", [good]), "404", "no-such-model")
    _expect_error(lambda: client.infer(model.name, [good], model_version="999"), "404", "999")
    _expect_error(
        lambda: client.infer(model.name, [good], outputs=[httpclient.InferRequestedOutput("nope")]),
        "400",
        "nope",
    )
    _expect_error(
        lambda: client.infer(model.name, [good], outputs=[httpclient.InferRequestedOutput("std")]),
        "400",
        "std",
    )
    _expect_error(
        lambda: client.infer(model.name, [good], parameters={"mode": "mc", "samples": MAX_SAMPLES + 1}),
        "400",
        "num_samples",
    )
    _expect_error(
        lambda: client.infer(model.name, [good], parameters={"mode": "mc", "samples": 4, "num_samples": 4}),
        "400",
        "num_samples",
    )
    _expect_error(lambda: client.infer(model.name, [good], parameters={"mode": "bayes"}), "400", "mode")
    _expect_error(lambda: client.infer(model.name, [good], parameters={"sample": 4}), "400", "sample")
    _expect_error(lambda: client.infer(model.name, [good], parameters={"samples": 4}), "400", "mc")
    _expect_error(lambda: client.infer(model.name, [good], parameters={**mc, "seed": "x"}), "400", "seed")
    as_double = httpclient.InferInput(model.input_name, list(x.shape), "FP64")
    as_double.set_data_from_numpy(x.astype(np.float64))
    _expect_error(lambda: client.infer(model.name, [as_double]), "400", "FP64")
    as_half = httpclient.InferInput(model.input_name, list(x.shape), "FP16")
    as_half.set_data_from_numpy(x.astype(np.float16))
    _expect_error(lambda: client.infer(model.name, [as_half]), "400", "FP16")
    as_bytes = httpclient.InferInput(model.input_name, [x.shape[0]], "BYTES")
    as_bytes.set_data_from_numpy(np.array([b"a", b"b"][: x.shape[0]], dtype=object))
    _expect_error(lambda: client.infer(model.name, [as_bytes]), "400", "BYTES")
    wrong_name = httpclient.InferInput("not_the_input", list(x.shape), "FP32")
    wrong_name.set_data_from_numpy(x)
    _expect_error(lambda: client.infer(model.name, [wrong_name]), "400", "not_the_input")
    flat = x.reshape(x.shape[0], -1)[:, :-1].copy()
    wrong_shape = httpclient.InferInput(model.input_name, list(flat.shape), "FP32")
    wrong_shape.set_data_from_numpy(flat)
    _expect_error(lambda: client.infer(model.name, [wrong_shape]), "400", "shape")
    for bad in (np.nan, np.inf):
        poisoned = x.copy()
        poisoned.reshape(-1)[3] = bad
        _expect_error(lambda p=poisoned: client.infer(model.name, [_infer_input(model, p)]), "400", "NaN")


def _raw(server: Server, model: ServedModel, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    request = httpx.Request("POST", f"{server.url}/v2/models/{model.name}/infer", content=body, headers=headers)
    request.headers.pop("content-type", None)
    with httpx.Client(timeout=60) as http:
        return http.send(request)


def _binary_body(model: ServedModel, x: np.ndarray) -> tuple[bytes, int]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": model.input_name,
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "parameters": {"binary_data_output": False},
        }
    ).encode()
    return header + x.tobytes(), len(header)


def test_raw_http_bodies(server: Server) -> None:
    model = server.pick()
    x = _inputs_for(model, rows=2, seed=8)
    body, length = _binary_body(model, x)
    ok = _raw(server, model, body, {"Inference-Header-Content-Length": str(length)})
    assert ok.status_code == 200, ok.text
    assert "inference-header-content-length" not in ok.headers
    probabilities = np.asarray(ok.json()["outputs"][0]["data"], dtype=np.float32)
    cases: list[tuple[bytes, dict[str, str], int, str]] = [
        (body, {"Inference-Header-Content-Length": "abc"}, 400, "Inference-Header-Content-Length"),
        (
            body,
            {"Inference-Header-Content-Length": str(len(body) + 1)},
            400,
            "Inference-Header-Content-Length",
        ),
        (body, {"Inference-Header-Content-Length": str(length - 1)}, 400, "JSON"),
        (body, {}, 400, "JSON"),
        (body[:-3], {"Inference-Header-Content-Length": str(length)}, 400, "past the end"),
        (body + b"\0" * 4, {"Inference-Header-Content-Length": str(length)}, 400, "unclaimed"),
        (b"{not json", {}, 400, "JSON"),
        (b"", {}, 400, "JSON"),
        (b"\0" * (MAX_BODY + 1), {}, 413, "limit"),
        (gzip.compress(b" " * (MAX_BODY + 10)), {"Content-Encoding": "gzip"}, 413, "limit"),
        (
            body,
            {"Content-Encoding": "br", "Inference-Header-Content-Length": str(length)},
            415,
            "Content-Encoding",
        ),
    ]
    for content, headers, status, fragment in cases:
        response = _raw(server, model, content, headers)
        assert response.status_code == status, (headers, response.text)
        error = response.json()["error"]
        assert isinstance(error, str)
        assert fragment in error, error
    packed = _raw(
        server,
        model,
        gzip.compress(body),
        {"Content-Encoding": "gzip", "Inference-Header-Content-Length": str(length)},
    )
    assert packed.status_code == 200, packed.text
    np.testing.assert_array_equal(np.asarray(packed.json()["outputs"][0]["data"], dtype=np.float32), probabilities)
    nan_body = json.dumps(
        {"inputs": [{"name": model.input_name, "datatype": "FP32", "shape": [1, 1], "data": [float("nan")]}]}
    ).encode()
    response = _raw(server, model, nan_body)
    assert response.status_code == 400
    assert "error" in response.json()


def test_response_compression(server: Server, client: httpclient.InferenceServerClient) -> None:
    model = server.pick()
    x = _inputs_for(model, rows=8, seed=9)
    params = {"mode": "mc", "samples": 32, "seed": 7, "return_samples": True}
    plain = client.infer(model.name, [_infer_input(model, x)], parameters=params)
    packed = client.infer(
        model.name,
        [_infer_input(model, x)],
        parameters=params,
        request_compression_algorithm="deflate",
        response_compression_algorithm="gzip",
    )
    np.testing.assert_array_equal(plain.as_numpy("samples"), packed.as_numpy("samples"))
    raw = httpx.post(
        f"{server.url}/v2/models/{model.name}/infer",
        content=json.dumps(
            {
                "inputs": [
                    {
                        "name": model.input_name,
                        "datatype": "FP32",
                        "shape": list(x.shape),
                        "data": x.ravel().tolist(),
                    }
                ],
                "parameters": params,
            }
        ),
        headers={"Accept-Encoding": "gzip"},
    )
    assert raw.status_code == 200
    assert raw.headers["content-encoding"] == "gzip"
    np.testing.assert_array_equal(
        np.asarray(raw.json()["outputs"][-1]["data"], dtype=np.float32).reshape(plain.as_numpy("samples").shape),
        plain.as_numpy("samples"),
    )


def test_corrupted_bodies_never_give_500(server: Server) -> None:
    model = server.pick()
    x = _inputs_for(model, rows=2, seed=10)
    body, length = _binary_body(model, x)
    rng = np.random.default_rng(12)
    statuses: list[int] = []
    with httpx.Client(timeout=60) as http:
        for data, header_length in mutations(body, length, rng)[:60]:
            headers = {} if header_length is None else {"Inference-Header-Content-Length": str(header_length)}
            response = http.post(f"{server.url}/v2/models/{model.name}/infer", content=data, headers=headers)
            statuses.append(response.status_code)
            assert response.status_code < 500, response.text
            if response.status_code != 200:
                assert isinstance(response.json()["error"], str)
    assert 400 in statuses


@pytest.mark.slow
def test_onnxruntime_backend_answers_like_torch(
    server: Server,
    client: httpclient.InferenceServerClient,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    model = server.pick(mc=False)
    x = _inputs_for(model, rows=4, seed=13)
    torch_result = client.infer(model.name, [_infer_input(model, x)])
    repository = build_onnx_repository(request, tmp_path_factory.mktemp("v2onnx"))
    with (
        running_server(repository, "--device", "cpu", "--backend", "onnxruntime", timeout=90) as url,
        httpclient.InferenceServerClient(url.removeprefix("http://"), network_timeout=120.0) as ort,
    ):
        meta = ort.get_model_metadata(model.name)
        assert meta["platform"] == "dropwise_onnxruntime"
        assert meta["parameters"]["backend"] == "onnxruntime"
        result = ort.infer(model.name, [_infer_input(model, x)])
        assert result.get_response()["parameters"]["backend"] == "onnxruntime"
        np.testing.assert_allclose(
            result.as_numpy("probabilities"), torch_result.as_numpy("probabilities"), rtol=1e-4, atol=1e-6
        )
        np.testing.assert_array_equal(result.as_numpy("predictions"), torch_result.as_numpy("predictions"))
        names = {output["name"] for output in meta["outputs"]}
        if meta["parameters"]["mc_available"]:
            assert set(MC_NAMES) <= names
            mc = ort.infer(model.name, [_infer_input(model, x)], parameters={"mode": "mc", "samples": 4})
            assert mc.as_numpy("mutual_information").shape == (4,)
        else:
            assert names == {"probabilities", "predictions"}
            assert meta["parameters"]["modes"] == ["deterministic"]
            _expect_error(
                lambda: ort.infer(model.name, [_infer_input(model, x)], parameters={"mode": "mc"}),
                "400",
                "MC",
            )


@pytest.mark.slow
def test_deadline_and_full_queue(server: Server, client: httpclient.InferenceServerClient) -> None:
    model = server.pick()
    x = _inputs_for(model, rows=1, seed=14)
    # The Triton client's `timeout` (microseconds) becomes the request's deadline.
    _expect_error(lambda: client.infer(model.name, [_infer_input(model, x)], timeout=1), "504", "deadline")
    big = _inputs_for(model, rows=64, seed=15)
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": model.input_name,
                    "datatype": "FP32",
                    "shape": list(big.shape),
                    "data": big.ravel().tolist(),
                }
            ],
            "parameters": {"mode": "mc", "samples": MAX_SAMPLES},
        }
    )
    env = {"DROPWISE_QUEUE_CAPACITY": "1", "DROPWISE_MAX_BATCH_SIZE": "1", "DROPWISE_LOG_LEVEL": "warning"}

    async def burst(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as http:
            calls = (http.post(f"{url}/v2/models/{model.name}/infer", content=body) for _ in range(12))
            return await asyncio.gather(*calls)

    with running_server(server.repository, "--device", "cpu", env=env, timeout=90) as url:
        responses = asyncio.run(burst(url))
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses
    assert 429 in statuses
    assert set(statuses) <= {200, 429}
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert isinstance(refused.json()["error"], str)
