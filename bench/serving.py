"""Serving benchmark: throughput and latency of dropwise's HTTP service under 64 concurrent clients.

Run from the repository root (loopback only, about five minutes):

    .venv/bin/python bench/serving.py                 # every scenario, 3 rounds of 5 s per configuration
    .venv/bin/python bench/serving.py --repeats 1 --scenarios mlp

Scenarios (issue 6, goal "serving"):

1. ``cnn-mc``: MC-dropout requests (T=32, one row each) on a zoo CNN (``cnn_mnist``; ``--cnn`` picks another
   zoo network), dynamic batching on (max batch 64) against off (max batch 1);
2. ``cnn-det``: deterministic requests on the same CNN, batching on against off;
3. ``mlp``: MC requests (T=32, one row) on an MLP 64-256-256-10 with dropout p=0.5 after every hidden layer,
   dropwise (native JSON API, and the Open Inference Protocol with binary tensors) against LitServe serving
   the same network with its own batching (max batch 64). LitServe runs the usual vectorised MC dropout: the
   batch repeated T times through the network in train mode, then the same summaries.

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
import asyncio
import contextlib
import json
import os
import platform
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLIENTS = 64
SAMPLES = 32
MAX_BATCH = 64
MLP_NAME = "mlp_p05"
CNN_NAME = "cnn_mnist"
ROOT = Path(__file__).resolve().parents[1]

try:  # LitServe is optional: only the comparison row needs it.
    import litserve as ls
except ImportError:  # pragma: no cover - depends on the environment
    ls = None


# ---------------------------------------------------------------------------------------------- LitServe
if ls is not None:

    class MCDropoutLitAPI(ls.LitAPI):
        """LitServe serving MC dropout the way its users would: the batch repeated T times in train mode."""

        def __init__(self, package: str, samples: int, max_batch_size: int) -> None:
            super().__init__(max_batch_size=max_batch_size, batch_timeout=0.002)
            self.package = package
            self.samples = samples

        def setup(self, device: str) -> None:
            """Load the same package dropwise serves (weights verified by sha256)."""
            import torch
            from dropwise.package import load_package

            self.torch = torch
            self.model = load_package(self.package).model.to(device).train()

        def decode_request(self, request: dict) -> object:
            """One request: ``{"inputs": [[64 floats]]}`` -> a [64] float tensor."""
            return self.torch.tensor(request["inputs"][0], dtype=self.torch.float32)

        def batch(self, inputs: list) -> object:
            """Stack the decoded rows into one [B, 64] batch."""
            return self.torch.stack(inputs)

        def predict(self, x: object) -> dict[str, object]:
            """T stochastic passes in one batched forward, then the MC summaries per row."""
            torch = self.torch
            with torch.inference_mode():
                rows = x.shape[0]
                logits = self.model(x.repeat(self.samples, 1)).view(self.samples, rows, -1)
                log_p = torch.log_softmax(logits, dim=-1)
                p = log_p.exp()
                mean = p.mean(0)
                predictive = -(mean * mean.clamp_min(1e-12).log()).sum(-1)
                expected = -(p * log_p).sum(-1).mean(0)
                votes = torch.nn.functional.one_hot(p.argmax(-1), p.shape[-1]).sum(0)
                return {
                    "probabilities": mean,
                    "predictions": mean.argmax(-1),
                    "predictive_entropy": predictive,
                    "expected_entropy": expected,
                    "mutual_information": (predictive - expected).clamp_min(0),
                    "variation_ratio": 1.0 - votes.max(-1).values / self.samples,
                    "std": p.std(0),
                }

        def unbatch(self, output: dict[str, object]) -> list[dict[str, object]]:
            """One dict of Python lists per request."""
            columns = {name: value.tolist() for name, value in output.items()}
            rows = len(columns["predictions"])
            return [{name: values[i] for name, values in columns.items()} for i in range(rows)]

        def encode_response(self, output: dict[str, object]) -> dict[str, object]:
            """Already JSON-ready (annotated loosely: LitServe builds its response model from this)."""
            return output


def _run_litserve(package: str, port: int) -> None:
    """Subprocess entry: LitServe on loopback, CPU, one inference worker, its own batching."""
    if ls is None:
        raise SystemExit("litserve is not installed")
    api = MCDropoutLitAPI(package, SAMPLES, MAX_BATCH)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=60)
    server.run(host="127.0.0.1", port=port, generate_client_file=False, log_level="warning")


# ---------------------------------------------------------------------------------------------- packages
def build_repository(root: Path, cnn_name: str = CNN_NAME) -> tuple[Path, tuple[int, ...]]:
    """Untrained packages of a zoo CNN and the MLP 64-256-256-10 (p=0.5 after each hidden layer).

    Returns the repository and the CNN's input shape (without the batch dimension).
    """
    import torch
    from dropwise.models.data import load_dataset
    from dropwise.models.zoo import ZOO, build
    from dropwise.package import save_package

    torch.manual_seed(0)
    cnn = ZOO[cnn_name]
    data = load_dataset(cnn.dataset)
    save_package(
        root,
        cnn_name,
        build(cnn_name).eval(),
        task=cnn.task,
        input_shape=list(data.input_shape),
        input_dtype=data.input_dtype,
        architecture={"factory": cnn.factory, "kwargs": cnn.kwargs},
        labels=data.labels,
        preprocessing="untrained weights: serving benchmark only",
    )
    from dropwise.models.zoo.mlp import dropout_mlp

    kwargs = {"in_features": 64, "hidden": [256, 256], "out_features": 10, "p_input": 0.0, "p_hidden": 0.5}
    save_package(
        root,
        MLP_NAME,
        dropout_mlp(**kwargs).eval(),
        task="classification",
        input_shape=[64],
        input_dtype="float32",
        architecture={"factory": "dropwise.models.zoo.mlp:dropout_mlp", "kwargs": kwargs},
        labels=[str(i) for i in range(10)],
        preprocessing="untrained weights: serving benchmark only",
    )
    return root, tuple(data.input_shape)


# ---------------------------------------------------------------------------------------------- servers
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
def _process(command: Sequence[str], ready_url: str, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    with tempfile.TemporaryFile() as log:
        # A session of its own: LitServe forks an API server and inference workers, and every one of them
        # must go when the run ends.
        cores = SERVER_CORES
        process = subprocess.Popen(
            command,
            cwd=ROOT,
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
def dropwise_server(repository: Path, port: int, max_batch_size: int) -> Iterator[subprocess.Popen]:
    """``dropwise serve`` on loopback with the given max batch size (1 = no dynamic batching)."""
    env = {
        **os.environ,
        "DROPWISE_MAX_BATCH_SIZE": str(max_batch_size),
        "DROPWISE_LOG_LEVEL": "warning",
        "DROPWISE_QUEUE_CAPACITY": str(4 * CLIENTS),
    }
    command = [
        sys.executable,
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
    with _process(command, f"http://127.0.0.1:{port}/readyz", env) as process:
        yield process


@contextmanager
def litserve_server(package: Path, port: int) -> Iterator[subprocess.Popen]:
    """LitServe serving the MLP package on loopback."""
    command = [sys.executable, str(Path(__file__).resolve()), "_litserve", str(package), str(port)]
    with _process(command, f"http://127.0.0.1:{port}/health", dict(os.environ)) as process:
        yield process


# ---------------------------------------------------------------------------------------------- load
def http_post(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """One HTTP/1.1 keep-alive POST, encoded once and replayed by every client."""
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    lines += [f"{key}: {value}" for key, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def group_cpu_seconds(pgid: int) -> float | None:
    """User + system CPU seconds of every live process in process group ``pgid`` (Linux /proc; else None)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after the name: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / ticks


@dataclass
class LoadResult:
    """What one load run measured."""

    requests: int
    errors: int
    seconds: float
    latencies_ms: np.ndarray
    first_error: str = ""
    server_cpu_s: float | None = None  #: CPU time of the server's processes during the measured window

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if len(self.latencies_ms) else float("nan")


async def _client(
    port: int, request: bytes, warmup_end: float, stop: float, cap: int, out: list[float], errors: list[str]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await _exchange(reader, writer, request, warmup_end, stop, cap, out, errors)
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        errors.append(f"connection: {exc!r}")
    finally:
        writer.close()


async def _exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    request: bytes,
    warmup_end: float,
    stop: float,
    cap: int,
    out: list[float],
    errors: list[str],
) -> None:
    """Send ``request`` and read its answer until ``stop``; record latencies after ``warmup_end``."""
    while (now := time.perf_counter()) < stop and len(out) < cap:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == b"content-length":
                length = int(value)
        payload = await reader.readexactly(length)
        done = time.perf_counter()
        if status != 200:
            errors.append(f"{status}: {payload[:200].decode(errors='replace')}")
        elif now >= warmup_end:
            out.append((done - now) * 1000.0)


async def _cpu_window(pgid: int | None, warmup_end: float, stop: float) -> float | None:
    """Server CPU seconds spent between ``warmup_end`` and ``stop``."""
    if pgid is None:
        return None
    await asyncio.sleep(max(0.0, warmup_end - time.perf_counter()))
    start = group_cpu_seconds(pgid)
    await asyncio.sleep(max(0.0, stop - time.perf_counter()))
    end = group_cpu_seconds(pgid)
    return None if start is None or end is None else end - start


async def _load(
    port: int, request: bytes, clients: int, warmup: float, duration: float, cap: int, pgid: int | None = None
) -> LoadResult:
    start = time.perf_counter()
    warmup_end = start + warmup
    stop = warmup_end + duration
    latencies: list[float] = []
    errors: list[str] = []
    cpu = asyncio.ensure_future(_cpu_window(pgid, warmup_end, stop))
    await asyncio.gather(*(_client(port, request, warmup_end, stop, cap, latencies, errors) for _ in range(clients)))
    measured = min(time.perf_counter(), stop) - warmup_end
    if not cpu.done():  # the run ended early (request cap or errors): no full window to charge
        cpu.cancel()
    server_cpu = cpu.result() if cpu.done() and not cpu.cancelled() else None
    return LoadResult(
        len(latencies), len(errors), measured, np.asarray(latencies), errors[0] if errors else "", server_cpu
    )


def run_load(port: int, request: bytes, args: argparse.Namespace, pgid: int | None = None) -> LoadResult:
    """Drive ``args.clients`` connections for warm-up plus duration seconds (at most ``max_requests``);
    with ``pgid``, also charge the CPU time of that server process group during the measured window."""
    load = _load(port, request, args.clients, args.warmup, args.duration, args.max_requests, pgid)
    try:  # uvloop (installed with uvicorn[standard] or litserve) keeps the load generator cheaper
        import uvloop
    except ImportError:
        return asyncio.run(load)
    return uvloop.run(load)


# ---------------------------------------------------------------------------------------------- requests
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
class Row:
    """One line of the result table: every repetition of one configuration."""

    scenario: str
    server: str
    runs: list[LoadResult]

    @property
    def requests(self) -> int:
        return sum(r.requests for r in self.runs)

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.runs)

    @property
    def throughput(self) -> float:
        """Measured requests over measured seconds, all repetitions pooled."""
        seconds = sum(r.seconds for r in self.runs)
        return self.requests / seconds if seconds > 0 else 0.0

    @property
    def cpu_ms_per_request(self) -> float:
        """Server CPU milliseconds per measured request (rounds without a CPU reading left out)."""
        runs = [r for r in self.runs if r.server_cpu_s is not None and r.requests]
        requests = sum(r.requests for r in runs)
        return 1000.0 * sum(r.server_cpu_s or 0.0 for r in runs) / requests if requests else float("nan")

    def percentile(self, q: float) -> float:
        """Latency percentile over every measured request of every repetition."""
        pooled = np.concatenate([r.latencies_ms for r in self.runs]) if self.runs else np.empty(0)
        return float(np.percentile(pooled, q)) if len(pooled) else float("nan")


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
        if ls is None:
            print("  litserve not installed: LitServe row skipped", file=sys.stderr)
        else:
            label = f"LitServe {ls.__version__}, batching (max {MAX_BATCH})"
            configs.append(Config(label, "litserve", litserve_request(vector)))
        return configs
    raise ValueError(f"unknown scenario {scenario!r}; choose from cnn-mc, cnn-det, mlp")


def _start(key: str, repository: Path, port: int) -> contextlib.AbstractContextManager[subprocess.Popen]:
    if key == "batch":
        return dropwise_server(repository, port, MAX_BATCH)
    if key == "nobatch":
        return dropwise_server(repository, port, 1)
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
            with _start(key, repository, port) as process:
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


def report(rows: Sequence[Row], args: argparse.Namespace) -> str:
    """The markdown table and, per scenario, each row's throughput and p99 against the scenario's last row."""
    lines = [
        f"Serving benchmark: {args.clients} clients (one keep-alive connection each), loopback, "
        f"{args.repeats} rounds of {args.duration:.0f} s measured (after {args.warmup:.0f} s warm-up) per "
        f"configuration, MC T={SAMPLES}, one row per request; {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; "
        + (
            f"server pinned to CPU {sorted(args.pinned[0])}, load generator to CPU {sorted(args.pinned[1])}."
            if getattr(args, "pinned", None)
            else "unpinned (server and load generator share the CPUs)."
        ),
        "",
        "| scenario | server | requests | errors | throughput (req/s) | per round (req/s) "
        "| p50 (ms) | p99 (ms) | server CPU (ms/request) |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for row in rows:
        rounds = ", ".join(f"{r.throughput:.0f}" for r in row.runs)
        lines.append(
            f"| {row.scenario} | {row.server} | {row.requests} | {row.errors} | {row.throughput:.0f} | "
            f"{rounds} | {row.percentile(50):.1f} | {row.percentile(99):.1f} | {row.cpu_ms_per_request:.2f} |"
        )
    lines.append("")
    by_scenario: dict[str, list[Row]] = {}
    for row in rows:
        by_scenario.setdefault(row.scenario, []).append(row)
    for scenario, group in by_scenario.items():
        baseline = group[-1]
        for row in group[:-1]:
            ratio = row.throughput / baseline.throughput if baseline.throughput else float("nan")
            lines.append(
                f"- {scenario}: {row.server} / {baseline.server}: throughput {ratio:.2f}x, "
                f"p99 {row.percentile(99):.1f} ms vs {baseline.percentile(99):.1f} ms, "
                f"server CPU {row.cpu_ms_per_request:.2f} vs {baseline.cpu_ms_per_request:.2f} ms per request"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "_litserve":
        _run_litserve(sys.argv[2], int(sys.argv[3]))
    else:
        main()
