"""Both runtimes on a GPU (marked `cuda`; skipped, with the reason, where there is none).

The torch runtime on CUDA must answer what the CPU answers for every model of the test repository (a float
classifier, a token classifier, a regressor): deterministic outputs up to float rounding, and seeded MC
results too, because the engine's hash masks do not depend on the device. Every model must offer MC on
CUDA (no model quietly skips its MC check), each model computes on a CUDA stream of its own, and a seeded
MC answer on CUDA does not depend on what else shares its batch. ONNX Runtime must really run on
`CUDAExecutionProvider` (no silent CPU fallback) and agree with the CPU, MC included where the package
ships an MC graph.

Tolerances (float32): deterministic outputs 1e-4 absolute, MC means 1e-3 absolute (T=32 averages of
outputs that differ by float rounding between CPU and GPU kernels; a mask that differed would move a
probability by far more).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from dropwise.service.app import create_app
from dropwise.service.settings import Settings
from fastapi.testclient import TestClient
from test_service_fixtures import SERVICE_MODELS, build_onnx_repository, build_service_repository

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch on this machine"),
]

DET_ATOL = 1e-4
MC_ATOL = 1e-3
#: models whose package carries an MC graph in the ONNX test repository (see build_onnx_repository)
ONNX_MC_MODELS = ("mlp_digits", "mlp_diabetes")


def _inputs(info: dict[str, Any], rows: int = 4, seed: int = 0) -> list:
    """Valid inputs for a model: integers in [0, 17) fit the digit features, the tokens and (as floats) the
    diabetes features alike."""
    shape = [rows, *info["input"]["shape"][1:]]
    values = np.random.default_rng(seed).integers(0, 17, size=shape)
    return values.tolist() if info["input"]["dtype"] == "int64" else values.astype(float).tolist()


def _values(answer: dict[str, Any]) -> np.ndarray:
    return np.asarray(answer["probabilities"] if answer.get("probabilities") is not None else answer["mean"])


def _answers(repo: Path, backend: str, device: str) -> dict[str, tuple[dict, dict, dict]]:
    """Per model: its description, a deterministic answer and a seeded MC answer (None when MC is off)."""
    settings = Settings(repository=repo, backend=backend, device=device)
    out: dict[str, tuple[dict, dict, dict]] = {}
    with TestClient(create_app(settings)) as client:
        for name in SERVICE_MODELS:
            info = client.get(f"/v1/models/{name}").json()
            x = _inputs(info)
            url = f"/v1/models/{name}/predict"
            det = client.post(url, json={"inputs": x}).json()
            mc = client.post(url, json={"inputs": x, "mode": "mc", "samples": 32, "seed": 3})
            out[name] = (info, det, mc.json() if mc.status_code == 200 else {"status": mc.status_code})
    return out


@pytest.fixture(scope="module")
def repo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_service_repository(request, tmp_path_factory.mktemp("svc"))


def test_torch_runtime_on_cuda_matches_cpu(repo: Path) -> None:
    gpu = _answers(repo, "torch", "cuda")
    cpu = _answers(repo, "torch", "cpu")
    for name in SERVICE_MODELS:
        info, det, mc = gpu[name]
        assert info["device"] == "cuda" and info["provider"].startswith("torch-cuda"), (name, info)
        assert info["mc_available"], f"{name}: no MC path on CUDA"
        assert det["device"] == "cuda" and mc.get("device") == "cuda", (name, mc)
        _, cpu_det, cpu_mc = cpu[name]
        assert cpu_det["device"] == "cpu"
        np.testing.assert_allclose(_values(det), _values(cpu_det), atol=DET_ATOL, err_msg=name)
        np.testing.assert_allclose(_values(mc), _values(cpu_mc), atol=MC_ATOL, err_msg=name)
    auto = _answers(repo, "torch", "auto")
    assert all(auto[name][1]["device"] == "cuda" for name in SERVICE_MODELS)


def test_each_model_computes_on_its_own_cuda_stream(repo: Path) -> None:
    settings = Settings(repository=repo, backend="torch", device="cuda")
    with TestClient(create_app(settings)) as client:
        service = client.app.state.inference  # type: ignore[attr-defined]
        runtimes = [service.control.lookup(name, None).runtime for name in SERVICE_MODELS]
        streams = [runtime.stream for runtime in runtimes]
        assert all(stream is not None for stream in streams)
        assert len({stream.cuda_stream for stream in streams}) == len(streams)
        default = torch.cuda.default_stream().cuda_stream
        assert all(stream.cuda_stream != default for stream in streams)


def test_seeded_mc_on_cuda_does_not_depend_on_batch_company(repo: Path) -> None:
    settings = Settings(repository=repo, backend="torch", device="cuda", max_queue_delay_ms=30)
    url = "/v1/models/mlp_digits/predict"
    x = np.random.default_rng(1).integers(0, 17, size=(2, 64)).astype(float).tolist()
    target = {"inputs": x, "mode": "mc", "samples": 16, "seed": 5}

    async def main() -> tuple[dict, list[dict]]:
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://svc", timeout=60) as client:
                alone = (await client.post(url, json=target)).json()
                others = [
                    client.post(url, json={"inputs": x[:1], "mode": "mc", "samples": 8, "seed": i}) for i in range(8)
                ]
                answers = await asyncio.gather(*others, client.post(url, json=target))
                return alone, [a.json() for a in answers]

    alone, answers = asyncio.run(main())
    crowded = answers[-1]
    assert crowded["timings"]["batch_rows"] > 2, "the target was never batched with others"
    np.testing.assert_allclose(crowded["probabilities"], alone["probabilities"], atol=1e-5)


def test_onnxruntime_on_cuda_provider(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(
            "this GPU machine has the CPU build of onnxruntime (the cpu extra): the ONNX Runtime CUDA check needs "
            "onnxruntime-gpu (the gpu extra), the two cannot be installed together"
        )
    onnx_repo = build_onnx_repository(request, tmp_path_factory.mktemp("svc"))
    gpu = _answers(onnx_repo, "onnxruntime", "cuda")
    cpu = _answers(onnx_repo, "onnxruntime", "cpu")
    for name in SERVICE_MODELS:
        info, det, mc = gpu[name]
        assert info["provider"] == "CUDAExecutionProvider" and info["device"] == "cuda", (name, info)
        _, cpu_det, cpu_mc = cpu[name]
        np.testing.assert_allclose(_values(det), _values(cpu_det), atol=DET_ATOL, err_msg=name)
        if name in ONNX_MC_MODELS:
            assert info["mc_available"], f"{name}: its MC graph is not served on CUDA"
            np.testing.assert_allclose(_values(mc), _values(cpu_mc), atol=MC_ATOL, err_msg=name)
        else:
            assert not info["mc_available"] and mc == {"status": 400}, (name, mc)
