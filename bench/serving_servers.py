"""Servers under test for `bench.serving`: dropwise and LitServe subprocesses, pinned to one CPU, stopped whole."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from bench.serving_config import CLIENTS, ROOT


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(url: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s")


SERVER_CORES: set[int] | None = None
"""CPUs the server under test may use (set by `main`; None = unpinned)."""


def pin(no_pin: bool) -> tuple[set[int], set[int]] | None:
    """Pin this process (the load generator) to one CPU and reserve another for the servers.

    With at least two CPUs allowed, the server under test gets the first and the load generator the second,
    for every server alike, so the clients no longer compete with the server for its core. Returns
    (server CPUs, client CPUs), or None when unpinned.
    """
    global SERVER_CORES
    allowed = sorted(os.sched_getaffinity(0))
    if no_pin or len(allowed) < 2:
        SERVER_CORES = None
        return None
    SERVER_CORES = {allowed[0]}
    client = {allowed[1]}
    os.sched_setaffinity(0, client)
    return SERVER_CORES, client


@contextmanager
def _process(
    command: Sequence[str], ready_url: str, env: dict[str, str], cwd: Path = ROOT
) -> Iterator[subprocess.Popen]:
    with tempfile.TemporaryFile() as log:
        # A session of its own: LitServe forks an API server and inference workers, and every one of them
        # must go when the run ends.
        cores = SERVER_CORES
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
            # every server alike: pinned before it starts, so its workers and threads inherit the core
            preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,
        )
        try:
            try:
                _wait_ready(ready_url, process)
            except RuntimeError:
                log.seek(0)
                sys.stderr.write(log.read()[-4000:].decode(errors="replace"))
                raise
            yield process
        finally:
            _stop_group(process)


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL whatever is left after a grace period."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


@contextmanager
def dropwise_server(
    repository: Path, port: int, max_batch_size: int, tree: Path | None = None
) -> Iterator[subprocess.Popen]:
    """``dropwise serve`` on loopback with the given max batch size (1 = no dynamic batching).

    ``tree``: serve with another checkout of dropwise instead (its own ``.venv``, run from its root), for a
    before/after comparison in one run.
    """
    env = {
        **os.environ,
        "DROPWISE_MAX_BATCH_SIZE": str(max_batch_size),
        "DROPWISE_LOG_LEVEL": "warning",
        "DROPWISE_QUEUE_CAPACITY": str(4 * CLIENTS),
    }
    command = [
        str(tree / ".venv" / "bin" / "python") if tree is not None else sys.executable,
        "-c",
        "from dropwise.cli import main; main()",
        "serve",
        "--repository",
        str(repository),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
    ]
    with _process(command, f"http://127.0.0.1:{port}/readyz", env, cwd=tree or ROOT) as process:
        yield process


@contextmanager
def litserve_server(package: Path, port: int) -> Iterator[subprocess.Popen]:
    """LitServe serving the MLP package on loopback."""
    command = [sys.executable, "-m", "bench.serving_litserve", str(package), str(port)]  # cwd: the repository
    with _process(command, f"http://127.0.0.1:{port}/health", dict(os.environ)) as process:
        yield process
