"""Start-up: `/healthz` answers while the service is still preparing, building or loading; `/readyz` says
503 with what it waits for until every model is loaded; a failed start says why.

The gate runs in a real uvicorn server (in a thread) in front of the real app and repository; the
first-start work is a real callable held back by an event, so the test sees each phase for as long as it
needs. The command-line cases run the installed `dropwise serve` in a subprocess.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn
from dropwise.service.app import create_app
from dropwise.service.settings import Settings
from dropwise.service.startup import StartupGate
from test_service_fixtures import DROPWISE, ROOT, build_service_repository, free_port

from bench.startup import measure
from dropwise.commands.serve import first_start_work


@pytest.fixture(scope="module")
def repo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_service_repository(request, tmp_path_factory.mktemp("svc"))


@contextlib.contextmanager
def serving(gate: StartupGate) -> Iterator[str]:
    """Run `gate` in a real uvicorn server on a free port; yield its base URL once it listens."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(gate, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _until(check: Callable[[], Any], timeout: float = 600.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_healthz_answers_while_preparing_and_readyz_says_what_it_waits_for(repo: Path) -> None:
    release = threading.Event()
    prepared: list[str] = []

    def prepare() -> None:  # stands for first-start training: it ends when the test says so
        assert release.wait(timeout=120)
        prepared.append("done")

    settings = Settings(repository=repo, device="cpu")
    gate = StartupGate(lambda: create_app(settings), prepare=prepare, preparing="training the test networks")
    with serving(gate) as base:
        assert httpx.get(base + "/healthz").json() == {"status": "ok"}
        ready = httpx.get(base + "/readyz")
        assert ready.status_code == 503
        assert ready.json()["status"] == "not ready"
        assert ready.json()["waiting_for"] == "training the test networks"
        native = httpx.post(base + "/v1/models/mlp_digits/predict", json={"inputs": [[0.0] * 64]})
        assert native.status_code == 503 and native.headers["retry-after"] == "1"
        assert "training the test networks" in native.json()["error"]["message"]
        v2 = httpx.post(base + "/v2/models/mlp_digits/infer", json={"inputs": []})
        assert v2.status_code == 503 and isinstance(v2.json()["error"], str)
        assert gate.app is None and not prepared

        release.set()
        _until(lambda: httpx.get(base + "/readyz").status_code == 200)
        assert prepared == ["done"] and gate.app is not None and gate.failed is None
        assert httpx.get(base + "/healthz").json() == {"status": "ok", "models": {}, "errors": {}}
        body = {"inputs": [[0.0] * 64], "mode": "mc", "samples": 4, "seed": 1}
        answer = httpx.post(base + "/v1/models/mlp_digits/predict", json=body)
        assert answer.status_code == 200 and answer.json()["device"] == "cpu"


def test_readyz_names_each_step_until_ready(repo: Path) -> None:
    """While the app is built /readyz names that step; once built, the app's /readyz answers (503 naming a
    model being loaded, however briefly, then 200)."""
    settings = Settings(repository=repo, device="cpu")
    release = threading.Event()

    def build() -> Any:
        assert release.wait(timeout=120)
        return create_app(settings)

    seen: list[str] = []
    gate = StartupGate(build)
    with serving(gate) as base:
        first = _until(lambda: httpx.get(base + "/readyz").json().get("waiting_for"))
        assert first == "importing the service and building the app"
        release.set()

        def ready() -> bool:
            answer = httpx.get(base + "/readyz")
            if answer.status_code == 503:
                seen.append(answer.json()["waiting_for"])
            return answer.status_code == 200

        _until(ready)
    allowed = ("importing the service and building the app", "scanning the repository", "loading the models")
    assert all(reason in allowed or reason.startswith("loading ") for reason in seen), seen


def test_failed_start_is_reported_and_stops(repo: Path) -> None:
    reasons: list[str] = []

    def prepare() -> None:
        raise OSError("disk full")

    gate_failed = threading.Event()

    def on_failure(reason: str) -> None:  # the command line stops the server here
        reasons.append(reason)
        gate_failed.set()

    settings = Settings(repository=repo, device="cpu")
    gate = StartupGate(lambda: create_app(settings), prepare=prepare, on_failure=on_failure)
    with serving(gate) as base:
        assert gate_failed.wait(timeout=30)
        ready = httpx.get(base + "/readyz").json()
        assert ready["waiting_for"] == "failed: preparing the model repository: disk full"
        assert httpx.get(base + "/healthz").status_code == 200
    assert reasons == ["preparing the model repository: disk full"] and gate.app is None


def _serve(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DROPWISE, "serve", "--port", str(free_port()), *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_empty_repository_says_in_one_line_what_to_mount(tmp_path: Path) -> None:
    done = _serve("--repository", str(tmp_path))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert "no model packages in" in lines[0] and "DROPWISE_TRAIN_IF_EMPTY=1" in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch sees no CUDA GPU")
def test_cuda_without_gpu_fails_start_in_one_line(repo: Path) -> None:
    done = _serve("--repository", str(repo), "--device", "cuda")
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("dropwise: error: start-up failed:") and "torch sees no CUDA GPU" in last
    assert "Traceback" not in done.stderr


def test_onnxruntime_backend_converts_packages_without_onnx_at_start(repo: Path) -> None:
    work, what = first_start_work(repo, backend="onnxruntime", train=False, quick=True)
    assert work is not None and what.startswith("converting ") and what.endswith("to ONNX (onnxruntime backend)")
    assert all(name in what for name in ("mlp_digits", "embedding_digits_tokens", "mlp_diabetes"))
    assert first_start_work(repo, backend="torch", train=False, quick=True) == (None, "")


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_first_start_training_answers_healthz_from_the_start(tmp_path: Path) -> None:
    """`dropwise serve --train-if-empty` on an empty repository: /healthz answers while the networks train,
    /readyz names the training, then every network is served."""
    result = measure(tmp_path / "repository", cwd=tmp_path, extra=["--train-if-empty", "--quick-train"], timeout=900)
    assert result["ready_s"] is not None, result
    assert result["healthz_s"] is not None and result["healthz_s"] < result["ready_s"]
    assert result["waiting_for"][0].startswith("training the reference networks into"), result["waiting_for"]
    assert any(reason.startswith("loading ") for reason in result["waiting_for"])
    assert len(list((tmp_path / "repository").glob("*/1/manifest.json"))) == 10


def test_requests_reach_the_app_as_soon_as_its_startup_completes() -> None:
    """No gap between the app's /readyz saying 200 and its routes answering: the gate forwards every request
    from the moment the app reports `lifespan.startup.complete` (once, a request sent right after /readyz
    said 200 got the gate's 503 "starting", until the gate's own start-up task ran again)."""
    import asyncio

    answers: list[int] = []

    async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] == "lifespan":
            assert (await receive())["type"] == "lifespan.startup"
            await send({"type": "lifespan.startup.complete"})
            # the first moment a client could have seen 200 from /readyz: ask the gate for a model route
            await gate({"type": "http", "path": "/v1/models", "method": "GET"}, receive_nothing, record)
            await receive()  # shutdown
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive_nothing() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def record(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answers.append(message["status"])

    gate = StartupGate(lambda: app)

    async def run() -> None:
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        await inbox.put({"type": "lifespan.startup"})
        sent: list[dict[str, Any]] = []

        async def lifespan_send(message: dict[str, Any]) -> None:
            sent.append(message)

        lifespan = asyncio.create_task(gate({"type": "lifespan"}, inbox.get, lifespan_send))
        deadline = time.monotonic() + 30
        while not answers and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await inbox.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(lifespan, 30)

    asyncio.run(run())
    assert answers == [200]
