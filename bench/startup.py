"""Start-up of `dropwise serve`: seconds from launching the process to the first `/healthz` 200 and to
`/readyz` 200, and what `/readyz` said it was waiting for on the way.

    python -m bench.startup --repository model_repository          # a trained repository
    python -m bench.startup --first-start                          # empty ./model_repository, --quick-train
    python -m bench.startup --repository R --dropwise OTHER/.venv/bin/dropwise   # another checkout, side by side

The server runs as a real subprocess (the installed `dropwise` console script, on the CPU with one torch
thread); both endpoints are polled every 20 ms from the moment the process is launched. Prints one JSON
object. Timings depend on the machine's load: measure before and after side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

DROPWISE = str(Path(sys.executable).with_name("dropwise"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def measure(
    repository: Path | None, *, cwd: Path, extra: list[str], timeout: float, dropwise: str = DROPWISE
) -> dict[str, Any]:
    """Launch `dropwise serve`, poll it until ready (or `timeout`), stop it; return the timings."""
    port = _free_port()
    cmd = [dropwise, "serve", "--port", str(port), "--device", "cpu", *extra]
    if repository is not None:
        cmd += ["--repository", str(repository)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    base = f"http://127.0.0.1:{port}"
    result: dict[str, Any] = {"command": " ".join(cmd), "healthz_s": None, "ready_s": None, "waiting_for": []}
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            with httpx.Client(base_url=base, timeout=2) as client:
                while time.perf_counter() - start < timeout:
                    if proc.poll() is not None:
                        log.seek(0)
                        result["exited"] = proc.returncode
                        result["log_tail"] = log.read().decode(errors="replace")[-2000:]
                        break
                    try:
                        if result["healthz_s"] is None and client.get("/healthz").status_code == 200:
                            result["healthz_s"] = round(time.perf_counter() - start, 3)
                        ready = client.get("/readyz")
                    except httpx.HTTPError:
                        time.sleep(0.02)
                        continue
                    if ready.status_code == 200:
                        result["ready_s"] = round(time.perf_counter() - start, 3)
                        break
                    reason = ready.json().get("waiting_for")
                    if reason and (not result["waiting_for"] or result["waiting_for"][-1] != reason):
                        result["waiting_for"].append(reason)
                    time.sleep(0.02)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, help="A trained model repository to serve.")
    parser.add_argument(
        "--first-start", action="store_true", help="Serve an empty default repository with --quick-train."
    )
    parser.add_argument("--dropwise", default=DROPWISE, help="The dropwise console script to start.")
    parser.add_argument("--timeout", type=float, default=600.0, help="Give up after this many seconds.")
    args = parser.parse_args(argv)
    if args.first_start:
        with tempfile.TemporaryDirectory() as scratch:
            result = measure(
                None, cwd=Path(scratch), extra=["--quick-train"], timeout=args.timeout, dropwise=args.dropwise
            )
    elif args.repository is not None:
        repo = args.repository.resolve()
        result = measure(repo, cwd=Path.cwd(), extra=[], timeout=args.timeout, dropwise=args.dropwise)
    else:
        parser.error("give --repository DIR or --first-start")
    print(json.dumps(result, indent=2))
    return 0 if result["ready_s"] is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
