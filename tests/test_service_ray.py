"""Scale-out on Ray Serve: the real Ray, a real Serve proxy on loopback, two replicas of the app."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray", reason="Ray Serve is the optional `ray` extra")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_serve_url(quick_repository: Path):
    from dropwise.service.ray_serve import build_deployment
    from dropwise.service.settings import Settings
    from ray import serve

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
    )
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = Settings(repository=quick_repository, device="cpu")
        serve.run(build_deployment(settings, num_replicas=2, num_cpus=0.5), name="dropwise", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_like_the_in_process_app(ray_serve_url: str, quick_repository: Path) -> None:
    from dropwise.service.app import create_app
    from dropwise.service.settings import Settings
    from fastapi.testclient import TestClient

    body = {"inputs": [[0.25] * 64, [0.5] * 64], "mode": "mc", "samples": 16, "seed": 7}
    with httpx.Client(base_url=ray_serve_url, timeout=60) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        answers = [client.post("/v1/models/mlp_digits/predict", json=body) for _ in range(4)]
        bad = client.post("/v1/models/mlp_digits/predict", json={"inputs": [[1.0] * 3]})
    for answer in answers:
        assert answer.status_code == 200, answer.text
    assert bad.status_code in (400, 422) and "error" in bad.json()

    with TestClient(create_app(Settings(repository=quick_repository, device="cpu"))) as local:
        expected = local.post("/v1/models/mlp_digits/predict", json=body).json()
    for answer in answers:
        got = answer.json()
        assert got["predictions"] == expected["predictions"]
        for got_row, expected_row in zip(got["probabilities"], expected["probabilities"], strict=True):
            assert got_row == pytest.approx(expected_row, abs=1e-6)
