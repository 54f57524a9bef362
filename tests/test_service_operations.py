"""Operations with a real `dropwise serve` (uvicorn subprocess over TCP): graceful shutdown on SIGTERM,
stalled uploads timed out, the access log with request ids, and the refusal to bind a public address
without a token unless told.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_service_fixtures import DROPWISE, ROOT, build_service_repository, free_port, queue_depth, running_server

URL = "/v1/models/mlp_digits/predict"


@pytest.fixture(scope="module")
def repo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_service_repository(request, tmp_path_factory.mktemp("svc"))


def _x(n: int, seed: int = 0) -> list[list[float]]:
    return np.random.default_rng(seed).integers(0, 17, size=(n, 64)).astype(float).tolist()


def _start(repo: Path, env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "DROPWISE_DEVICE": "cpu", **env}
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            [DROPWISE, "serve", "--repository", str(repo), "--port", str(port)],
            cwd=ROOT,
            env=full_env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server not ready:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def test_sigterm_finishes_in_flight_answers_queued_503_and_exits_0(repo: Path, tmp_path: Path) -> None:
    """One request computes, three wait in the queue when SIGTERM arrives: no CPU timing is built in.

    The MC sample count is scaled from one measured pass so that a pass lasts seconds on any machine, and
    SIGTERM is sent once /metrics shows the three others queued behind the one computing (each 1024-row
    request is a batch of its own).
    """
    env = {
        "DROPWISE_MAX_SAMPLES": "100000",
        "DROPWISE_MAX_MC_SAMPLE_ROWS": "100000000",
        "DROPWISE_SHUTDOWN_GRACE_S": "120",
    }
    log = tmp_path / "server.log"
    proc, base = _start(repo, env, log)

    async def traffic() -> list[int | str]:
        async with httpx.AsyncClient(base_url=base, timeout=300) as client:
            probe = {"inputs": _x(1024, 1), "mode": "mc", "samples": 256, "seed": 1}
            measured = (await client.post(URL, json=probe)).json()
            pass_s = max(measured["timings"]["compute_ms"] / 1000.0, 1e-3)
            samples = int(min(8192, max(256, 256 * 4.0 / pass_s)))  # a pass of about 4 s, capped
            heavy = {**probe, "samples": samples}

            async def one(i: int) -> int | str:
                try:
                    r = await client.post(URL, json=heavy, headers={"X-Request-ID": f"drain-{i}"})
                    return r.status_code
                except httpx.HTTPError as exc:
                    return type(exc).__name__

            jobs = [asyncio.ensure_future(one(i)) for i in range(4)]
            while queue_depth((await client.get("/metrics")).text) < 3:
                assert not any(j.done() for j in jobs), "a request finished before the others queued up"
                await asyncio.sleep(0.005)
            proc.send_signal(signal.SIGTERM)
            return list(await asyncio.gather(*jobs))

    try:
        codes = asyncio.run(traffic())
        assert proc.wait(timeout=90) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sorted(codes, key=str) == [200, 503, 503, 503], (codes, log.read_text()[-3000:])
    with pytest.raises(httpx.ConnectError):
        httpx.get(base + "/healthz", timeout=2)
    text = log.read_text()
    assert "rid=drain-0" in text or "rid=drain-1" in text  # the access log carries request ids


def test_stalled_upload_answers_408(repo: Path) -> None:
    with running_server(repo, "--device", "cpu", env={"DROPWISE_BODY_IDLE_TIMEOUT_S": "1"}) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(
                b"POST /v1/models/mlp_digits/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 1000\r\nX-Request-ID: stalled-1\r\n\r\n{"inputs": [[1, 2'
            )
            started = time.monotonic()
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"x-request-id: stalled-1" in answer.lower()
        assert time.monotonic() - started < 20
        assert httpx.get(base + "/healthz").status_code == 200


def test_public_bind_needs_a_token_or_explicit_consent(repo: Path) -> None:
    env = {**os.environ, "DROPWISE_HOST": "0.0.0.0"}
    env.pop("DROPWISE_API_TOKEN", None)
    env.pop("DROPWISE_ALLOW_UNAUTHENTICATED", None)
    refused = subprocess.run(
        [DROPWISE, "serve", "--repository", str(repo), "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "--allow-unauthenticated" in lines[0] and "DROPWISE_API_TOKEN" in lines[0]
    for extra, args in (({"DROPWISE_ALLOW_UNAUTHENTICATED": "1"}, ()), ({}, ("--allow-unauthenticated",))):
        with running_server(repo, "--device", "cpu", *args, env={"DROPWISE_HOST": "0.0.0.0", **extra}) as base:
            assert httpx.post(base + URL, json={"inputs": _x(1)}).status_code == 200
    with running_server(repo, env={"DROPWISE_HOST": "0.0.0.0", "DROPWISE_API_TOKEN": "tok"}) as base:
        assert httpx.post(base + URL, json={"inputs": _x(1)}).status_code == 401
        ok = httpx.post(base + URL, json={"inputs": _x(1)}, headers={"Authorization": "Bearer tok"})
        assert ok.status_code == 200
