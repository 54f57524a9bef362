"""Scale-out on Ray Serve for real: `dropwise serve --ray --replicas 2`, a real Ray cluster and Serve proxy.

The command is started in a subprocess on loopback. The test shows that both replicas answer (distinct
`X-Dropwise-Replica` identities), that they answer like the in-process app, and that killing one replica's
process in the middle of a load leaves every request answered: a request caught in flight on the killed
replica fails once and succeeds on its single retry (the other replica takes it), the rest are not
disturbed, and the Serve controller starts a replacement replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_service_fixtures import DROPWISE, build_service_repository, free_port

ray = pytest.importorskip("ray", reason="Ray Serve is the optional `ray` extra")

MODEL = "mlp_digits"
HEADER = "x-dropwise-replica"


@pytest.fixture(scope="module")
def repo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_service_repository(request, tmp_path_factory.mktemp("svc"))


@contextlib.contextmanager
def ray_server(repository: Path, replicas: int, timeout: float = 300.0) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "DROPWISE_DEVICE": "cpu",
        "DROPWISE_RAY_CPUS_PER_REPLICA": "0.5",
        "RAY_AUTH_MODE": "disabled",
    }
    log = repository.parent / f"ray-serve-{port}.log"
    cmd = [DROPWISE, "serve", "--ray", "--replicas", str(replicas), "--repository", str(repository)]
    cmd += ["--port", str(port)]
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"serve --ray exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(base + "/readyz", timeout=5).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Ray Serve not ready after {timeout} s:\n{log.read_text()[-4000:]}")
                time.sleep(0.5)
            yield base, proc
        finally:
            proc.send_signal(signal.SIGTERM)  # serve.shutdown() and ray.shutdown() run, the exit status is 0
            try:
                code = proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
            assert code == 0, log.read_text()[-3000:]


def _pid(identity: str) -> int:
    return int(identity.rsplit("pid=", 1)[1])


def _body(seed: int) -> dict[str, object]:
    x = np.random.default_rng(seed).normal(size=(2, 64)).round(3).tolist()
    return {"inputs": x, "mode": "mc", "samples": 8, "seed": seed}


async def _load(base: str, clients: int, stop: asyncio.Event, log: list[dict[str, object]]) -> None:
    async def client(i: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            n = 0
            while not stop.is_set():
                n += 1
                attempts: list[object] = []
                for _ in range(2):  # one retry, as a load balancer in front of Serve would do
                    try:
                        r = await http.post(f"/v1/models/{MODEL}/predict", json=_body(i * 10_000 + n))
                        attempts.append((r.status_code, r.headers.get(HEADER)))
                        if r.status_code == 200:
                            break
                    except httpx.HTTPError as exc:
                        attempts.append(repr(exc))
                log.append({"t": time.monotonic(), "attempts": attempts})

    await asyncio.gather(*(client(i) for i in range(clients)))


def test_two_replicas_serve_and_survive_a_killed_replica(repo: Path) -> None:
    from dropwise.service.app import create_app
    from dropwise.service.settings import Settings
    from fastapi.testclient import TestClient

    with ray_server(repo, replicas=2) as (base, _proc):
        seen: dict[str, dict[str, object]] = {}
        deadline = time.monotonic() + 60
        with httpx.Client(base_url=base, timeout=60) as http:
            while len(seen) < 2 and time.monotonic() < deadline:
                r = http.post(f"/v1/models/{MODEL}/predict", json=_body(7))
                assert r.status_code == 200, r.text
                seen[r.headers[HEADER]] = r.json()
            bad = http.post(f"/v1/models/{MODEL}/predict", json={"inputs": [[1.0] * 3]})
        assert len(seen) == 2, f"only one replica answered: {list(seen)}"
        assert len({_pid(identity) for identity in seen}) == 2
        assert bad.status_code == 400 and "error" in bad.json() and HEADER in bad.headers
        with TestClient(create_app(Settings(repository=repo, device="cpu"))) as local:
            expected = local.post(f"/v1/models/{MODEL}/predict", json=_body(7)).json()
        for answer in seen.values():  # same seed, same answer, whichever replica
            assert answer["predictions"] == expected["predictions"]
            np.testing.assert_allclose(answer["probabilities"], expected["probabilities"], atol=1e-6)

        victim = _pid(next(iter(seen)))

        async def scenario() -> tuple[list[dict[str, object]], float]:
            stop, log = asyncio.Event(), []
            load = asyncio.create_task(_load(base, 6, stop, log))
            await asyncio.sleep(2.0)
            killed_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            await asyncio.sleep(8.0)
            stop.set()
            await load
            return log, killed_at

        log, killed_at = asyncio.run(scenario())
        answered = [entry for entry in log if entry["attempts"][-1][0] == 200]  # type: ignore[index]
        retried = [entry for entry in log if len(entry["attempts"]) > 1]  # type: ignore[arg-type]
        after = [entry for entry in answered if entry["t"] > killed_at + 1.0]  # type: ignore[operator]
        print(
            f"\nRay Serve, 2 replicas, one SIGKILLed mid-load: {len(log)} requests, {len(answered)} answered, "
            f"{len(retried)} needed their one retry"
        )
        assert len(answered) == len(log), [e for e in log if e not in answered][:5]
        assert len(after) > 10
        assert all(_pid(str(e["attempts"][-1][1])) != victim for e in after)  # type: ignore[index]
        assert len(retried) <= 6 * 2, retried  # only requests caught on the killed replica

        # the controller replaces the dead replica: two live identities again, the victim's not among them
        deadline = time.monotonic() + 90
        alive: set[int] = set()
        with httpx.Client(base_url=base, timeout=60) as http:
            while len(alive) < 2 and time.monotonic() < deadline:
                r = http.post(f"/v1/models/{MODEL}/predict", json=_body(3))
                if r.status_code == 200:
                    alive.add(_pid(r.headers[HEADER]))
                time.sleep(0.1)
        assert len(alive) == 2 and victim not in alive, alive
