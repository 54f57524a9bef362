"""Defects an attacker's probe found, each pinned by a test that failed before its fix (in process).

The real app, real packages and real runtimes: a V2 BYTES shape larger than its payload (was a 500), every
answer counted in `/metrics` (4xx were not), booleans among numbers (were read as 1.0), work past its
deadline stopped, the largest request refused up front, load shed before the body is parsed, no redirect
built from `Host`, request ids echoed, bearer tokens, CORS off by default, errors rendered by handlers.
"""

from __future__ import annotations

import asyncio
import json
import struct
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from dropwise.service.app import create_app
from dropwise.service.errors import ServiceError
from dropwise.service.settings import Settings
from dropwise.service.v2_codec import V2CodecError, decode_body
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from test_service_fixtures import build_service_repository

from dropwise.errors import DropwiseError

URL = "/v1/models/mlp_digits/predict"


@pytest.fixture(scope="module")
def repo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_service_repository(request, tmp_path_factory.mktemp("svc"))


@pytest.fixture(scope="module")
def client(repo: Path):
    with TestClient(create_app(Settings(repository=repo)), raise_server_exceptions=False) as c:
        yield c


def _x(n: int, seed: int = 0) -> list[list[float]]:
    return np.random.default_rng(seed).integers(0, 17, size=(n, 64)).astype(float).tolist()


def _run(settings: Settings, body: Callable[[httpx.AsyncClient], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://svc", timeout=120) as c:
                return await body(c)

    return asyncio.run(main())


def _counts(text: str) -> dict[tuple[str, str, str, str], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "dropwise_requests_total":
                labels = s.labels
                out[(labels["model"], labels["route"], labels["mode"], labels["status"])] = s.value
    return out


# ------------------------------------------------------------------------------------------ error base
def test_every_service_error_is_a_dropwise_error() -> None:
    assert issubclass(ServiceError, DropwiseError)
    assert issubclass(V2CodecError, ServiceError)
    assert V2CodecError("bad", 415).status == 415


# ------------------------------------------------------------------------------------------ V2 BYTES
def test_bytes_shape_larger_than_its_payload_is_refused_before_allocating() -> None:
    head = json.dumps(
        {"inputs": [{"name": "w", "datatype": "BYTES", "shape": [1, 10**12], "parameters": {"binary_data_size": 8}}]}
    ).encode()
    payload = struct.pack("<I", 4) + b"abcd"
    with pytest.raises(V2CodecError, match="declares 1000000000000 BYTES elements"):
        decode_body(head + payload, len(head))


def test_bytes_shape_larger_than_its_payload_answers_400_over_http(client: TestClient) -> None:
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "BYTES",
                    "shape": [1, 10**12],
                    "parameters": {"binary_data_size": 8},
                }
            ]
        }
    ).encode()
    r = client.post(
        "/v2/models/mlp_digits/infer",
        content=head + struct.pack("<I", 4) + b"abcd",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert r.status_code == 400, r.text
    assert "BYTES elements" in r.json()["error"]
    assert r.headers["x-request-id"]


# ------------------------------------------------------------------------------------------ metrics
def test_every_answer_is_counted_by_model_route_mode_and_status(repo: Path) -> None:
    v2 = "/v2/models/mlp_digits/infer"

    async def body(c: httpx.AsyncClient) -> str:
        assert (await c.post(URL, json={"inputs": _x(1), "mode": "mc", "samples": 4})).status_code == 200
        assert (await c.post(URL, json={"inputs": _x(1), "samples": "x"})).status_code == 422
        assert (await c.post(URL, json={"inputs": [[1.0]]})).status_code == 400
        assert (await c.post(URL, content=b"x" * 5000)).status_code == 413
        assert (await c.post(v2, content=b"{}", headers={"content-encoding": "br"})).status_code == 415
        assert (await c.post(v2, content=b"not json")).status_code == 400
        assert (await c.post("/v2/models/nope/infer", content=b"{}")).status_code == 404
        assert (await c.get("/no/such/route")).status_code == 404
        return (await c.get("/metrics")).text

    counts = _counts(_run(Settings(repository=repo, max_body_bytes=4096), body))
    predict = "/v1/models/{name}/predict"
    infer = "/v2/models/{model}/infer"
    assert counts[("mlp_digits", predict, "mc", "200")] == 1
    assert counts[("mlp_digits", predict, "_none", "422")] == 1
    assert counts[("mlp_digits", predict, "deterministic", "400")] == 1
    assert counts[("mlp_digits", predict, "_none", "413")] == 1
    assert counts[("mlp_digits", infer, "_none", "415")] == 1
    assert counts[("mlp_digits", infer, "_none", "400")] == 1
    assert counts[("_unknown", infer, "_none", "404")] == 1
    assert counts[("_none", "_unmatched", "_none", "404")] == 1


# ------------------------------------------------------------------------------------------ booleans
@pytest.mark.parametrize("row", [[True] + [0.5] * 63, [0.5] * 63 + [False]])
def test_booleans_among_numbers_are_refused(client: TestClient, row: list[Any]) -> None:
    r = client.post(URL, json={"inputs": [row]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["field"] == "inputs" and "true/false" in r.json()["error"]["message"]
    tokens = client.post("/v1/models/embedding_digits_tokens/predict", json={"inputs": [[True] + [1] * 63]})
    assert tokens.status_code == 400


# ------------------------------------------------------------------------------------------ deadlines
def test_work_past_its_deadline_is_abandoned_midway(repo: Path) -> None:
    """A request that cannot finish before its deadline answers 504 and its computation stops."""
    settings = Settings(repository=repo, max_samples=4096, max_mc_sample_rows=10**7, max_rows_per_request=1024)
    huge = {"inputs": _x(1024, 1), "mode": "mc", "samples": 4096, "seed": 1, "timeout_s": 0.3}

    async def body(c: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response, str]:
        late = await c.post(URL, json=huge)
        after = await c.post(URL, json={"inputs": _x(1), "mode": "mc", "samples": 4})
        return late, after, (await c.get("/metrics")).text

    late, after, metrics = _run(settings, body)
    assert late.status_code == 504 and late.json()["error"]["field"] == "timeout"
    assert after.status_code == 200
    abandoned = [
        s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
        if s.name == "dropwise_abandoned_batches_total"
    ]
    assert abandoned == [1.0]


def test_onnx_runtime_run_past_its_deadline_is_terminated_and_frees_the_worker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """ONNX Runtime: the MC graph call in flight is terminated (`RunOptions.terminate`) once its request is
    past its deadline, so the next request is answered long before the abandoned call would have ended."""
    from test_service_fixtures import build_onnx_repository

    onnx_repo = build_onnx_repository(request, tmp_path_factory.mktemp("onnx"))
    settings = Settings(repository=onnx_repo, backend="onnxruntime", max_samples=100_000, max_mc_sample_rows=10**8)

    def mc(rows: int, samples: int, timeout_s: float) -> dict[str, Any]:
        return {"inputs": _x(rows, 1), "mode": "mc", "num_samples": samples, "seed": 1, "timeout_s": timeout_s}

    async def body(c: httpx.AsyncClient) -> tuple[float, float, httpx.Response, httpx.Response, str]:
        rows, samples, full = 64, 256, 0.0
        while full < 1.0 and samples < 100_000:  # size one MC pass to last at least a second, measured here
            samples *= 2
            begin = asyncio.get_running_loop().time()
            assert (await c.post(URL, json=mc(rows, samples, 120))).status_code == 200
            full = asyncio.get_running_loop().time() - begin
        late = await c.post(URL, json=mc(rows, samples, full / 5))
        begin = asyncio.get_running_loop().time()
        after = await c.post(URL, json={"inputs": _x(1), "mode": "mc", "num_samples": 4})
        waited = asyncio.get_running_loop().time() - begin
        return full, waited, late, after, (await c.get("/metrics")).text

    full, waited, late, after, metrics = _run(settings, body)
    print(f"one MC pass {full:.2f} s; the next request answered {waited:.3f} s after the 504")
    assert late.status_code == 504 and late.json()["error"]["field"] == "timeout"
    assert after.status_code == 200
    assert waited < full / 2  # without terminate it would wait for the rest of the call (about 0.8 x full)
    abandoned = [
        s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
        if s.name == "dropwise_abandoned_batches_total"
    ]
    assert abandoned == [1.0]


def test_request_over_the_sample_row_limit_is_refused_up_front_with_413(client: TestClient) -> None:
    r = client.post(URL, json={"inputs": _x(1024), "mode": "mc", "samples": 256})
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert error["field"] == "num_samples" and "65536 sample-rows" in error["message"]
    ok = client.post(URL, json={"inputs": _x(256), "mode": "mc", "samples": 256, "seed": 3})
    assert ok.status_code == 200


# ------------------------------------------------------------------------------------------ load shedding
def test_full_queue_is_shed_before_the_body_is_read(repo: Path) -> None:
    """With the compute thread held and the queue full, even an unparseable body answers 429."""
    settings = Settings(repository=repo, queue_capacity=2, max_queue_delay_ms=0, max_batch_size=1)
    release = threading.Event()

    async def body(c: httpx.AsyncClient) -> list[httpx.Response]:
        batcher = c._transport.app.state.inference._slot("mlp_digits", None).batcher  # type: ignore[attr-defined]
        batcher._executor.submit(release.wait)  # hold the model's one compute thread

        async def until(condition: Callable[[], bool]) -> None:
            for _ in range(3000):
                if condition():
                    return
                await asyncio.sleep(0.01)
            raise AssertionError("the batcher never reached the expected state")

        try:  # one request taken by the worker (waiting for the held thread), then two filling the queue
            queued = [asyncio.ensure_future(c.post(URL, json={"inputs": _x(1, 0)}))]
            await until(lambda: batcher._inflight is not None)
            queued += [asyncio.ensure_future(c.post(URL, json={"inputs": _x(1, i)})) for i in (1, 2)]
            await until(lambda: batcher.depth == 2)
            shed = [await c.post(URL, content=b"{not json"), await c.post("/v2/models/mlp_digits/infer", content=b"{")]
        finally:
            release.set()
        answered = list(await asyncio.gather(*queued))
        return [*shed, *answered, await c.get("/v2/models/mlp_digits/stats")]

    *answers, stats = _run(settings, body)
    # the two shed requests count as failures of the model in Triton's statistics, the three answered as successes
    (model_stats,) = stats.json()["model_stats"]
    assert model_stats["inference_stats"]["fail"]["count"] == 2
    assert model_stats["inference_stats"]["success"]["count"] == 3
    assert [a.status_code for a in answers[:2]] == [429, 429]
    assert all(a.headers["retry-after"] == "1" for a in answers[:2])
    assert answers[0].json()["error"]["type"] == "QueueFull" and isinstance(answers[1].json()["error"], str)
    assert sorted(a.status_code for a in answers[2:]) == [200, 200, 200]


def test_large_bodies_are_parsed_in_the_parsing_process(repo: Path) -> None:
    """Bodies over 1 MiB are parsed in a separate process (JSON parsing holds the GIL, so a thread would
    still stall the event loop); schema errors and booleans travel back as the same 4xx answers."""
    settings = Settings(repository=repo, max_rows_per_request=20000, max_body_bytes=16 << 20)
    rows = np.random.default_rng(0).normal(size=(3000, 64)).round(6).tolist()  # ~2 MiB of JSON
    good = json.dumps({"inputs": rows}).encode()
    schema_error = json.dumps({"inputs": rows, "samples": "many"}).encode()
    booleans = json.dumps({"inputs": [*rows, [True] * 64]}).encode()

    async def body(c: httpx.AsyncClient) -> tuple[list[httpx.Response], bool]:
        answers = [await c.post(URL, content=raw) for raw in (good, schema_error, booleans)]
        pool = c._transport.app.state.parsing  # type: ignore[attr-defined]
        return answers, pool._executor is not None and pool._process_ok

    (ok, invalid, boolean), used_process = _run(settings, body)
    assert used_process
    assert ok.status_code == 200 and len(ok.json()["predictions"]) == 3000
    assert invalid.status_code == 422 and invalid.json()["error"]["field"] == "samples"
    assert boolean.status_code == 400 and "true/false" in boolean.json()["error"]["message"]


# ------------------------------------------------------------------------------------------ headers
def test_no_redirect_is_built_from_the_host_header(client: TestClient) -> None:
    r = client.get("/v1/models/", headers={"host": "attacker.example"}, follow_redirects=False)
    assert r.status_code == 404 and "location" not in r.headers
    assert "attacker" not in r.text


def test_request_id_is_echoed_or_generated_on_every_answer(client: TestClient, repo: Path) -> None:
    r = client.get("/v1/models", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    bad = client.post(URL, json={"inputs": [[1.0]]}, headers={"X-Request-ID": "abc-124"})
    assert bad.status_code == 400 and bad.headers["x-request-id"] == "abc-124"
    generated = client.get("/healthz").headers["x-request-id"]
    assert len(generated) == 32 and generated != client.get("/healthz").headers["x-request-id"]
    spoofed = client.get("/healthz", headers={"X-Request-ID": "a b<script>" + "y" * 300})
    assert len(spoofed.headers["x-request-id"]) == 32  # not echoed: not a short printable token
    app = create_app(Settings(repository=repo))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("internals")

    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/boom", headers={"X-Request-ID": "crash-1"})
        assert r.status_code == 500 and r.headers["x-request-id"] == "crash-1"


def test_bearer_tokens_guard_inference_not_health(repo: Path) -> None:
    settings = Settings(repository=repo, api_token="s3cret-api", admin_token="s3cret-admin")
    with TestClient(create_app(settings)) as c:
        for method, path in (("get", "/v1/models"), ("post", URL), ("post", "/v2/models/mlp_digits/infer")):
            r = getattr(c, method)(path)
            assert r.status_code == 401, (path, r.text)
            assert r.headers["www-authenticate"].startswith("Bearer")
        wrong = c.post(URL, json={"inputs": _x(1)}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        for token in ("s3cret-api", "s3cret-admin"):
            ok = c.post(URL, json={"inputs": _x(1)}, headers={"Authorization": f"Bearer {token}"})
            assert ok.status_code == 200
        for path in ("/healthz", "/readyz", "/metrics", "/v2/health/ready", "/v2/health/live"):
            assert c.get(path).status_code == 200, path


def test_admin_dependency_refuses_without_a_configured_token(repo: Path) -> None:
    from dropwise.service.deps import AdminOnly

    for settings, headers, status in (
        (Settings(repository=repo), {}, 403),
        (Settings(repository=repo, admin_token="adm"), {}, 401),
        (Settings(repository=repo, admin_token="adm"), {"Authorization": "Bearer api"}, 401),
        (Settings(repository=repo, admin_token="adm"), {"Authorization": "Bearer adm"}, 200),
    ):
        app = create_app(settings)
        app.add_api_route("/v2/repository/index", lambda: {"ok": True}, methods=["POST"], dependencies=[AdminOnly])
        with TestClient(app) as c:
            r = c.post("/v2/repository/index", headers=headers)
            assert r.status_code == status, (settings.admin_token, headers, r.text)
            if status == 403:
                assert "DROPWISE_ADMIN_TOKEN" in r.json()["error"]


def test_cors_is_off_unless_origins_are_configured(repo: Path) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    with TestClient(create_app(Settings(repository=repo))) as c:
        assert "access-control-allow-origin" not in c.options(URL, headers=preflight).headers
        assert "access-control-allow-origin" not in c.get("/v1/models", headers={"Origin": "https://x"}).headers
    with TestClient(create_app(Settings(repository=repo, cors_origins="https://app.example"))) as c:
        r = c.options(URL, headers=preflight)
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        other = c.options(URL, headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


# ------------------------------------------------------------------------------------------ first request
def test_every_model_has_an_example_body_that_predict_accepts(client: TestClient) -> None:
    for model in ("mlp_digits", "embedding_digits_tokens", "mlp_diabetes"):
        example = client.get(f"/v1/models/{model}/example")
        assert example.status_code == 200, example.text
        body = example.json()
        assert body["mode"] == "mc" and body["seed"] == 0 and len(body["inputs"]) == 2
        first = client.post(f"/v1/models/{model}/predict", json=body)
        assert first.status_code == 200, first.text
        again = client.post(f"/v1/models/{model}/predict", json=body).json()
        assert first.json().get("probabilities", first.json().get("mean")) == again.get(
            "probabilities", again.get("mean")
        )
    assert client.get("/v1/models/nope/example").status_code == 404


def _raw_test_rows(dataset: str, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(raw rows, the same rows preprocessed) of `dataset`'s test split: the raw rows are found in the
    scikit-learn source data (the inverse of the standardisation picks each row out), not computed."""
    from dropwise.models.data import load_dataset
    from sklearn.datasets import load_diabetes, load_digits

    ds = load_dataset(dataset)
    ready = ds.test[0][:rows].numpy()
    norm: dict[str, Any] = ds.normalisation
    if dataset == "digits_tokens":
        source, approx = load_digits().data, ready.astype(np.float64)
    elif dataset == "digits":
        source, approx = load_digits().data, (ready * norm["std"] + norm["mean"]) * norm["scale"]
    else:
        source = load_diabetes(scaled=False).data
        approx = ready * np.asarray(norm["std"]) + np.asarray(norm["mean"])
    nearest = np.abs(source[None, :, :] - approx[:, None, :]).max(axis=2).argmin(axis=1)
    raw = source[nearest]
    np.testing.assert_allclose(raw, approx, rtol=1e-4, atol=1e-3)  # really the same rows
    return raw, ready


@pytest.mark.parametrize(
    ("model", "dataset"),
    [("mlp_digits", "digits"), ("embedding_digits_tokens", "digits_tokens"), ("mlp_diabetes", "diabetes")],
)
def test_raw_test_rows_with_preprocess_answer_as_the_preprocessed_rows(
    client: TestClient, model: str, dataset: str
) -> None:
    raw, ready = _raw_test_rows(dataset, 4)
    url = f"/v1/models/{model}/predict"
    for request in ({"mode": "deterministic"}, {"mode": "mc", "num_samples": 8, "seed": 5}):
        by_hand = client.post(url, json={**request, "inputs": ready.tolist()})
        by_server = client.post(url, json={**request, "inputs": raw.tolist(), "preprocess": True})
        assert by_hand.status_code == by_server.status_code == 200, by_server.text
        key = "mean" if dataset == "diabetes" else "probabilities"
        np.testing.assert_allclose(by_server.json()[key], by_hand.json()[key], atol=1e-5)
    if dataset == "digits_tokens":  # a raw value the token model cannot take: 400, not a 500
        bad = client.post(url, json={"inputs": [[17.0] * 64], "preprocess": True})
        assert bad.status_code == 400 and bad.json()["error"]["field"] == "preprocess"


def test_a_package_without_recorded_preprocessing_numbers_refuses_preprocess_with_400(client: TestClient) -> None:
    from dataclasses import replace

    from dropwise.service.errors import InvalidInput
    from dropwise.service.examples import preprocess

    spec = client.app.state.inference.spec("mlp_digits")  # type: ignore[attr-defined]
    training = {k: v for k, v in spec.manifest["training"].items() if k != "normalisation"}
    old = replace(spec, manifest={**spec.manifest, "training": training})  # as written before it was recorded
    with pytest.raises(InvalidInput, match="records no numeric preprocessing") as caught:
        preprocess(old, [[0.0] * 64])
    assert caught.value.status == 400 and caught.value.field == "preprocess"
