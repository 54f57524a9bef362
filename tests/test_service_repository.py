"""Model repository control, per-model configuration, statistics and warm-up (Triton's extensions).

The in-process tests drive the real app with `TestClient`; the swap-under-load test runs the real `dropwise
serve` (uvicorn in a subprocess) in poll mode and in explicit mode, sends requests from several concurrent
clients over TCP while a new version is written into the repository, and counts every answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from dropwise.package import PackageError
from dropwise.package.serving import ServingConfig, VersionPolicy, set_serving_config
from dropwise.service.app import create_app
from dropwise.service.settings import Settings
from fastapi.testclient import TestClient
from test_service_fixtures import build_service_repository, running_server
from tritonclient.utils import InferenceServerException

TOKEN = "s3cret-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "mlp_digits"


@pytest.fixture(scope="module")
def source(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_service_repository(request, tmp_path_factory.mktemp("svc"))


@pytest.fixture
def repo(source: Path, tmp_path: Path) -> Path:
    """A private copy of the service repository (each test changes it)."""
    copy = tmp_path / "repo"
    shutil.copytree(source, copy)
    return copy


def add_version(repo: Path, name: str, version: int, *, tamper: bool = False) -> Path:
    """Write `name` version `version` (a copy of its version 1) into `repo` by one atomic rename."""
    staging = repo / f".staging-{name}-{version}"
    shutil.copytree(repo / name / "1", staging)
    manifest = json.loads((staging / "manifest.json").read_text())
    manifest["version"] = version
    (staging / "manifest.json").write_text(json.dumps(manifest))
    if tamper:
        weights = staging / "weights.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    target = repo / name / str(version)
    staging.rename(target)
    return target


def digits(n: int, seed: int = 0) -> list[list[float]]:
    return np.random.default_rng(seed).normal(size=(n, 64)).round(3).tolist()


def app_client(repo: Path, **settings: object) -> TestClient:
    return TestClient(create_app(Settings(repository=repo, device="cpu", admin_token=TOKEN, **settings)))


def index(client: TestClient) -> dict[tuple[str, str], dict[str, str]]:
    answer = client.post("/v2/repository/index", headers=ADMIN)
    assert answer.status_code == 200, answer.text
    return {(e["name"], e["version"]): e for e in answer.json()}


# ------------------------------------------------------------------------------------------ admin token
def test_repository_routes_need_the_admin_token(repo: Path) -> None:
    with TestClient(create_app(Settings(repository=repo, device="cpu"))) as off:
        r = off.post("/v2/repository/index")
        assert r.status_code == 403 and "DROPWISE_ADMIN_TOKEN" in r.json()["error"]
        assert off.post("/v2/repository/index", headers=ADMIN).status_code == 403
    with app_client(repo, model_control="explicit") as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            for path in ("/v2/repository/index", f"/v2/repository/models/{MODEL}/unload"):
                r = client.post(path, headers=headers)
                assert r.status_code == 401, (path, headers, r.text)
                assert r.headers["www-authenticate"].startswith("Bearer")
        assert client.post(f"/v1/models/{MODEL}/predict", json={"inputs": digits(1)}).status_code == 200
        assert client.get("/v2/models/stats").status_code == 200  # statistics stay open, as /metrics


# ------------------------------------------------------------------------------------------ index
def test_index_lists_every_version_with_state_and_reason(repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    add_version(repo, MODEL, 2)
    add_version(repo, MODEL, 3, tamper=True)
    with caplog.at_level(logging.ERROR, logger="dropwise.repository"), app_client(repo) as client:
        entries = index(client)
        assert entries[(MODEL, "2")]["state"] == "READY"
        assert entries[(MODEL, "1")]["state"] == "UNAVAILABLE"
        assert "version policy (latest 1)" in entries[(MODEL, "1")]["reason"]
        assert entries[(MODEL, "3")]["state"] == "UNAVAILABLE"
        assert "sha256" in entries[(MODEL, "3")]["reason"]
        assert entries[("mlp_diabetes", "1")] == {
            "name": "mlp_diabetes",
            "version": "1",
            "state": "READY",
            "reason": "",
        }
        ready = client.post("/v2/repository/index", headers=ADMIN, json={"ready": True}).json()
        assert {(e["name"], e["version"]) for e in ready} == {
            (MODEL, "2"),
            ("mlp_diabetes", "1"),
            ("embedding_digits_tokens", "1"),
        }
        # the refused v3 does not take the server out of service: v2 serves, /readyz stays 200
        assert client.get("/readyz").status_code == 200
        assert "sha256" in client.get("/readyz").json()["errors"][f"{MODEL}/3"]
        answer = client.post(f"/v1/models/{MODEL}/predict", json={"inputs": digits(2)})
        assert answer.status_code == 200 and answer.json()["version"] == 2
        assert client.get(f"/v2/models/{MODEL}/versions/1/ready").status_code == 404
        assert client.post("/v2/repository/index", headers=ADMIN, content=b"[1]").status_code == 400
        assert client.post("/v2/repository/index", headers=ADMIN, json={"ready": "yes"}).status_code == 400
    assert any("refusing mlp_digits/3" in record.getMessage() for record in caplog.records)


# ------------------------------------------------------------------------------------------ explicit control
def test_explicit_load_swaps_in_a_new_version_and_unload_stops_serving(repo: Path) -> None:
    with app_client(repo, model_control="explicit") as client:
        assert client.post(f"/v1/models/{MODEL}/predict", json={"inputs": digits(1)}).json()["version"] == 1
        add_version(repo, MODEL, 2)
        assert index(client)[(MODEL, "2")]["reason"].startswith("new: POST /v2/repository/models/mlp_digits/load")
        # not served until asked
        assert client.post(f"/v1/models/{MODEL}/predict", json={"inputs": digits(1)}).json()["version"] == 1
        assert client.post(f"/v2/repository/models/{MODEL}/load", headers=ADMIN).status_code == 200
        assert client.post(f"/v1/models/{MODEL}/predict", json={"inputs": digits(1)}).json()["version"] == 2
        assert client.get(f"/v2/models/{MODEL}").json()["versions"] == ["2"]

        add_version(repo, MODEL, 3, tamper=True)
        r = client.post(f"/v2/repository/models/{MODEL}/load", headers=ADMIN)
        assert r.status_code == 200, r.text  # v3 is refused; v2, the newest valid version, stays
        assert client.post(f"/v1/models/{MODEL}/predict", json={"inputs": digits(1)}).json()["version"] == 2

        r = client.post(f"/v2/repository/models/{MODEL}/unload", headers=ADMIN, json={"parameters": {}})
        assert r.status_code == 200, r.text
        assert client.post(f"/v1/models/{MODEL}/predict", json={"inputs": digits(1)}).status_code == 404
        assert client.get(f"/v2/models/{MODEL}/ready").status_code == 404
        assert index(client)[(MODEL, "2")]["reason"] in ("unloaded", "draining its queue")
        assert client.get("/readyz").status_code == 200  # what remains is served
        assert client.post("/v1/models/mlp_diabetes/predict", json={"inputs": [[0.0] * 10]}).status_code == 200

        assert client.post("/v2/repository/models/no_such_model/load", headers=ADMIN).status_code == 400
        override = {"parameters": {"config": '{"max_batch_size": 4}'}}
        r = client.post(f"/v2/repository/models/{MODEL}/load", headers=ADMIN, json=override)
        assert r.status_code == 400 and "unsupported parameter(s) ['config']" in r.json()["error"]
        assert client.post("/v2/repository/models/..%2Fetc/load", headers=ADMIN).status_code in (400, 404)
        assert client.post(f"/v2/repository/models/{MODEL}/load", headers=ADMIN).status_code == 200
        assert client.post(f"/v1/models/{MODEL}/predict", json={"inputs": digits(1)}).json()["version"] == 2


def test_load_and_unload_are_refused_unless_control_is_explicit(repo: Path) -> None:
    for mode in ("none", "poll"):
        with app_client(repo, model_control=mode, poll_interval_s=3600) as client:
            for action in ("load", "unload"):
                r = client.post(f"/v2/repository/models/{MODEL}/{action}", headers=ADMIN)
                assert r.status_code == 400 and "DROPWISE_MODEL_CONTROL=explicit" in r.json()["error"], r.text
            assert client.post(f"/v1/models/{MODEL}/predict", json={"inputs": digits(1)}).status_code == 200


def _wait_for(condition: object, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_poll_reloads_a_changed_serving_config_and_keeps_a_damaged_version_serving(repo: Path) -> None:
    with app_client(repo, model_control="poll", poll_interval_s=0.1) as client:
        assert client.get(f"/v1/models/{MODEL}").json()["max_samples"] == 256
        set_serving_config(repo / MODEL / "1", {"max_samples": 12})  # a config change is a new package state
        assert _wait_for(lambda: client.get(f"/v1/models/{MODEL}").json()["max_samples"] == 12)
        r = client.post(f"/v1/models/{MODEL}/predict", json={"inputs": digits(1), "mode": "mc", "samples": 13})
        assert r.status_code == 400

        weights = repo / MODEL / "1" / "weights.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))  # damaged in place: refused on disk, the loaded copy keeps serving
        assert _wait_for(lambda: "sha256" in index(client)[(MODEL, "1")]["reason"])
        entry = index(client)[(MODEL, "1")]
        assert entry["state"] == "READY" and entry["reason"].startswith("serving the copy verified at load")
        assert client.post(f"/v1/models/{MODEL}/predict", json={"inputs": digits(1)}).status_code == 200
        assert client.get("/readyz").status_code == 200

        shutil.rmtree(repo / "mlp_diabetes" / "1")  # removed: retired
        assert _wait_for(lambda: client.get("/v2/models/mlp_diabetes/ready").status_code == 404)
        assert client.post("/v1/models/mlp_diabetes/predict", json={"inputs": [[0.0] * 10]}).status_code == 404
        assert client.get("/readyz").status_code == 200


# ------------------------------------------------------------------------------------------ version policy
def test_version_policy_all_and_specific(repo: Path) -> None:
    add_version(repo, MODEL, 2)
    set_serving_config(repo / MODEL / "2", {"version_policy": {"all": True}})
    with app_client(repo) as client:
        assert client.get(f"/v2/models/{MODEL}").json()["versions"] == ["1", "2"]
        for version in (1, 2):
            r = client.post(f"/v1/models/{MODEL}/versions/{version}/predict", json={"inputs": digits(1)})
            assert r.status_code == 200 and r.json()["version"] == version
        assert client.get(f"/v2/models/{MODEL}/config").json()["version_policy"] == {"all": {}}
    set_serving_config(repo / MODEL / "2", {"version_policy": {"specific": [1]}})
    with app_client(repo) as client:
        assert client.get(f"/v2/models/{MODEL}").json()["versions"] == ["1"]
        assert index(client)[(MODEL, "2")]["reason"] == "not chosen by the version policy (specific 1)"
    assert VersionPolicy(latest=2).select([1, 2, 3]) == [2, 3]
    assert VersionPolicy().select([4, 1]) == [4]
    with pytest.raises(ValueError, match="one of latest, all, specific"):
        VersionPolicy(latest=1, all=True)


# ------------------------------------------------------------------------------------------ per-model config
def test_per_model_configuration_overrides_the_global_settings(repo: Path) -> None:
    config = ServingConfig(
        max_batch_size=8,
        max_queue_delay_ms=2.5,
        queue_capacity=5,
        default_samples=4,
        max_samples=16,
        request_timeout_s=12.0,
    )
    set_serving_config(repo / MODEL / "1", config)
    with pytest.raises(PackageError, match="default_samples"):
        set_serving_config(repo / MODEL / "1", {"default_samples": 20, "max_samples": 16})
    with app_client(repo, max_samples=64, default_samples=32) as client:
        info = client.get(f"/v1/models/{MODEL}").json()
        assert (info["max_samples"], info["default_samples"]) == (16, 4)
        other = client.get("/v1/models/mlp_diabetes").json()
        assert (other["max_samples"], other["default_samples"]) == (64, 32)
        r = client.post(f"/v1/models/{MODEL}/predict", json={"inputs": digits(1), "mode": "mc", "samples": 17})
        assert r.status_code == 400 and r.json()["error"]["field"] == "num_samples"
        r = client.post(f"/v1/models/{MODEL}/predict", json={"inputs": digits(1), "mode": "mc"})
        assert r.status_code == 200 and r.json()["num_samples"] == 4
        served = client.app.state.inference.control.models[MODEL][1]  # type: ignore[attr-defined]
        assert served.batcher.settings.max_batch_size == 8
        assert served.batcher.settings.queue_capacity == 5
        cfg = client.get(f"/v2/models/{MODEL}/config").json()
        assert cfg["max_batch_size"] == 8
        assert cfg["dynamic_batching"]["max_queue_delay_microseconds"] == 2500
        assert cfg["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 5
        assert cfg["dynamic_batching"]["default_queue_policy"]["default_timeout_microseconds"] == 12_000_000
        assert cfg["parameters"]["max_samples"] == {"string_value": "16"}
        assert client.get("/v2/models/mlp_diabetes/config").json()["max_batch_size"] == 64


def test_invalid_serving_configuration_refuses_the_package(repo: Path) -> None:
    manifest_path = repo / MODEL / "1" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["serving"] = {"max_batch_size": 0}
    manifest_path.write_text(json.dumps(manifest))
    with app_client(repo) as client:
        assert client.post(f"/v1/models/{MODEL}/predict", json={"inputs": digits(1)}).status_code == 404
        reason = index(client)[(MODEL, "1")]["reason"]
        assert "serving configuration" in reason and "max_batch_size" in reason
        assert client.get("/readyz").status_code == 503  # a model with no servable version
        assert client.post("/v1/models/mlp_diabetes/predict", json={"inputs": [[0.0] * 10]}).status_code == 200


# ------------------------------------------------------------------------------------------ warm-up
def test_each_version_is_warmed_up_before_it_serves(repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="dropwise.model_control"), app_client(repo) as client:
        for name in ("mlp_digits", "mlp_diabetes", "embedding_digits_tokens"):
            served = client.app.state.inference.control.models[name][1]  # type: ignore[attr-defined]
            modes = ["deterministic", "mc"] if served.runtime.supports_mc else ["deterministic"]
            assert list(served.warm_up_s) == modes and all(t > 0 for t in served.warm_up_s.values())
            warm = client.get(f"/v2/models/{name}/config").json()["parameters"]["warm_up"]["string_value"]
            assert [part.split(":")[0] for part in warm.split(",")] == modes
            stats = client.get(f"/v2/models/{name}/stats").json()["model_stats"][0]
            assert stats["execution_count"] == 0  # the warm-up ran on the runtime, not through the queue
    warmed = [r.getMessage() for r in caplog.records if "warmed up" in r.getMessage()]
    assert len(warmed) == 3 and any(m.startswith(f"loaded {MODEL} v1") for m in warmed)


# ------------------------------------------------------------------------------------------ tritonclient
def test_tritonclient_reads_config_statistics_and_controls_the_repository(repo: Path) -> None:
    env = {"DROPWISE_MODEL_CONTROL": "explicit", "DROPWISE_ADMIN_TOKEN": TOKEN, "DROPWISE_DEVICE": "cpu"}
    with running_server(repo, env=env) as base:
        triton = httpclient.InferenceServerClient(base.removeprefix("http://"), network_timeout=60)
        config = triton.get_model_config(MODEL)
        assert config["name"] == MODEL and config["input"][0]["dims"] == [64]
        assert config["version_policy"] == {"latest": {"num_versions": 1}}
        assert {"model_repository", "statistics", "model_configuration"} <= set(
            triton.get_server_metadata()["extensions"]
        )

        x = np.asarray(digits(3), dtype=np.float32)
        for i in range(3):
            assert httpx.post(f"{base}/v1/models/{MODEL}/predict", json={"inputs": digits(1 + i)}).status_code == 200
        tensor = httpclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        triton.infer(MODEL, [tensor])
        triton.infer(MODEL, [tensor], parameters={"mode": "mc", "samples": 8, "seed": 1})
        bad = httpx.post(f"{base}/v1/models/{MODEL}/predict", json={"inputs": [[1.0] * 3]})
        assert bad.status_code == 400
        stats = triton.get_inference_statistics(MODEL)["model_stats"]
        assert [(s["name"], s["version"]) for s in stats] == [(MODEL, "1")]
        inference = stats[0]["inference_stats"]
        assert inference["success"]["count"] == 5 and inference["fail"]["count"] == 1
        assert inference["success"]["ns"] > 0 and inference["compute_infer"]["count"] == 5
        assert stats[0]["inference_count"] == 1 + 2 + 3 + 3 + 3  # rows inferred
        assert stats[0]["execution_count"] >= 1
        everything = triton.get_inference_statistics()["model_stats"]
        assert {s["name"] for s in everything} == {MODEL, "mlp_diabetes", "embedding_digits_tokens"}

        with pytest.raises(InferenceServerException, match="admin token"):
            triton.get_model_repository_index()
        entries = triton.get_model_repository_index(headers=ADMIN)
        assert {(e["name"], e["version"], e["state"]) for e in entries} >= {(MODEL, "1", "READY")}
        add_version(repo, MODEL, 2)
        triton.load_model(MODEL, headers=ADMIN)
        assert triton.is_model_ready(MODEL, "2") and not triton.is_model_ready(MODEL, "1")
        triton.unload_model(MODEL, headers=ADMIN)
        assert not triton.is_model_ready(MODEL)
        with pytest.raises(InferenceServerException, match="failed to load"):
            triton.load_model("not_there", headers=ADMIN)
        triton.close()


# ------------------------------------------------------------------------------------------ swap under load
Answer = tuple[int, int | None, str]


async def _drive(base: str, clients: int, stop: asyncio.Event, results: list[Answer]) -> None:
    """Requests from `clients` concurrent clients until `stop`: (status, version, kind) per answer."""
    x = np.asarray(digits(2, 7), dtype=np.float32)
    v2_body = {"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": x.ravel().tolist()}]}

    async def client(i: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            n = 0
            while not stop.is_set():
                kind = ("native", "native-mc", "v2", "v2-mc")[(i + n) % 4]
                n += 1
                try:
                    if kind.startswith("native"):
                        body = {"inputs": x.tolist()}
                        if kind == "native-mc":
                            body.update(mode="mc", samples=8 + n % 9, seed=n)
                        r = await http.post(f"/v1/models/{MODEL}/predict", json=body)
                        version = r.json().get("version") if r.status_code == 200 else None
                    else:
                        body2 = dict(v2_body)
                        if kind == "v2-mc":
                            body2["parameters"] = {"mode": "mc", "samples": 8, "seed": n}
                        r = await http.post(f"/v2/models/{MODEL}/infer", json=body2)
                        version = int(r.json()["model_version"]) if r.status_code == 200 else None
                    results.append((r.status_code, version, kind))
                except httpx.HTTPError as exc:  # a dropped connection counts as a failure
                    results.append((-1, None, f"{kind}: {exc!r}"))

    await asyncio.gather(*(client(i) for i in range(clients)))


async def _until(condition: object, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:  # type: ignore[operator]
        await asyncio.sleep(0.05)


async def _swap_under_load(base: str, repo: Path, swap: object, clients: int = 8) -> dict[str, object]:
    stop = asyncio.Event()
    results: list[Answer] = []
    readiness: list[int] = []

    async def watch_readiness() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            while not stop.is_set():
                readiness.append((await http.get("/readyz")).status_code)
                await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch_readiness())
    load = asyncio.create_task(_drive(base, clients, stop, results))
    await _until(lambda: len(results) >= 40)  # the old version under load first
    started = time.monotonic()
    await asyncio.to_thread(swap)  # type: ignore[arg-type]
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        while time.monotonic() - started < 60:
            answer = await http.post(f"/v1/models/{MODEL}/predict", json={"inputs": digits(1)})
            if answer.status_code == 200 and answer.json()["version"] == 2:
                break
            await asyncio.sleep(0.05)
    swapped_after = time.monotonic() - started
    mark = len(results)
    await _until(lambda: len(results) >= mark + 40)  # then the new one
    stop.set()
    await load
    await watcher
    failures = [r for r in results if r[0] != 200]
    versions = [r[1] for r in results if r[0] == 200]
    return {
        "requests": len(results),
        "failures": failures,
        "before": versions.count(1),
        "after": versions.count(2),
        "swap_s": swapped_after,
        "last": versions[-clients:],
        "readiness": readiness,
    }


@pytest.mark.parametrize("control", ["poll", "explicit"])
def test_swap_under_load_loses_no_request(repo: Path, control: str) -> None:
    env = {
        "DROPWISE_MODEL_CONTROL": control,
        "DROPWISE_POLL_INTERVAL_S": "0.25",
        "DROPWISE_ADMIN_TOKEN": TOKEN,
        "DROPWISE_DEVICE": "cpu",
        "DROPWISE_MAX_QUEUE_DELAY_MS": "2",
    }
    with running_server(repo, env=env) as base:

        def swap() -> None:
            add_version(repo, MODEL, 2)
            if control == "explicit":
                r = httpx.post(f"{base}/v2/repository/models/{MODEL}/load", headers=ADMIN, timeout=60)
                assert r.status_code == 200, r.text

        report = asyncio.run(_swap_under_load(base, repo, swap))
        print(
            f"\nswap under load ({control}): {report['requests']} requests, {len(report['failures'])} failed, "
            f"{report['before']} answered by v1, {report['after']} by v2, new version served "
            f"{report['swap_s']:.2f} s after it was written"
        )
        assert report["failures"] == [], report["failures"][:5]
        assert report["before"] > 20 and report["after"] > 20
        assert set(report["last"]) == {2}  # type: ignore[arg-type]
        assert set(report["readiness"]) == {200}, report["readiness"]  # ready throughout the swap
        entries = httpx.post(f"{base}/v2/repository/index", headers=ADMIN).json()
        assert {(e["name"], e["version"], e["state"]) for e in entries} >= {(MODEL, "2", "READY")}
