"""ONNX Runtime provider selection, real sessions: CPU here, CUDA where a GPU and onnxruntime-gpu exist."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from dropwise.surgery.export import export_deterministic
from dropwise.surgery.providers import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    ProviderError,
    create_session,
    cuda_usable,
    describe_session,
    installed_packages,
    resolve_providers,
)
from torch import nn

HAS_CUDA_PROVIDER = CUDA_PROVIDER in ort.get_available_providers() and cuda_usable()[0]


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    return export_deterministic(model, torch.randn(2, 4), tmp_path_factory.mktemp("prov") / "tiny.onnx")


def test_exactly_one_onnxruntime_distribution() -> None:
    assert len(installed_packages()) == 1, installed_packages()


@pytest.mark.skipif(HAS_CUDA_PROVIDER, reason="this machine can run CUDA")
def test_auto_and_cpu_run_on_cpu_here(tiny_onnx: Path) -> None:
    for device in ("auto", "cpu"):
        session, info = create_session(tiny_onnx, device)
        assert info.provider == CPU_PROVIDER and info.device == "cpu"
        assert info.providers_active[0] == CPU_PROVIDER
        assert not info.fell_back
        assert info.to_dict()["providers_active"] == list(session.get_providers())
        (out,) = session.run(None, {"input": np.ones((3, 4), np.float32)})
        assert out.shape == (3, 2)
    _, auto = create_session(tiny_onnx, "auto")
    assert any("using CPU" in note for note in auto.notes), auto.notes


@pytest.mark.skipif(HAS_CUDA_PROVIDER, reason="this machine can run CUDA")
def test_cuda_requested_without_cuda_is_a_clear_error(tiny_onnx: Path) -> None:
    with pytest.raises(ProviderError, match="'cuda' requested but unavailable"):
        create_session(tiny_onnx, "cuda")


def test_unknown_device_is_refused() -> None:
    with pytest.raises(ProviderError, match="unknown device 'gpu0'"):
        resolve_providers("gpu0")


def test_silent_fallback_is_detected(tiny_onnx: Path) -> None:
    # Ask a real CPU session to be described as if CUDA had been requested: ONNX Runtime's own fallback
    # produces exactly this state (requested CUDA first, active list starting with CPU).
    session = ort.InferenceSession(str(tiny_onnx), providers=[CPU_PROVIDER])
    info = describe_session(session, "auto", [CUDA_PROVIDER, CPU_PROVIDER], [])
    assert info.fell_back and info.provider == CPU_PROVIDER and info.device == "cpu"
    assert any("asked for CUDAExecutionProvider but runs on CPUExecutionProvider" in n for n in info.notes)
    assert info.providers_missing == (CUDA_PROVIDER,)  # every requested provider is checked, not only the first
    asked_cpu = describe_session(session, "auto", [CPU_PROVIDER, "TensorrtExecutionProvider"], [])
    assert not asked_cpu.fell_back and asked_cpu.providers_missing == ("TensorrtExecutionProvider",)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA_PROVIDER, reason="needs onnxruntime-gpu and an NVIDIA GPU")
def test_cuda_session_runs_on_cuda(tiny_onnx: Path) -> None:
    session, info = create_session(tiny_onnx, "cuda")
    assert info.provider == CUDA_PROVIDER and info.device == "cuda" and not info.fell_back
    (out,) = session.run(None, {"input": np.ones((3, 4), np.float32)})
    assert out.shape == (3, 2)
    _, auto = create_session(tiny_onnx, "auto")
    assert auto.provider == CUDA_PROVIDER
