"""Latency of one small request against a running service: sequential keep-alive requests on loopback.

Usage: `python -m bench.latency http://127.0.0.1:8000 [--model mlp_digits] [--requests 200]`.
A benchmark, not a test: it prints the median, p90 and minimum per mode and asserts nothing about time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx


def measure(client: httpx.Client, path: str, body: dict, *, warmup: int, requests: int) -> list[float]:
    """Seconds per request for `requests` sequential POSTs after `warmup` unmeasured ones."""
    for _ in range(warmup):
        client.post(path, json=body).raise_for_status()
    seconds = []
    for _ in range(requests):
        start = time.perf_counter()
        client.post(path, json=body).raise_for_status()
        seconds.append(time.perf_counter() - start)
    return sorted(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--model", default="mlp_digits")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    with httpx.Client(base_url=args.url, timeout=30) as client:
        spec = client.get(f"/v1/models/{args.model}").raise_for_status().json()
        features = spec["input"]["shape"][1:]
        if len(features) != 1:
            parser.error(f"{args.model} takes [batch, ...{features}]: pick a model with flat input")
        row = [[0.1 * (i % 7) for i in range(features[0])]]
        modes = {
            "deterministic": {"inputs": row},
            "mc T=32": {"inputs": row, "mode": "mc", "samples": 32, "seed": 1},
        }
        print(f"| {args.model}, one row | median ms | p90 ms | min ms |\n|---|---:|---:|---:|")
        for name, body in modes.items():
            t = measure(client, f"/v1/models/{args.model}/predict", body, warmup=args.warmup, requests=args.requests)
            p90 = t[int(0.9 * (len(t) - 1))]
            print(f"| {name} | {1000 * statistics.median(t):.2f} | {1000 * p90:.2f} | {1000 * t[0]:.2f} |")


if __name__ == "__main__":
    main()
