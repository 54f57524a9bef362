"""Serving benchmark: throughput and latency of dropwise's HTTP service under 64 concurrent clients.

Run from the repository root (loopback only, about five minutes):

    .venv/bin/python -m bench.serving                 # every scenario, 3 rounds of 5 s per configuration
    .venv/bin/python -m bench.serving --repeats 1 --scenarios mlp

Scenarios (issue 6, goal "serving"):

1. ``cnn-mc``: MC-dropout requests (T=32, one row each) on a zoo CNN (``cnn_mnist``; ``--cnn`` picks another
   zoo network), dynamic batching on (max batch 64) against off (max batch 1);
2. ``cnn-det``: deterministic requests on the same CNN, batching on against off;
3. ``mlp``: MC requests (T=32, one row) on an MLP 64-256-256-10 with dropout p=0.5 after every hidden layer,
   dropwise (native JSON API, and the Open Inference Protocol with binary tensors) against LitServe serving
   the same network with its own batching (max batch 64). LitServe runs the usual vectorised MC dropout: the
   batch repeated T times through the network in train mode, then the same summaries.

Before/after: ``--baseline-tree DIR`` adds rows served by another checkout of dropwise (its own ``.venv``),
measured in the same alternating rounds.

Pinning: with two or more CPUs the server under test (every process of it) runs on the first CPU and the
load generator on the second (``os.sched_setaffinity``), for every server alike (``--no-pin`` to turn it
off), so throughput measures one server core rather than the machine.

Load generator: every client owns one HTTP/1.1 keep-alive connection (raw asyncio streams, requests encoded
once up front, responses read by Content-Length and checked for status 200), so the client side costs little
next to the servers. Every server runs in its own subprocess; the models are untrained (weights do not change
the cost). The bench asserts nothing about time. On a shared machine the figures are noisy: compare rows of
one run, not runs. The last column, server CPU time per request (every process of the server's group, read
from /proc over the measured window), depends far less on what else runs on the machine than throughput
does; an idle LitServe still polls its queues, which that column charges to its requests.

``pip install litserve`` to run the LitServe row (it is not a dependency of dropwise); without it that row is
skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.serving_config import CLIENTS, CNN_NAME, MAX_BATCH, MLP_NAME, SAMPLES
from bench.serving_litserve import ls
from bench.serving_load import http_post, run_load
from bench.serving_packages import build_repository
from bench.serving_report import Row, report
from bench.serving_servers import _free_port, dropwise_server, litserve_server, pin


def native_request(model: str, row: np.ndarray, mode: str) -> bytes:
    """Native API request of one row."""
    body: dict[str, object] = {"inputs": [row.tolist()], "mode": mode}
    if mode == "mc":
        body["num_samples"] = SAMPLES
    return http_post(f"/v1/models/{model}/predict", json.dumps(body).encode(), {"Content-Type": "application/json"})


def v2_binary_request(model: str, row: np.ndarray) -> bytes:
    """Open Inference Protocol request of one row with binary tensor data, as the Triton client sends it."""
    x = row.astype(np.float32)[None]
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "parameters": {"mode": "mc", "samples": SAMPLES, "binary_data_output": True},
        }
    ).encode()
    return http_post(
        f"/v2/models/{model}/infer",
        header + x.astype("<f4").tobytes(),
        {"Inference-Header-Content-Length": str(len(header))},
    )


def litserve_request(row: np.ndarray) -> bytes:
    """LitServe request of one row."""
    body = json.dumps({"inputs": [row.tolist()]}).encode()
    return http_post("/predict", body, {"Content-Type": "application/json"})


# ---------------------------------------------------------------------------------------------- main
@dataclass
class Config:
    """One measured configuration: a server (shared by configurations with the same key) and a request."""

    label: str
    server_key: str
    request: bytes


def _scenario_configs(scenario: str, args: argparse.Namespace, image: np.ndarray, vector: np.ndarray) -> list[Config]:
    if scenario in ("cnn-mc", "cnn-det"):
        request = native_request(args.cnn, image, "mc" if scenario == "cnn-mc" else "deterministic")
        return [
            Config(f"dropwise, batching (max {MAX_BATCH})", "batch", request),
            Config("dropwise, no batching", "nobatch", request),
        ]
    if scenario == "mlp":
        configs = [
            Config("dropwise native JSON, batching", "batch", native_request(MLP_NAME, vector, "mc")),
            Config("dropwise V2 binary, batching", "batch", v2_binary_request(MLP_NAME, vector)),
        ]
        if args.baseline_tree is not None:
            label = f"dropwise at {args.baseline_tree}"
            configs += [
                Config(f"{label}, native JSON", "tree", native_request(MLP_NAME, vector, "mc")),
                Config(f"{label}, V2 binary", "tree", v2_binary_request(MLP_NAME, vector)),
            ]
        if args.no_peers:
            print("  --no-peers: LitServe row skipped", file=sys.stderr)
        elif ls is None:
            print("  litserve not installed: LitServe row skipped", file=sys.stderr)
        else:
            label = f"LitServe {ls.__version__}, batching (max {MAX_BATCH})"
            configs.append(Config(label, "litserve", litserve_request(vector)))
        return configs
    raise ValueError(f"unknown scenario {scenario!r}; choose from cnn-mc, cnn-det, mlp")


def _start(
    key: str, repository: Path, port: int, baseline_tree: Path | None = None
) -> contextlib.AbstractContextManager[subprocess.Popen]:
    if key == "batch":
        return dropwise_server(repository, port, MAX_BATCH)
    if key == "nobatch":
        return dropwise_server(repository, port, 1)
    if key == "tree":
        return dropwise_server(repository, port, MAX_BATCH, tree=baseline_tree)
    return litserve_server(repository / MLP_NAME / "1", port)


def run_scenario(scenario: str, configs: Sequence[Config], repository: Path, args: argparse.Namespace) -> list[Row]:
    """Measure every configuration ``args.repeats`` times, one server up at a time (an idle LitServe still
    polls its queues), the order of the servers reversed every other round so a drift in the machine's load
    hits every configuration alike."""
    rows = {c.label: Row(scenario, c.label, []) for c in configs}
    keys = list(dict.fromkeys(c.server_key for c in configs))
    for round_index in range(args.repeats):
        for key in keys if round_index % 2 == 0 else list(reversed(keys)):
            port = _free_port()
            with _start(key, repository, port, args.baseline_tree) as process:
                for config in (c for c in configs if c.server_key == key):
                    print(f"  round {round_index + 1}: {config.label} ...", file=sys.stderr, flush=True)
                    result = run_load(port, config.request, args, pgid=process.pid)
                    if result.errors:
                        print(f"    {result.errors} errors, first: {result.first_error}", file=sys.stderr)
                    rows[config.label].runs.append(result)
    return list(rows.values())


def main(argv: Sequence[str] | None = None) -> None:
    """Run the chosen scenarios and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", nargs="+", default=["cnn-mc", "cnn-det", "mlp"])
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--cnn", default=CNN_NAME, help="zoo network of the cnn-* scenarios")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per scenario (order alternates)")
    parser.add_argument("--max-requests", type=int, default=200_000, help="cap on measured requests per run")
    parser.add_argument("--no-peers", action="store_true", help="dropwise rows only (no LitServe)")
    parser.add_argument(
        "--baseline-tree",
        type=Path,
        help="mlp scenario: also serve with this other checkout of dropwise (with its own .venv), e.g. before a change",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin the server and the load generator")
    args = parser.parse_args(argv)
    args.pinned = pin(args.no_pin)
    rng = np.random.default_rng(0)
    vector = rng.standard_normal(64).astype(np.float32)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="dropwise-bench-") as tmp:
        repository, image_shape = build_repository(Path(tmp) / "repository", args.cnn)
        image = rng.standard_normal(image_shape).astype(np.float32)
        for scenario in args.scenarios:
            print(f"{scenario}:", file=sys.stderr)
            try:
                configs = _scenario_configs(scenario, args, image, vector)
            except ValueError as exc:
                parser.error(str(exc))
            name = f"{scenario} ({args.cnn})" if scenario.startswith("cnn") else scenario
            rows += run_scenario(name, configs, repository, args)
    print(report(rows, args))


if __name__ == "__main__":
    main()
