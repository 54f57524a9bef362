"""Every reference network of the `quick_repository` served by the torch backend: deterministic and MC.

Networks whose sites have no hash-mask form (DropConnect, DropBlock, FractalJoin) run their own train-mode
code with draws keyed per row (DropBlock rescaled per sample), so their MC requests share the trunk pass
like the others; the seeded-reproducibility promise is checked for them under concurrent load too.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest
from dropwise.service.app import create_app
from dropwise.service.repository import ModelRepository
from dropwise.service.runtimes.base import MCGroup
from dropwise.service.runtimes.torch_runtime import TorchRuntime
from dropwise.service.settings import Settings
from fastapi.testclient import TestClient


def _inputs(info: dict, n: int, seed: int) -> list:
    shape = [n, *info["input"]["shape"][1:]]
    rng = np.random.default_rng(seed)
    if info["input"]["dtype"] == "int64":
        return rng.integers(0, 8, size=shape).tolist()
    return rng.normal(size=shape).round(3).tolist()


def test_every_zoo_network_answers_both_modes(quick_repository: Path) -> None:
    with TestClient(create_app(Settings(repository=quick_repository, device="cpu"))) as client:
        assert client.get("/readyz").status_code == 200
        models = client.get("/v1/models").json()["models"]
        assert len(models) >= 8
        for summary in models:
            name = summary["name"]
            info = client.get(f"/v1/models/{name}").json()
            assert info["mc_available"], name
            x = _inputs(info, 2, 0)
            det = client.post(f"/v1/models/{name}/predict", json={"inputs": x})
            assert det.status_code == 200, (name, det.text)
            mc = client.post(f"/v1/models/{name}/predict", json={"inputs": x, "mode": "mc", "samples": 4, "seed": 1})
            assert mc.status_code == 200, (name, mc.text)
            body = mc.json()
            if info["task"] == "classification":
                probs = np.asarray(body["probabilities"])
                assert probs.shape == (2, len(info["labels"]))
                np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
                assert min(body["uncertainty"]["mutual_information"]) >= 0
            else:
                assert np.asarray(body["mean"]).shape[0] == 2
                assert np.all(np.asarray(body["uncertainty"]["std"]) >= 0)


TRAIN_MODE_SITE_NETWORKS = ["cnn_mnist", "dropconnect_mlp_digits", "fractal_mnist"]


@pytest.mark.parametrize("name", TRAIN_MODE_SITE_NETWORKS)
def test_train_mode_site_networks_share_the_trunk_pass(quick_repository: Path, name: str) -> None:
    (spec,) = ModelRepository(quick_repository).scan()[name].values()
    runtime = TorchRuntime(spec, device="cpu")
    runtime.load()
    assert any(type(m).__name__ == "TrainModeSite" for m in runtime.engine.replaced)
    assert runtime.shares_trunk and runtime.mc_path == "engine"
    calls: list[int] = []
    runtime.engine.trunk.register_forward_hook(lambda _m, args, _o: calls.append(int(args[0].shape[0])))
    x = np.asarray(_inputs({"input": {"shape": [None, *spec.sample_shape], "dtype": spec.input_dtype}}, 3, 0))
    groups = [MCGroup(1, 4, 1, False), MCGroup(2, 7, 2, False)]
    batched = runtime.predict_mc(x.astype(spec.input_dtype), groups)
    assert calls == [3], "one trunk pass for both requests"
    alone = runtime.predict_mc(x[1:].astype(spec.input_dtype), groups[1:])
    for key, value in alone[0].items():
        np.testing.assert_allclose(batched[1][key], value, rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("name", TRAIN_MODE_SITE_NETWORKS)
def test_train_mode_site_networks_stay_reproducible_under_batching(quick_repository: Path, name: str) -> None:
    settings = Settings(repository=quick_repository, device="cpu", max_queue_delay_ms=30)

    async def main() -> tuple[dict, list[dict]]:
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://svc", timeout=120) as client:
                info = (await client.get(f"/v1/models/{name}")).json()
                target = {"inputs": _inputs(info, 2, 5), "mode": "mc", "samples": 4, "seed": 77}
                url = f"/v1/models/{name}/predict"
                alone = (await client.post(url, json=target)).json()
                others = [
                    client.post(url, json={"inputs": _inputs(info, 1, i), "mode": "mc", "samples": 3, "seed": i})
                    for i in range(4)
                ]
                answers = await asyncio.gather(*others[:2], client.post(url, json=target), *others[2:])
                assert all(a.status_code == 200 for a in answers)
                return alone, [answers[2].json()]

    alone, (crowded,) = asyncio.run(main())
    assert crowded["timings"]["batch_rows"] > 2, "the target was never batched with others"
    np.testing.assert_allclose(crowded["probabilities"], alone["probabilities"], rtol=0, atol=1e-6)
