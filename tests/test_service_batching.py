"""Dynamic batching in process: seeded results independent of batch company, shared MC batches with
different T, 429 on a full queue, 504 past the deadline, and the Prometheus metrics that count it all.

The app runs with its real lifespan, batcher and runtimes; requests go through httpx's ASGI transport
concurrently on one event loop.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from dropwise.service.app import create_app
from dropwise.service.settings import Settings
from prometheus_client.parser import text_string_to_metric_families
from test_service_fixtures import build_service_repository, queue_depth

URL = "/v1/models/mlp_digits/predict"


@pytest.fixture(scope="module")
def repo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_service_repository(request, tmp_path_factory.mktemp("svc"))


def _run(settings: Settings, body: Callable[[httpx.AsyncClient], Awaitable[Any]]) -> Any:
    """Run `body` against a fresh app (lifespan included) with an ASGI client."""

    async def main() -> Any:
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://svc", timeout=60) as client:
                return await body(client)

    return asyncio.run(main())


def _x(n: int, seed: int) -> list[list[float]]:
    return np.random.default_rng(seed).integers(0, 17, size=(n, 64)).astype(float).tolist()


def test_seeded_mc_result_does_not_depend_on_batch_company(repo: Path) -> None:
    target = {"inputs": _x(2, 0), "mode": "mc", "samples": 16, "seed": 5, "return_samples": True}
    settings = Settings(repository=repo, device="cpu", max_queue_delay_ms=30, max_batch_size=256)

    async def body(client: httpx.AsyncClient) -> tuple[dict, list[dict]]:
        alone = (await client.post(URL, json=target)).json()
        others = [
            {"inputs": _x(1 + i % 3, 100 + i), "mode": "mc", "samples": 4 + 4 * (i % 5), "seed": i} for i in range(24)
        ]
        jobs = [client.post(URL, json=b) for b in others[:12]]
        jobs += [client.post(URL, json=target) for _ in range(3)]
        jobs += [client.post(URL, json=b) for b in others[12:]]
        answers = await asyncio.gather(*jobs)
        assert all(a.status_code == 200 for a in answers)
        return alone, [a.json() for a in answers[12:15]]

    alone, crowded = _run(settings, body)
    assert alone["timings"]["batch_rows"] == 2
    assert max(c["timings"]["batch_rows"] for c in crowded) > 2, "the target was never batched with others"
    for answer in crowded:
        np.testing.assert_allclose(answer["samples"], alone["samples"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(answer["probabilities"], alone["probabilities"], rtol=0, atol=1e-6)
        assert answer["predictions"] == alone["predictions"]
        for key, value in alone["uncertainty"].items():
            np.testing.assert_allclose(answer["uncertainty"][key], value, rtol=0, atol=1e-5)


def test_deterministic_result_does_not_depend_on_batch_company(repo: Path) -> None:
    target = {"inputs": _x(3, 1)}
    settings = Settings(repository=repo, device="cpu", max_queue_delay_ms=30)

    async def body(client: httpx.AsyncClient) -> tuple[dict, list[dict]]:
        alone = (await client.post(URL, json=target)).json()
        jobs = [client.post(URL, json={"inputs": _x(2, 50 + i)}) for i in range(10)]
        jobs.insert(5, client.post(URL, json=target))
        answers = await asyncio.gather(*jobs)
        return alone, [answers[5].json()]

    alone, (crowded,) = _run(settings, body)
    assert crowded["timings"]["batch_rows"] > 3
    np.testing.assert_allclose(crowded["probabilities"], alone["probabilities"], rtol=0, atol=1e-6)


def test_mc_requests_with_different_t_share_one_batch(repo: Path) -> None:
    settings = Settings(repository=repo, device="cpu", max_queue_delay_ms=100, max_batch_size=64)
    same = {"inputs": _x(1, 7), "mode": "mc", "seed": 1, "return_samples": True}

    async def body(client: httpx.AsyncClient) -> list[dict]:
        jobs = [client.post(URL, json={**same, "samples": t}) for t in (2, 8, 32)]
        return [a.json() for a in await asyncio.gather(*jobs)]

    answers = _run(settings, body)
    assert [a["num_samples"] for a in answers] == [2, 8, 32]
    assert all(a["timings"]["batch_rows"] == 3 for a in answers), [a["timings"] for a in answers]
    # the first T samples of a seeded request are the same whatever T is asked (sample t's masks are
    # keyed by t, not by T), so only the samples added by a larger T change the estimate
    per_sample = [np.asarray(a["samples"]) for a in answers]
    assert [s.shape[0] for s in per_sample] == [2, 8, 32]
    for small, large in itertools.pairwise(per_sample):
        np.testing.assert_allclose(large[: small.shape[0]], small, rtol=0, atol=1e-6)
    assert not np.allclose(per_sample[2][2:], per_sample[2][:1], atol=1e-3), "the samples do not vary"
    for answer, samples in zip(answers, per_sample, strict=True):
        np.testing.assert_allclose(answer["probabilities"], samples.mean(axis=0), rtol=0, atol=1e-5)
    assert answers[0]["probabilities"] != answers[2]["probabilities"]


def test_full_queue_answers_429_with_retry_after(repo: Path) -> None:
    settings = Settings(
        repository=repo, device="cpu", queue_capacity=2, max_batch_size=32, max_queue_delay_ms=0, max_samples=512
    )
    heavy = {"inputs": _x(32, 3), "mode": "mc", "samples": 512, "seed": 1}

    async def body(client: httpx.AsyncClient) -> list[httpx.Response]:
        return list(await asyncio.gather(*[client.post(URL, json=heavy) for _ in range(12)]))

    answers = _run(settings, body)
    codes = sorted(a.status_code for a in answers)
    assert set(codes) == {200, 429}, codes
    refused = [a for a in answers if a.status_code == 429]
    assert all(a.headers["retry-after"] == "1" for a in refused)
    assert all(a.json()["error"]["type"] == "QueueFull" for a in refused)


def test_request_past_its_deadline_answers_504(repo: Path) -> None:
    """The late request's deadline is a quarter of one measured heavy pass, and it waits behind at least
    two of them, so it runs out whatever the machine's speed (no CPU timing is built in)."""
    settings = Settings(repository=repo, device="cpu", max_batch_size=32, max_queue_delay_ms=0, max_samples=512)
    heavy = {"inputs": _x(32, 3), "mode": "mc", "samples": 512, "seed": 1}

    async def body(client: httpx.AsyncClient) -> tuple[float, list[httpx.Response], httpx.Response]:
        measured = [(await client.post(URL, json=heavy)).json() for _ in range(3)]
        pass_s = min(m["timings"]["compute_ms"] for m in measured) / 1000.0
        busy = [asyncio.ensure_future(client.post(URL, json=heavy)) for _ in range(6)]
        while queue_depth((await client.get("/metrics")).text) < 2:
            assert not all(b.done() for b in busy), "the heavy requests never queued up"
            await asyncio.sleep(0.001)
        late = await client.post(URL, json={"inputs": _x(1, 4), "timeout_s": max(pass_s / 4, 0.001)})
        return pass_s, list(await asyncio.gather(*busy)), late

    pass_s, busy, late = _run(settings, body)
    assert pass_s > 0
    assert all(a.status_code == 200 for a in busy)
    assert late.status_code == 504, (pass_s, late.json())
    assert late.json()["error"]["field"] == "timeout"


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_requests_latency_queue_batches_and_samples(repo: Path) -> None:
    settings = Settings(repository=repo, device="cpu", max_queue_delay_ms=20, max_samples=64)

    async def body(client: httpx.AsyncClient) -> str:
        await asyncio.gather(*[client.post(URL, json={"inputs": _x(2, i)}) for i in range(3)])
        await asyncio.gather(
            *[client.post(URL, json={"inputs": _x(1, i), "mode": "mc", "samples": 8 * (i + 1)}) for i in range(2)]
        )
        await client.post(URL, json={"inputs": [[1.0]]})
        await client.post(URL, json={"inputs": _x(1, 0), "mode": "mc", "samples": 65})
        await client.post("/v1/models/unknown/predict", json={"inputs": _x(1, 0)})
        response = await client.get("/metrics")
        assert response.headers["content-type"].startswith("text/plain")
        return response.text

    m = _samples(_run(settings, body))

    def requests(mode: str, status: str, model: str = "mlp_digits") -> float:
        route = "/v1/models/{name}/predict"
        key = ("dropwise_requests_total", (("mode", mode), ("model", model), ("route", route), ("status", status)))
        return m.get(key, 0.0)

    assert requests("deterministic", "200") == 3
    assert requests("mc", "200") == 2
    assert requests("deterministic", "400") == 1
    assert requests("mc", "400") == 1
    assert requests("_none", "404", model="_unknown") == 1  # refused before its body was read
    latency = ("dropwise_request_latency_seconds_count", (("mode", "mc"), ("model", "mlp_digits")))
    assert m[latency] == 3  # two answered, one refused for its T
    assert m[("dropwise_queue_time_seconds_count", (("model", "mlp_digits"),))] == 5
    assert m[("dropwise_mc_samples_sum", (("model", "mlp_digits"),))] == 8 + 16
    rows = m[("dropwise_batch_size_sum", (("mode", "deterministic"), ("model", "mlp_digits")))]
    assert rows == 6
    assert m[("dropwise_queue_depth", (("model", "mlp_digits"),))] == 0
