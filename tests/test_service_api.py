"""The native API, in process: real packages, the real app (lifespan, batcher, runtimes), real HTTP clients.

Covers model listing and description, deterministic and MC predictions checked against the network run
directly, regression units, token models, seeds, errors for bad input on every route, body limits,
readiness, the OpenAPI schema and the catch-all 500. Every app is pinned to `device="cpu"` because the
tests assert it (`auto` picks a GPU wherever torch sees one); the GPU runs live in `test_service_cuda.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from dropwise.package import load_package
from dropwise.service.app import create_app
from dropwise.service.schemas import PREDICT_EXAMPLES
from dropwise.service.settings import Settings
from fastapi.testclient import TestClient
from test_service_fixtures import build_service_repository


@pytest.fixture(scope="module")
def repo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_service_repository(request, tmp_path_factory.mktemp("svc"))


@pytest.fixture(scope="module")
def client(repo: Path):
    app = create_app(Settings(repository=repo, device="cpu", max_samples=64, max_rows_per_request=32))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _digits(n: int, seed: int = 0) -> list[list[float]]:
    return np.random.default_rng(seed).integers(0, 17, size=(n, 64)).astype(float).tolist()


def _field(response: httpx.Response) -> str | None:
    body = response.json()
    assert "detail" not in body
    assert "Traceback" not in response.text
    return body["error"]["field"]


def test_list_and_describe_models(client: TestClient, repo: Path) -> None:
    listed = client.get("/v1/models").json()["models"]
    assert [m["name"] for m in listed] == sorted(["mlp_digits", "embedding_digits_tokens", "mlp_diabetes"])
    assert all(m["ready"] and m["backend"] == "torch" and m["device"] == "cpu" for m in listed)
    info = client.get("/v1/models/mlp_digits").json()
    manifest = load_package(repo / "mlp_digits" / str(info["version"]), build=False).manifest
    assert info["input"] == {
        "name": manifest.input.name,
        "shape": manifest.input.shape,
        "dtype": "float32",
        "preprocessing": manifest.input.preprocessing,
        "range": None,
    }
    assert info["inputs"] == [info["input"]]  # one-input models list their one input
    assert info["labels"] == manifest.labels
    assert info["task"] == "classification" and info["sites"] == manifest.sites
    assert info["provider"] == "torch-cpu" and info["mc_available"] is True
    assert info["versions"] == [info["version"]]
    same = client.get(f"/v1/models/mlp_digits/versions/{info['version']}").json()
    assert same == info


def test_deterministic_matches_the_network(client: TestClient, repo: Path) -> None:
    x = _digits(5)
    body = client.post("/v1/models/mlp_digits/predict", json={"inputs": x}).json()
    model = load_package(repo / "mlp_digits" / str(body["version"])).model
    with torch.no_grad():
        expected = torch.softmax(model(torch.tensor(x, dtype=torch.float32)), dim=-1).numpy()
    np.testing.assert_allclose(body["probabilities"], expected, rtol=1e-5, atol=1e-6)
    labels = client.get("/v1/models/mlp_digits").json()["labels"]
    assert body["predictions"] == [labels[i] for i in expected.argmax(axis=1)]
    assert body["mode"] == "deterministic" and "uncertainty" not in body and "seed" not in body


def test_mc_prediction_summaries_and_seeds(client: TestClient) -> None:
    x = _digits(3, seed=1)
    req = {"inputs": x, "mode": "mc", "num_samples": 16, "seed": 11, "return_samples": True}
    a = client.post("/v1/models/mlp_digits/predict", json=req).json()
    b = client.post("/v1/models/mlp_digits/predict", json=req).json()
    assert a["probabilities"] == b["probabilities"] and a["uncertainty"] == b["uncertainty"]
    c = client.post("/v1/models/mlp_digits/predict", json={**req, "seed": 12}).json()
    assert c["probabilities"] != a["probabilities"]
    samples = np.asarray(a["samples"])  # per-sample probabilities
    assert samples.shape == (16, 3, 10)
    np.testing.assert_allclose(samples.sum(axis=2), 1.0, atol=1e-5)
    # the summaries are those of the returned per-sample probabilities
    mean = samples.mean(axis=0)
    np.testing.assert_allclose(a["probabilities"], mean, atol=1e-5)
    u = a["uncertainty"]
    entropy = -(mean * np.log(np.clip(mean, 1e-30, None))).sum(axis=1)
    expected_entropy = -(samples * np.log(np.clip(samples, 1e-30, None))).sum(axis=2).mean(axis=0)
    np.testing.assert_allclose(u["predictive_entropy"], entropy, atol=1e-4)
    np.testing.assert_allclose(u["expected_entropy"], expected_entropy, atol=1e-4)
    np.testing.assert_allclose(u["mutual_information"], np.maximum(entropy - expected_entropy, 0), atol=1e-4)
    votes = samples.argmax(axis=2)
    modal = np.array([np.bincount(votes[:, i], minlength=10).max() for i in range(3)])
    np.testing.assert_allclose(u["variation_ratio"], 1 - modal / 16, atol=1e-6)
    np.testing.assert_allclose(u["std"], samples.std(axis=0), atol=1e-5)
    assert a["num_samples"] == 16 and a["seed"] == 11
    # samples really differ (dropout is on), and T=1 has no spread
    assert samples.std(axis=0).max() > 1e-4
    # `samples` in a request is the deprecated alias of `num_samples`
    one = client.post("/v1/models/mlp_digits/predict", json={"inputs": x, "mode": "mc", "samples": 1}).json()
    assert one["num_samples"] == 1 and "samples" not in one
    assert max(one["uncertainty"]["mutual_information"]) == 0.0
    assert isinstance(one["seed"], int)


def test_mc_default_samples_and_version_route(client: TestClient) -> None:
    info = client.get("/v1/models/mlp_digits").json()
    body = client.post(
        f"/v1/models/mlp_digits/versions/{info['version']}/predict", json={"inputs": _digits(1), "mode": "mc"}
    ).json()
    assert body["num_samples"] == info["default_samples"]


def test_regression_answers_mean_and_std_in_target_units(client: TestClient, repo: Path) -> None:
    info = client.get("/v1/models/mlp_diabetes").json()
    assert info["task"] == "regression" and info["labels"] is None
    loaded = load_package(repo / "mlp_diabetes" / str(info["version"]))
    features = info["input"]["shape"][1]
    x = np.random.default_rng(3).normal(size=(4, features)).tolist()
    det = client.post("/v1/models/mlp_diabetes/predict", json={"inputs": x}).json()
    with torch.no_grad():
        raw = loaded.model(torch.tensor(x, dtype=torch.float32)).numpy()
    target = loaded.manifest.target
    assert target is not None
    np.testing.assert_allclose(det["mean"], raw * target.std + target.mean, rtol=1e-5)
    assert "probabilities" not in det and "predictions" not in det
    mc = client.post("/v1/models/mlp_diabetes/predict", json={"inputs": x, "mode": "mc", "samples": 32}).json()
    assert np.asarray(mc["mean"]).shape == (4, 1) and np.asarray(mc["uncertainty"]["std"]).shape == (4, 1)
    assert min(v[0] for v in mc["uncertainty"]["std"]) > 0
    assert set(mc["uncertainty"]) == {"std"}


def test_token_model_accepts_ids_and_refuses_out_of_vocabulary(client: TestClient) -> None:
    info = client.get("/v1/models/embedding_digits_tokens").json()
    assert info["input"]["dtype"] == "int64"
    length = info["input"]["shape"][1]
    ok = client.post("/v1/models/embedding_digits_tokens/predict", json={"inputs": [[1] * length], "mode": "mc"})
    assert ok.status_code == 200
    as_floats = client.post("/v1/models/embedding_digits_tokens/predict", json={"inputs": [[1.0] * length]})
    assert as_floats.status_code == 200
    for bad in ([[10_000] * length], [[-1] * length], [[0.5] * length]):
        r = client.post("/v1/models/embedding_digits_tokens/predict", json={"inputs": bad})
        assert r.status_code == 400 and _field(r) == "inputs", r.text


BAD_BODIES = [
    ({"inputs": [[1.0, 2.0]]}, 400, "inputs"),  # wrong shape
    ({"inputs": [1.0] * 64}, 400, "inputs"),  # missing batch dimension
    ({"inputs": [[[1.0] * 64]]}, 400, "inputs"),  # one dimension too many
    ({"inputs": [["a"] * 64]}, 400, "inputs"),  # strings
    ({"inputs": [[1.0] * 64, [1.0] * 63]}, 400, "inputs"),  # ragged
    ({"inputs": [[{"x": 1}] * 64]}, 400, "inputs"),  # objects
    ({"inputs": [[True] * 64]}, 400, "inputs"),  # booleans
    ({"inputs": [[1.0] * 64] * 33}, 400, "inputs"),  # more rows than allowed
    ({"inputs": []}, 422, "inputs"),
    ({"inputs": "abc"}, 422, "inputs"),
    ({}, 422, "inputs"),
    ({"inputs": [[1.0] * 64], "mode": "bayes"}, 422, "mode"),
    ({"inputs": [[1.0] * 64], "mode": "mc", "samples": 65}, 400, "num_samples"),
    ({"inputs": [[1.0] * 64], "mode": "mc", "num_samples": 0}, 400, "num_samples"),
    ({"inputs": [[1.0] * 64], "mode": "mc", "num_samples": 4, "samples": 4}, 400, "num_samples"),
    ({"inputs": [[1.0] * 64], "mode": "mc", "num_samples": 8.5}, 422, "num_samples"),
    ({"inputs": [[1.0] * 64], "mode": "mc", "samples": "8"}, 422, "samples"),
    ({"inputs": [[1.0] * 64], "mode": "mc", "seed": -1}, 400, "seed"),
    ({"inputs": [[1.0] * 64], "mode": "mc", "seed": 2**70}, 400, "seed"),
    ({"inputs": [[1.0] * 64], "mode": "mc", "seed": 1.5}, 422, "seed"),
    ({"inputs": [[1.0] * 64], "return_samples": "yes"}, 422, "return_samples"),
    ({"inputs": [[1.0] * 64], "timeout_s": -1}, 422, "timeout_s"),
    ({"inputs": [[1.0] * 64], "unknown": 1}, 422, "unknown"),
]


@pytest.mark.parametrize(("body", "status", "field"), BAD_BODIES)
def test_bad_bodies_answer_4xx_naming_the_field(client: TestClient, body: dict, status: int, field: str) -> None:
    for path in ("/v1/models/mlp_digits/predict", "/v1/models/mlp_digits/versions/{v}/predict"):
        version = client.get("/v1/models/mlp_digits").json()["version"]
        r = client.post(path.format(v=version), json=body)
        assert r.status_code == status, r.text
        assert _field(r) == field


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_nan_and_inf_are_refused(client: TestClient, literal: str) -> None:
    raw = '{"inputs": [[' + ", ".join([literal] + ["1"] * 63) + "]]}"
    r = client.post("/v1/models/mlp_digits/predict", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and _field(r) == "inputs"
    assert "NaN or Inf" in r.json()["error"]["message"]


def test_unknown_model_version_and_route(client: TestClient) -> None:
    x = {"inputs": _digits(1)}
    r = client.post("/v1/models/nope/predict", json=x)
    assert r.status_code == 404 and _field(r) == "model"
    r = client.post("/v1/models/mlp_digits/versions/999/predict", json=x)
    assert r.status_code == 404 and _field(r) == "version"
    r = client.post("/v1/models/mlp_digits/versions/abc/predict", json=x)
    assert r.status_code == 422 and _field(r) == "version"
    assert client.get("/v1/models/nope").status_code == 404
    assert client.get("/v1/models/mlp_digits/versions/0").status_code == 404
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    r = client.get("/v1/models/mlp_digits/predict")
    assert r.status_code == 405 and "error" in r.json()


def test_malformed_json_and_content(client: TestClient) -> None:
    url = "/v1/models/mlp_digits/predict"
    for raw in ('{"inputs": [[1, 2', "not json", "[" * 100_000, "", '"just a string"', "null"):
        r = client.post(url, content=raw, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (raw[:20], r.status_code, r.text)
        assert "error" in r.json()
    r = client.post(url, content=b"\xff\xfe\x00", headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500


def test_body_limit_by_content_length_and_stream(repo: Path) -> None:
    app = create_app(Settings(repository=repo, device="cpu", max_body_bytes=4096))
    with TestClient(app) as c:
        big = {"inputs": _digits(30)}
        r = c.post("/v1/models/mlp_digits/predict", json=big)
        assert r.status_code == 413 and _field(r) == "body"

        def chunks():  # no Content-Length: the streamed body is counted
            yield b'{"inputs": ['
            for _ in range(100):
                yield json.dumps([1.0] * 64).encode() + b","
            yield b"[1]]}"

        r = c.post("/v1/models/mlp_digits/predict", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and _field(r) == "body"
        r = c.post("/v2/models/mlp_digits/infer", content=b"x" * 5000)
        assert r.status_code == 413 and isinstance(r.json()["error"], str)
        small = c.post("/v1/models/mlp_digits/predict", json={"inputs": _digits(1)})
        assert small.status_code == 200


def test_health_readiness_and_zero_models(client: TestClient, tmp_path: Path) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "models": {}, "errors": {}}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert set(ready.json()["models"]) == {"mlp_digits", "embedding_digits_tokens", "mlp_diabetes"}
    with TestClient(create_app(Settings(repository=tmp_path, device="cpu"))) as empty:
        assert empty.get("/healthz").status_code == 200
        r = empty.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "not ready"
        assert empty.get("/v1/models").json() == {"models": []}


def test_tampered_package_keeps_readyz_false_and_others_serving(repo: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(repo, copy)
    weights = next((copy / "mlp_diabetes").glob("*/weights.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with TestClient(create_app(Settings(repository=copy, device="cpu"))) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and any("sha256" in e for e in r.json()["errors"].values())
        assert c.post("/v1/models/mlp_digits/predict", json={"inputs": _digits(1)}).status_code == 200
        assert c.post("/v1/models/mlp_diabetes/predict", json={"inputs": [[0.0] * 10]}).status_code == 404


def test_documented_examples_are_answered(client: TestClient) -> None:
    for name, example in PREDICT_EXAMPLES.items():
        r = client.post("/v1/models/mlp_digits/predict", json=example["value"])
        assert r.status_code == 200, (name, r.text)
        assert r.json()["mode"] == example["value"]["mode"]


def test_openapi_documents_native_routes_with_examples(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path in (
        "/v1/models",
        "/v1/models/{name}",
        "/v1/models/{name}/predict",
        "/v1/models/{name}/versions/{version}/predict",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in spec["paths"], path
    body = spec["paths"]["/v1/models/{name}/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert {"deterministic", "mc"} <= set(body["examples"])
    assert spec["components"]["schemas"]["PredictResponse"]["examples"]
    assert "400" in spec["paths"]["/v1/models/{name}/predict"]["post"]["responses"]


def test_unexpected_exception_answers_json_500_without_traceback(repo: Path) -> None:
    app = create_app(Settings(repository=repo, device="cpu"))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals")

    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/boom")
        assert r.status_code == 500
        assert r.json() == {"error": {"message": "internal server error", "field": None, "type": "ServiceError"}}
        assert "secret" not in r.text
