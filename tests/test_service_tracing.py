"""The per-request timing trace (`DROPWISE_TRACE_FILE`, `dropwise.service.tracing`) on a real `dropwise serve`,
and its summary by `bench.serving_trace`; plus the heap freeze that removed the serving tail
(`dropwise.service.heap`)."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from dropwise.service.app import create_app
from dropwise.service.settings import Settings
from dropwise.service.tracing import STEPS
from fastapi.testclient import TestClient
from test_service_fixtures import build_service_repository, running_server

from bench.serving_trace import main as summarise


@pytest.fixture(scope="module")
def repo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_service_repository(request, tmp_path_factory.mktemp("svc"))


def test_every_inference_request_is_traced_step_by_step(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "trace.jsonl"
    x = np.random.default_rng(0).normal(size=(2, 64)).astype(np.float32)
    with running_server(repo, env={"DROPWISE_TRACE_FILE": str(trace), "DROPWISE_DEVICE": "cpu"}) as base:
        for i in range(4):
            body = {"inputs": x.tolist(), "mode": "mc", "num_samples": 8, "seed": i}
            assert httpx.post(f"{base}/v1/models/mlp_digits/predict", json=body, timeout=60).status_code == 200
        v2 = {"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": x.ravel().tolist()}]}
        for _ in range(3):
            assert httpx.post(f"{base}/v2/models/mlp_digits/infer", json=v2, timeout=60).status_code == 200
        bad = httpx.post(f"{base}/v1/models/mlp_digits/predict", json={"inputs": [[1.0]]}, timeout=60)
        assert bad.status_code == 400
    lines = [json.loads(text) for text in trace.read_text().splitlines()]
    inference = [line for line in lines if str(line.get("path", "")).endswith(("/predict", "/infer"))]
    assert len(inference) == 8
    answered = [line for line in inference if line["status"] == 200]
    assert len(answered) == 7
    for line in answered:
        times = [line["t"][step] for step in STEPS]  # every step, in order
        assert times[0] == 0.0 and times == sorted(times), line
    refused = next(line for line in inference if line["status"] == 400)
    assert "parsed" in refused["t"] and "enqueued" not in refused["t"]  # refused by validation, never queued
    assert any("gc" in line for line in lines)  # collections are traced too

    summarise([str(trace), "--trim", "0"])
    printed = capsys.readouterr().out
    assert "native predict:" in printed and "v2 infer:" in printed and "| batch -> compute_start |" in printed


def test_the_loaded_heap_is_frozen_while_serving_and_thawed_after(repo: Path) -> None:
    gc.unfreeze()
    with TestClient(create_app(Settings(repository=repo, device="cpu"))) as client:
        assert client.get("/readyz").status_code == 200
        assert gc.get_freeze_count() > 10_000  # torch, FastAPI and the models: out of the collector's walks
    assert gc.get_freeze_count() == 0
