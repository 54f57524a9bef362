"""Measure the service's limits on a real `dropwise serve`: the largest allowed MC request, memory per request,
and `/healthz` while a large body is parsed. Prints one JSON object; asserts nothing (timings are noisy).

    OMP_NUM_THREADS=1 python bench/service_limits.py [--repository DIR] [--model cnn_mnist] [--repeat 10]

Without `--repository` the model is trained quickly (`quick=True`) into a temporary repository. The largest
allowed request is `max_mc_sample_rows` sample-rows: 1024 rows x T=64 with the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

DROPWISE = str(Path(sys.executable).with_name("dropwise"))


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rss_mib(pid: int) -> float:
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repository", type=Path)
    parser.add_argument("--model", default="cnn_mnist")
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="dropwise-limits-"))
    repo = args.repository
    if repo is None:
        from dropwise.zoo_training import train_zoo

        repo = workdir / "repo"
        train_zoo([args.model], repo, quick=True, progress=False)
    port = _port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "DROPWISE_DEVICE": "cpu", "DROPWISE_LOG_LEVEL": "warning"}
    log = open(workdir / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [DROPWISE, "serve", "--repository", str(repo), "--port", str(port)], env=env, stdout=log, stderr=log
    )
    try:
        while True:
            try:
                if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise SystemExit((workdir / "server.log").read_text()[-2000:])
            time.sleep(0.3)
        info = httpx.get(f"{base}/v1/models/{args.model}").json()
        shape = [1024, *info["input"]["shape"][1:]]
        x = np.random.default_rng(0).random(shape).round(4).tolist()
        largest = {"inputs": x, "mode": "mc", "num_samples": 64, "seed": 1}
        seconds, rss = [], []
        with httpx.Client(base_url=base, timeout=120) as client:
            for _ in range(args.repeat):
                start = time.perf_counter()
                r = client.post(f"/v1/models/{args.model}/predict", json=largest)
                seconds.append(time.perf_counter() - start)
                assert r.status_code == 200, r.text[:300]
                rss.append(_rss_mib(proc.pid))
            over = client.post(f"/v1/models/{args.model}/predict", json={**largest, "num_samples": 65})
        body = json.dumps({"inputs": np.random.default_rng(1).random((1024, 64)).round(6).tolist() * 11}).encode()
        healthz = asyncio.run(_healthz_during(base, args.model, body))
        print(
            json.dumps(
                {
                    "model": args.model,
                    "largest_request": "1024 rows x T=64 (65536 sample-rows)",
                    "seconds": [round(s, 2) for s in seconds],
                    "rss_mib_after_each": [round(m) for m in rss],
                    "rss_growth_mib_10_vs_1": round(rss[-1] - rss[0], 1),
                    "over_limit_status": over.status_code,
                    "over_limit_message": over.json()["error"]["message"],
                    "body_mib": round(len(body) / 2**20, 1),
                    **healthz,
                },
                indent=1,
            )
        )
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


async def _healthz_during(base: str, model: str, body: bytes) -> dict[str, object]:
    """Ping /healthz every 20 ms while an ~8 MiB native body (wrong shape: answered 400 after parsing) is sent."""
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        latencies: list[float] = []
        done = False

        async def ping() -> None:
            while not done:
                start = time.perf_counter()
                await client.get("/healthz")
                latencies.append(time.perf_counter() - start)
                await asyncio.sleep(0.02)

        pinger = asyncio.create_task(ping())
        await asyncio.sleep(0.2)
        start = time.perf_counter()
        r = await client.post(f"/v1/models/{model}/predict", content=body)
        took = time.perf_counter() - start
        done = True
        await pinger
    return {
        "big_body_status": r.status_code,
        "big_body_seconds": round(took, 2),
        "healthz_max_ms": round(1000 * max(latencies), 1),
        "healthz_p50_ms": round(1000 * float(np.median(latencies)), 1),
    }


if __name__ == "__main__":
    main()
