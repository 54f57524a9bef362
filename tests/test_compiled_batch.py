"""The compiled MC batch (issue 14 item 4): tail, hash masks and summaries as one torch.compile'd function.

Counts are deterministic (no timing): a batch of 64 one-row requests at T=32 must launch at most 3x the
kernel operators of one eager deterministic pass on the same 64 rows, for an MLP and a CNN; the results
must equal the eager engine's (same masks: only float rounding of the fused arithmetic may differ), keep
their reproducibility across batch company, and a new batch size or T must not compile again.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._inductor.config as inductor_config
from dropwise.service.repository import ModelRepository
from dropwise.service.runtimes.base import MCGroup
from dropwise.service.runtimes.torch_runtime import TorchRuntime
from dropwise.service.settings import Settings
from dropwise.surgery.engine import MCEngine
from pydantic import ValidationError
from torch._dynamo.utils import counters

from bench.op_counts import _network, count, count_launches

#: agreement with the eager engine (float32 rounding of fused kernels vs eager operators)
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _kernel_profile() -> object:
    """Generated CPU kernels show up in the profiler only when compiled with kernel profiling on."""
    saved = inductor_config.cpp.enable_kernel_profile
    inductor_config.cpp.enable_kernel_profile = True
    yield
    inductor_config.cpp.enable_kernel_profile = saved


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def _engines(name: str) -> tuple[MCEngine, MCEngine, torch.nn.Module, torch.Tensor]:
    model, x, sites, task = _network(name)
    eager = MCEngine(model, x[:8], sites, task=task, chunk_rows=1 << 30)
    compiled = MCEngine(model, x[:8], sites, task=task, chunk_rows=1 << 30, compile=True)
    return eager, compiled, copy.deepcopy(model).eval(), x


# "c": the zoo MNIST CNN with its torch dropout sites (conv trunk, Dropout2d + Dropout in the tail)
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", ["mlp_digits", "c"])
def test_compiled_batch_launches_at_most_3x_a_deterministic_pass_and_matches_eager(name: str) -> None:
    eager, compiled, model, x = _engines(name)
    seeds = list(range(64))
    with torch.inference_mode():
        want = eager.run_batch(x, [1] * 64, [32] * 64, seeds)
        got = compiled.run_batch(x, [1] * 64, [32] * 64, seeds)
    assert compiled.compile_error is None
    for a, b in zip(got, want, strict=True):
        assert a.as_dict().keys() == b.as_dict().keys()
        for key, value in a.as_dict().items():
            assert value.shape == b.as_dict()[key].shape
            assert _close(value, b.as_dict()[key]) <= ATOL, key
    assert max(float(r.mutual_information.max()) for r in got) > 0  # really stochastic

    det = count(lambda: model(x))
    batch = count_launches(lambda: compiled.run_batch(x, [1] * 64, [32] * 64, seeds))
    assert batch.graphs == 1 and batch.generated > 0
    assert batch.total <= 3 * det.total, (batch.total, det.total, dict(batch.extern))

    # other batch sizes, T and request shapes reuse the compiled graph; a request is reproducible in company
    graphs = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        alone = compiled(x[3:5], samples=16, seed=9)
        company = compiled.run_batch(x[:7], [3, 2, 1, 1], [16, 16, 16, 16], [1, 9, 2, 3])
        one = compiled(x[:1], samples=7, seed=4)
        one_eager = eager(x[:1], samples=7, seed=4)
    assert counters["stats"]["unique_graphs"] == graphs
    assert _close(alone.probabilities, company[1].probabilities) <= 1e-6
    assert _close(one.probabilities, one_eager.probabilities) <= ATOL


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compiled_samples_and_regression_match_eager() -> None:
    eager, compiled, _model, x = _engines("mlp_diabetes")
    with torch.inference_mode():
        want = eager.run_batch(x[:5], [2, 3], [8, 4], [0, 1], return_samples=True)
        got = compiled.run_batch(x[:5], [2, 3], [8, 4], [0, 1], return_samples=True)
    assert compiled.compile_error is None
    for a, b in zip(got, want, strict=True):
        assert a.samples is not None and b.samples is not None and a.samples.shape == b.samples.shape
        assert a.mean is not None and b.mean is not None
        assert _close(a.samples, b.samples) <= ATOL
        assert _close(a.mean, b.mean) <= ATOL and _close(a.std, b.std) <= ATOL
        assert float(a.std.max()) > 0


def test_compile_option_is_validated() -> None:
    model, x, sites, task = _network("mlp_diabetes")
    with pytest.raises(ValueError, match="compile must be"):
        MCEngine(model, x[:8], sites, task=task, compile="fastest")
    with pytest.raises(ValueError, match="exportable"):
        MCEngine(model, x[:8], sites, task=task, compile=True, exportable=True)
    assert MCEngine(model, x[:8], sites, task=task, compile="reduce-overhead").compile == "reduce-overhead"


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_service_setting_serves_mc_through_the_compiled_batch(
    quick_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DROPWISE_MC_COMPILE", "default")
    assert Settings().mc_compile == "default"
    with pytest.raises(ValidationError):
        Settings(mc_compile="fastest")
    (spec,) = ModelRepository(quick_repository).scan()["mlp_diabetes"].values()
    eager, compiled = TorchRuntime(spec, device="cpu"), TorchRuntime(spec, device="cpu", mc_compile="default")
    eager.load()
    compiled.load()  # compiles both graphs (with and without per-sample outputs) while loading
    assert compiled.engine.compile == "default" and compiled.engine.compile_error is None
    assert compiled.mc_path == "engine"
    x = np.random.default_rng(0).standard_normal((3, *spec.sample_shape)).astype(spec.input_dtype)
    groups = [MCGroup(1, 8, 1, False), MCGroup(2, 16, 2, True)]
    graphs = counters["stats"]["unique_graphs"]
    got, want = compiled.predict_mc(x, groups), eager.predict_mc(x, groups)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled on a request
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(np.asarray(a[key]), np.asarray(b[key]), atol=ATOL, err_msg=key)
