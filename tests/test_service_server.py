"""`dropwise serve` for real: uvicorn in a subprocess on 127.0.0.1, called with httpx over TCP.

Covers the torch and ONNX Runtime backends (the ONNX answers are checked against the torch ones), settings
from `DROPWISE_*` environment variables, the default repository, seeded results under concurrent load, and
the command's one-line errors.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_service_fixtures import (
    DROPWISE,
    ROOT,
    build_onnx_repository,
    build_service_repository,
    running_server,
)


@pytest.fixture(scope="module")
def repo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_service_repository(request, tmp_path_factory.mktemp("svc"))


@pytest.fixture(scope="module")
def onnx_repo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_onnx_repository(request, tmp_path_factory.mktemp("svc"))


def _x(n: int, seed: int) -> list[list[float]]:
    return np.random.default_rng(seed).integers(0, 17, size=(n, 64)).astype(float).tolist()


def test_serve_default_repository_over_tcp_with_env_settings(repo: Path, tmp_path: Path) -> None:
    shutil.copytree(repo, tmp_path / "model_repository")
    env = {"DROPWISE_MAX_SAMPLES": "40", "DROPWISE_MAX_QUEUE_DELAY_MS": "20", "DROPWISE_DEVICE": "cpu"}
    with running_server(None, env=env, cwd=tmp_path) as base:  # no --repository: ./model_repository
        ready = httpx.get(base + "/readyz").json()
        assert ready["status"] == "ready"
        assert sorted(ready["models"]) == sorted(p.name for p in (tmp_path / "model_repository").iterdir())
        info = httpx.get(base + "/v1/models/mlp_digits").json()
        assert info["backend"] == "torch" and info["device"] == "cpu" and info["max_samples"] == 40
        det = httpx.post(base + "/v1/models/mlp_digits/predict", json={"inputs": _x(2, 0)})
        assert det.status_code == 200 and len(det.json()["predictions"]) == 2
        too_many = httpx.post(
            base + "/v1/models/mlp_digits/predict", json={"inputs": _x(1, 0), "mode": "mc", "samples": 41}
        )
        assert too_many.status_code == 400 and too_many.json()["error"]["field"] == "num_samples"
        target = {"inputs": _x(2, 9), "mode": "mc", "samples": 40, "seed": 123}

        async def burst() -> list[dict]:
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                jobs = [
                    client.post(
                        "/v1/models/mlp_digits/predict",
                        json={"inputs": _x(1 + i % 4, i), "mode": "mc", "samples": 8 + i, "seed": i},
                    )
                    for i in range(16)
                ]
                jobs[8:8] = [client.post("/v1/models/mlp_digits/predict", json=target) for _ in range(2)]
                answers = await asyncio.gather(*jobs)
                assert all(a.status_code == 200 for a in answers)
                return [answers[8].json(), answers[9].json()]

        alone = httpx.post(base + "/v1/models/mlp_digits/predict", json=target).json()
        for answer in asyncio.run(burst()):
            np.testing.assert_allclose(answer["probabilities"], alone["probabilities"], rtol=0, atol=1e-6)
            assert answer["predictions"] == alone["predictions"]
        metrics = httpx.get(base + "/metrics").text
        counted = 'dropwise_requests_total{mode="mc",model="mlp_digits",route="/v1/models/{name}/predict",status="200"}'
        assert f"{counted} 19.0" in metrics


def test_onnxruntime_backend_matches_torch(repo: Path, onnx_repo: Path) -> None:
    x = _x(3, 5)
    det = {"inputs": x}
    mc = {"inputs": x, "mode": "mc", "samples": 16, "seed": 42}
    with running_server(onnx_repo, "--backend", "torch", "--device", "cpu") as base:
        torch_det = httpx.post(base + "/v1/models/mlp_digits/predict", json=det).json()
        torch_mc = httpx.post(base + "/v1/models/mlp_digits/predict", json=mc).json()
        torch_reg = httpx.post(base + "/v1/models/mlp_diabetes/predict", json={**mc, "inputs": [[0.1] * 10]}).json()
    with running_server(onnx_repo, "--device", "cpu", env={"DROPWISE_BACKEND": "onnxruntime"}) as base:
        info = httpx.get(base + "/v1/models/mlp_digits").json()
        assert info["backend"] == "onnxruntime" and info["provider"] == "CPUExecutionProvider"
        onnx_det = httpx.post(base + "/v1/models/mlp_digits/predict", json=det).json()
        np.testing.assert_allclose(onnx_det["probabilities"], torch_det["probabilities"], atol=1e-5)
        assert onnx_det["predictions"] == torch_det["predictions"] and onnx_det["provider"] == "CPUExecutionProvider"
        tokens = httpx.post(base + "/v1/models/embedding_digits_tokens/predict", json={"inputs": [[10_000] * 64]})
        assert tokens.status_code == 400 and tokens.json()["error"]["field"] == "inputs"
        no_mc = httpx.post(
            base + "/v1/models/embedding_digits_tokens/predict", json={"inputs": [[1] * 64], "mode": "mc"}
        )
        assert no_mc.status_code == 400 and no_mc.json()["error"]["field"] == "mode"
        assert info["mc_available"], "the converted package carries model.mc.onnx"
        onnx_mc = httpx.post(base + "/v1/models/mlp_digits/predict", json=mc).json()
        np.testing.assert_allclose(onnx_mc["probabilities"], torch_mc["probabilities"], atol=1e-4)
        for key, value in torch_mc["uncertainty"].items():
            np.testing.assert_allclose(onnx_mc["uncertainty"][key], value, atol=1e-4, err_msg=key)
        onnx_reg = httpx.post(base + "/v1/models/mlp_diabetes/predict", json={**mc, "inputs": [[0.1] * 10]}).json()
        np.testing.assert_allclose(onnx_reg["mean"], torch_reg["mean"], rtol=1e-4)
        np.testing.assert_allclose(onnx_reg["uncertainty"]["std"], torch_reg["uncertainty"]["std"], rtol=1e-3)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--repository", "/nonexistent/repo"], {}, "no model packages"),
        (["--device", "tpu"], {}, "device"),
        ([], {"DROPWISE_MAX_BATCH_SIZE": "0"}, "max_batch_size"),
    ],
)
def test_serve_refuses_bad_options_in_one_line(repo: Path, args: list[str], env: dict[str, str], message: str) -> None:
    if "--repository" not in args:
        args = ["--repository", str(repo), *args]
    done = subprocess.run(
        [DROPWISE, "serve", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
