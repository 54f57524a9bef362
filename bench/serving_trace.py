"""Where a served request's time goes: summarise a `DROPWISE_TRACE_FILE` written under the serving bench.

    DROPWISE_TRACE_FILE=/tmp/trace.jsonl .venv/bin/python -m bench.serving --scenarios mlp --repeats 1
    .venv/bin/python -m bench.serving_trace /tmp/trace.jsonl

For each route (native predict, V2 infer) it prints the p50 / p99 / max of every step between two
timestamps of `dropwise.service.tracing` (arrival -> body -> parsed -> enqueued -> batch -> compute_start
-> compute_end -> resolved -> encoded -> sent), the share of each step in the slowest 1% of requests, and
the batch sizes (requests sharing one ``batch`` timestamp), and the garbage collections while inference
requests came in (the /readyz polls during loading are left out, as are the first and last second of the
inference requests for the step table: ``--trim``).
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from dropwise.service.tracing import STEPS


def _route(path: str) -> str:
    return "v2 infer" if path.startswith("/v2/") else "native predict"


def summarise(lines: Sequence[dict], out: list[str]) -> None:
    """Append the step table of `lines` (one route's traces) to `out`."""
    complete = [line for line in lines if all(step in line["t"] for step in STEPS) and line["status"] == 200]
    if not complete:
        out.append("  no complete traces")
        return
    total = np.array([line["t"]["sent"] for line in complete]) * 1000.0
    slow = total >= np.percentile(total, 99)
    out.append(
        f"  {len(complete)} requests; end to end p50 {np.percentile(total, 50):.1f} ms, "
        f"p99 {np.percentile(total, 99):.1f} ms"
    )
    out.append("  | step | p50 ms | p99 ms | max ms | mean ms in the slowest 1% |")
    out.append("  |---|---:|---:|---:|---:|")
    for before, after in itertools.pairwise(STEPS):
        span = np.array([line["t"][after] - line["t"][before] for line in complete]) * 1000.0
        out.append(
            f"  | {before} -> {after} | {np.percentile(span, 50):.2f} | {np.percentile(span, 99):.2f} | "
            f"{span.max():.2f} | {span[slow].mean():.2f} |"
        )


def main(argv: Sequence[str] | None = None) -> None:
    """Print the summary of one trace file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--trim", type=float, default=1.0, help="seconds left out at each end (warm-up, stop)")
    args = parser.parse_args(argv)
    lines = [json.loads(text) for text in args.trace.read_text().splitlines() if text.strip()]
    collections = [line for line in lines if "gc" in line]
    lines = [line for line in lines if "gc" not in line]
    if not lines:
        raise SystemExit(f"{args.trace}: no traces")
    # the window of the inference requests (the bench's /readyz polls while the models load are not load)
    lines = [line for line in lines if str(line.get("path", "")).endswith(("/predict", "/infer"))]
    if not lines:
        raise SystemExit(f"{args.trace}: no inference requests traced")
    first = min(line["t0"] for line in lines)
    last = max(line["t0"] for line in lines)
    collections = [c for c in collections if first <= c["t0"] <= last]
    lines = [line for line in lines if first + args.trim <= line["t0"] <= last - args.trim]
    by_route: dict[str, list[dict]] = defaultdict(list)
    for line in lines:
        by_route[_route(str(line.get("path", "")))].append(line)
    out: list[str] = []
    for route, group in sorted(by_route.items()):
        out.append(f"{route}:")
        summarise(group, out)
        batches = Counter(round(line["t0"] + line["t"]["batch"], 6) for line in group if "batch" in line["t"])
        sizes = np.array(list(batches.values()))
        if len(sizes):
            out.append(
                f"  batches: {len(sizes)}, requests per batch p50 {np.percentile(sizes, 50):.0f}, "
                f"mean {sizes.mean():.1f}, max {sizes.max()}"
            )
    span = max(last - first, 1e-9)
    for generation in (0, 1, 2):
        pauses = np.array([c["ms"] for c in collections if c["gc"] == generation])
        if len(pauses):
            out.append(
                f"gc generation {generation}: {len(pauses)} collections in the {span:.0f} s of load, "
                f"p50 {np.percentile(pauses, 50):.2f} ms, max {pauses.max():.1f} ms, total {pauses.sum():.0f} ms"
            )
    print("\n".join(out))


if __name__ == "__main__":
    main()
