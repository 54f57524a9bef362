"""The inference routes served as plain Starlette routes (`dropwise.service.routes.hot_paths`), in process.

They must be what answers the four inference paths, and answer exactly as FastAPI's routes did: the API
token, the `/metrics` route label, 405 and 422 in the API's error format, and the OpenAPI schema still
documenting the bodies.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dropwise.service.app import create_app
from dropwise.service.routes.hot_paths import HotRoute
from dropwise.service.settings import Settings
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from test_service_fixtures import build_service_repository

TOKEN = "hot-path-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def client(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    repo: Path = build_service_repository(request, tmp_path_factory.mktemp("svc"))
    app = create_app(Settings(repository=repo, device="cpu", api_token=TOKEN))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _rows(n: int) -> list[list[float]]:
    return np.random.default_rng(0).normal(size=(n, 64)).round(3).tolist()


def _answers(client: TestClient) -> dict[tuple[str, str, str], float]:
    out = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name == "dropwise_requests_total" and s.labels["route"] != "/metrics":
                out[(s.labels["route"], s.labels["mode"], s.labels["status"])] = s.value
    return out


def test_the_inference_paths_are_the_plain_routes_and_come_first(client: TestClient) -> None:
    routes = client.app.router.routes  # type: ignore[attr-defined]
    hot = [route for route in routes[:4] if isinstance(route, HotRoute)]
    assert [route.path_format for route in hot] == [
        "/v1/models/{name}/predict",
        "/v1/models/{name}/versions/{version}/predict",
        "/v2/models/{model}/infer",
        "/v2/models/{model}/versions/{version}/infer",
    ]
    schema = client.get("/openapi.json").json()["paths"]
    assert "requestBody" in schema["/v1/models/{name}/predict"]["post"]
    assert "/v2/models/{model}/versions/{version}/infer" in schema


def test_token_labels_and_errors_as_before(client: TestClient) -> None:
    body = {"inputs": _rows(2), "mode": "mc", "num_samples": 4, "seed": 1}
    before = _answers(client)
    missing = client.post("/v1/models/mlp_digits/predict", json=body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    assert "error" in missing.json() and missing.headers["x-request-id"]
    ok = client.post("/v1/models/mlp_digits/predict", json=body, headers=AUTH)
    assert ok.status_code == 200 and ok.json()["num_samples"] == 4
    versioned = client.post("/v1/models/mlp_digits/versions/1/predict", json=body, headers=AUTH)
    assert versioned.status_code == 200 and versioned.json()["probabilities"] == ok.json()["probabilities"]
    not_a_number = client.post("/v1/models/mlp_digits/versions/abc/predict", json=body, headers=AUTH)
    assert not_a_number.status_code == 422 and not_a_number.json()["error"]["field"] == "version"
    wrong_method = client.get("/v1/models/mlp_digits/predict", headers=AUTH)
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
    v2 = client.post(
        "/v2/models/mlp_digits/versions/1/infer",
        json={"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": _rows(2)}]},
        headers=AUTH,
    )
    assert v2.status_code == 200 and v2.json()["model_version"] == "1"
    bad_version = client.post("/v2/models/mlp_digits/versions/x/infer", json={}, headers=AUTH)
    assert bad_version.status_code == 400 and "version" in bad_version.json()["error"]

    after = _answers(client)
    counted = {key: value - before.get(key, 0.0) for key, value in after.items() if value != before.get(key, 0.0)}
    assert counted == {
        ("/v1/models/{name}/predict", "_none", "401"): 1,
        ("/v1/models/{name}/predict", "mc", "200"): 1,
        ("/v1/models/{name}/versions/{version}/predict", "mc", "200"): 1,
        ("/v1/models/{name}/versions/{version}/predict", "_none", "422"): 1,
        ("/v1/models/{name}/predict", "_none", "405"): 1,
        ("/v2/models/{model}/versions/{version}/infer", "deterministic", "200"): 1,
        ("/v2/models/{model}/versions/{version}/infer", "_none", "400"): 1,
    }
