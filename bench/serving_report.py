"""Rows and the markdown report of `bench.serving`."""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bench.serving_config import SAMPLES
from bench.serving_load import LoadResult


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
