"""Shared test helpers of the service tests: a small real model repository and a real uvicorn server.

The repository holds three quickly trained reference networks (a float classifier, a token classifier,
a regressor), copied from the session's `quick_repository` when a collected test uses that fixture and
trained here otherwise; a copy with ONNX graphs serves the ONNX Runtime tests. Nothing here is a mock:
packages are real, verified, and served by the real app.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

SERVICE_MODELS = ("mlp_digits", "embedding_digits_tokens", "mlp_diabetes")
_BUILT: dict[str, Path] = {}
ROOT = Path(__file__).resolve().parents[1]
#: the installed console script (`python -m dropwise.cli` would define a second `UserError` class)
DROPWISE = str(Path(sys.executable).with_name("dropwise"))


def _add_onnx(package_dir: Path, mc: bool = True) -> None:
    """Add `model.onnx` and, when asked and the MC exporter is installed, `model.mc.onnx` to a package."""
    from dropwise.package import add_file, load_package
    from dropwise.surgery.export import export_deterministic

    loaded = load_package(package_dir)
    manifest = loaded.manifest
    shape = [2, *manifest.input.shape[1:]]
    dtype = torch.int64 if manifest.input.dtype == "int64" else torch.float32
    example = torch.zeros(shape, dtype=dtype)
    scratch = package_dir.parent / f".{package_dir.name}.scratch"
    scratch.mkdir(exist_ok=True)
    if "model.onnx" not in manifest.files:
        export_deterministic(loaded.model, example, scratch / "model.onnx", input_name=manifest.input.name)
        add_file(package_dir, "model.onnx", scratch / "model.onnx")
    if mc and "model.mc.onnx" not in manifest.files:
        try:
            from dropwise.surgery.mc_export import export_mc_onnx
        except ImportError:
            return
        export_mc_onnx(
            loaded.model,
            example,
            scratch / "model.mc.onnx",
            task=manifest.task,
            input_name=manifest.input.name,
        )
        add_file(package_dir, "model.mc.onnx", scratch / "model.mc.onnx")
    shutil.rmtree(scratch)


def build_service_repository(request: pytest.FixtureRequest, root: Path) -> Path:
    """A repository with the three `SERVICE_MODELS` (one version each, torch weights), built once."""
    if "repo" in _BUILT:
        return _BUILT["repo"]
    from dropwise.package import list_versions

    repo = root / "service_repository"
    source: Path | None = None
    # Reuse the session's `quick_repository` when some collected test needs it anyway (its cost is then
    # shared); otherwise training only these three networks is much faster than the whole zoo.
    wanted = any("quick_repository" in getattr(item, "fixturenames", ()) for item in request.session.items)
    if wanted:
        with contextlib.suppress(pytest.FixtureLookupError):
            source = Path(request.getfixturevalue("quick_repository"))
    for name in SERVICE_MODELS:
        if source is not None and (source / name).is_dir() and list_versions(source / name):
            version = list_versions(source / name)[-1]
            shutil.copytree(source / name / str(version), repo / name / str(version))
        else:
            from dropwise.zoo_training import train_zoo

            train_zoo([name], repo, quick=True, progress=False)
    _BUILT["repo"] = repo
    return repo


def build_onnx_repository(request: pytest.FixtureRequest, root: Path) -> Path:
    """A copy of the service repository with `model.onnx` in every package, built once.

    `model.mc.onnx` (slow to export) is added to the two float models only; the token model stays
    deterministic-only on ONNX Runtime, which the tests also check.
    """
    if "onnx" in _BUILT:
        return _BUILT["onnx"]
    from dropwise.package import list_versions

    source = build_service_repository(request, root)
    repo = root / "service_onnx_repository"
    shutil.copytree(source, repo)
    for name in SERVICE_MODELS:
        _add_onnx(repo / name / str(list_versions(repo / name)[-1]), mc=name != "embedding_digits_tokens")
    _BUILT["onnx"] = repo
    return repo


def queue_depth(metrics_text: str, model: str = "mlp_digits") -> float:
    """The ``dropwise_queue_depth`` gauge of ``model`` in a ``/metrics`` answer (0 when absent)."""
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "dropwise_queue_depth" and sample.labels.get("model") == model:
                return sample.value
    return 0.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running_server(
    repository: Path | None,
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
    timeout: float = 120.0,
) -> Iterator[str]:
    """Run `dropwise serve` in a subprocess on a free port; yield its base URL once /readyz answers 200.

    `repository` None passes no `--repository` flag (the default `./model_repository` under `cwd`).
    """
    port = free_port()
    cmd = [DROPWISE, "serve", "--port", str(port)]
    if repository is not None:
        cmd += ["--repository", str(repository)]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    log = cwd / f"server-{port}.log" if repository is None else repository.parent / f"server-{port}.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([*cmd, *args], cwd=cwd, env=full_env, stdout=sink, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server not ready after {timeout} s:\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
