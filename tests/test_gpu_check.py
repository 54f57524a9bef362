"""`bench/gpu_check.py`, the one prepared GPU check, run on the CPU with its CUDA calls simulated.

It must not fail for a trivial reason on its first real run: this test runs every section with
`--simulate` (the same code paths, the device mapped to the CPU) through `bench/gpu_check.sh` (which lays
the dropwise.* namespace out itself, as on a machine where dropwise is not installed) with a Python where
pydantic, FastAPI, uvicorn, scikit-learn and the other service and training dependencies cannot be
imported, as on a lent GPU machine that has only torch, numpy and onnx. Its table of zoo networks must match
the zoo registry.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from dropwise.models.data import load_dataset
from dropwise.models.zoo import ZOO

from bench.gpu_check import NETWORKS, TIMED

ROOT = Path(__file__).resolve().parents[1]
#: the operator table's networks in the simulated run (an MLP, a CNN, a token model: every input kind; the
#: real run times all of `TIMED`)
TIMED_HERE = ("mlp_digits", "cnn_mnist", "embedding_digits_tokens")
#: what a GPU machine with only torch, numpy and onnx lacks
ABSENT = (
    "pydantic",
    "pydantic_core",
    "pydantic_settings",
    "fastapi",
    "starlette",
    "uvicorn",
    "httpx",
    "prometheus_client",
    "typer",
    "sklearn",
    "scipy",
    "mlxtend",
    "safetensors",
)
RUN_WITHOUT = textwrap.dedent(
    """
    import runpy, sys
    ABSENT = set(sys.argv[1].split(","))
    # `-m MODULE ARGS...` as python would take them
    assert sys.argv[2] == "-m", sys.argv
    MODULE = sys.argv[3]

    class Hide:  # every finder answers "not found" for an absent module, as on a machine without it
        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ABSENT:
                return None
            return self.inner.find_spec(name, path, target)

        def __getattr__(self, attribute):
            return getattr(self.inner, attribute)

    sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]
    sys.argv = [MODULE, *sys.argv[4:]]
    runpy.run_module(MODULE, run_name="__main__", alter_sys=True)
    """
)


def test_the_absent_modules_really_are_absent_in_the_subprocess() -> None:
    probe = RUN_WITHOUT.replace('runpy.run_module(MODULE, run_name="__main__", alter_sys=True)', "import pydantic")
    done = subprocess.run(
        [sys.executable, "-c", probe, ",".join(ABSENT), "-m", "x"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "No module named 'pydantic'" in done.stderr


def test_networks_match_the_zoo_registry() -> None:
    assert set(NETWORKS) == set(ZOO) and set(TIMED) <= set(NETWORKS)
    for name, net in NETWORKS.items():
        spec = ZOO[name]
        assert f"{net.build.__module__}:{net.build.__name__}" == spec.factory, name
        assert net.kwargs == spec.kwargs, name
        assert net.task == spec.task, name
        data = load_dataset(spec.dataset)
        assert net.input_shape == tuple(data.input_shape) and net.input_dtype == data.input_dtype, name


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_gpu_check_runs_simulated_without_the_service_dependencies(tmp_path: Path) -> None:
    args = [
        "--simulate",
        "--samples",
        "4",
        "--big-t",
        "8",
        "--repeats",
        "1",
        "--mc-batch",
        "4",
        "--mc-samples",
        "2",
        "--timed",
        ",".join(TIMED_HERE),
        "--compiled",
        "mlp_digits",  # one compile keeps the simulated run short; the real run compiles every timed network
    ]
    python = tmp_path / "python-without-the-service"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} -c {shlex.quote(RUN_WITHOUT)} {",".join(ABSENT)} "$@"\n')
    python.chmod(0o755)
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHON": str(python)},
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["passed"] and report["environment"]["simulated"] is True
    assert all(check["passed"] for check in report["checks"])
    assert report["hash_masks"]["result"]["decisions_compared"] > 100_000
    assert report["hash_masks"]["result"]["mismatches"] == 0
    networks = report["seeded_mc"]["result"]["networks"]
    assert set(networks) == set(NETWORKS)
    assert all(row["passed"] and row["mc_spread"] > 0 for row in networks.values())
    assert all(row["batch_company_max_abs"] <= 1e-5 for row in networks.values())
    operators = report["operators"]["result"]["networks"]
    assert set(operators) == set(TIMED_HERE)
    for rows in operators.values():
        for label in ("det (64 rows)", "1 x T=32", "64 x T=32", "64 x T=8"):
            assert rows[label]["kernel_ops"] > 0 and rows[label]["median_ms"] > 0
            assert rows[label]["cuda_launches"] is None  # no CUDA profiler activity on the CPU
    compiled = operators["mlp_digits"]["compiled (default)"]
    assert "error" not in compiled and compiled["max_abs_vs_eager"] <= 1e-4
    for label in ("1 x T=32", "64 x T=32", "64 x T=8"):
        assert 0 < compiled[label]["profiler_kernels"] <= 3 * operators["mlp_digits"]["det (64 rows)"]["kernel_ops"]
        # one compiled call per chunk of the device's chunk policy (simulated: the CPU's cache-sized chunks)
        assert compiled[label]["graphs"] >= 1 and compiled[label]["cuda_launches"] is None
    assert "(b) MC / one deterministic forward" in report["bench_mc"]["result"]["T=2"]["output"]
    text = (out / "gpu_check.txt").read_text()
    assert "SIMULATED on the CPU" in text and "PASSED" in text
