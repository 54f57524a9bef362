"""Both runtimes on a GPU (marked `cuda`; skipped, with the reason, where there is none).

The torch runtime on CUDA must answer what the CPU answers: deterministic probabilities up to float
rounding, and seeded MC results too, because the engine's hash masks do not depend on the device. ONNX
Runtime must really run on `CUDAExecutionProvider` (no silent CPU fallback) and agree with the CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from dropwise.service.app import create_app
from dropwise.service.settings import Settings
from fastapi.testclient import TestClient
from test_service_fixtures import build_onnx_repository, build_service_repository

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch on this machine"),
]

X = np.random.default_rng(0).integers(0, 17, size=(4, 64)).astype(float).tolist()
MC = {"inputs": X, "mode": "mc", "samples": 32, "seed": 3}


def _answers(repo: Path, backend: str, device: str) -> tuple[dict, dict, dict]:
    settings = Settings(repository=repo, backend=backend, device=device)
    with TestClient(create_app(settings)) as client:
        info = client.get("/v1/models/mlp_digits").json()
        det = client.post("/v1/models/mlp_digits/predict", json={"inputs": X}).json()
        mc = client.post("/v1/models/mlp_digits/predict", json=MC).json() if info["mc_available"] else {}
        return info, det, mc


def test_torch_runtime_on_cuda_matches_cpu(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> None:
    repo = build_service_repository(request, tmp_path_factory.mktemp("svc"))
    info, det, mc = _answers(repo, "torch", "cuda")
    assert info["device"] == "cuda" and info["provider"].startswith("torch-cuda")
    _, cpu_det, cpu_mc = _answers(repo, "torch", "cpu")
    np.testing.assert_allclose(det["probabilities"], cpu_det["probabilities"], atol=1e-4)
    np.testing.assert_allclose(mc["probabilities"], cpu_mc["probabilities"], atol=1e-3)
    _, auto_det, _ = _answers(repo, "torch", "auto")
    assert auto_det["device"] == "cuda"


def test_onnxruntime_on_cuda_provider(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed (CUDAExecutionProvider unavailable): install the gpu extra")
    repo = build_onnx_repository(request, tmp_path_factory.mktemp("svc"))
    info, det, mc = _answers(repo, "onnxruntime", "cuda")
    assert info["provider"] == "CUDAExecutionProvider" and info["device"] == "cuda"
    _, cpu_det, cpu_mc = _answers(repo, "onnxruntime", "cpu")
    np.testing.assert_allclose(det["probabilities"], cpu_det["probabilities"], atol=1e-4)
    if mc:
        np.testing.assert_allclose(mc["probabilities"], cpu_mc["probabilities"], atol=1e-3)
