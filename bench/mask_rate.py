"""Mask decisions per second: the hash masks (fused kernel and torch fallback) against torch's own draws.

One decision = one keep/drop choice of one element. Each row makes 2,097,152 decisions (2048 sample-rows x
1024 positions, the size of network (b)'s head mask at T=32 and batch 64) and reports ns per decision
(median of interleaved repetitions, process CPU time so that other processes' load counts less) and
decisions per second. Nothing is asserted.

Run: ``python -m bench.mask_rate --threads 1``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from dropwise.surgery import hash_kernel
from dropwise.surgery.masks import keep_factor, keep_product, row_keys, sample_keys

ROWS, POSITIONS = 2048, 1024


def candidates() -> dict[str, Callable[[], object]]:
    """Name -> one call making ``ROWS * POSITIONS`` decisions."""
    keys = sample_keys(row_keys(torch.full((64,), 7), torch.arange(64)), ROWS // 64)
    x = torch.randn(ROWS, POSITIONS)
    out: dict[str, Callable[[], object]] = {}
    if hash_kernel.available():
        out["hash masks, fused kernel: factors"] = lambda: keep_factor(keys, 3, (POSITIONS,), 0.5, 2.0)
        out["hash masks, fused kernel: x * mask in one pass"] = lambda: keep_product(x, keys, 3, 0.5, 2.0)
    real_factors = hash_kernel.masked_factors

    def torch_path() -> object:
        hash_kernel.masked_factors = lambda *a, **k: None  # type: ignore[assignment]
        try:
            return keep_factor(keys, 3, (POSITIONS,), 0.5, 2.0)
        finally:
            hash_kernel.masked_factors = real_factors  # type: ignore[assignment]

    out["hash masks, torch ops (fallback): factors"] = torch_path
    out["torch.rand (uniforms only)"] = lambda: torch.rand(ROWS, POSITIONS)
    out["F.dropout (x * mask)"] = lambda: F.dropout(x, 0.5, training=True)
    return out


def measure(repeats: int = 9) -> dict[str, float]:
    """Median CPU seconds per call of each candidate (interleaved repetitions)."""
    fns = candidates()
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        names = list(fns)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.process_time()
            for _ in range(5):
                fns[name]()
            times[name].append((time.process_time() - start) / 5)
    return {name: statistics.median(v) for name, v in times.items()}


def table(medians: dict[str, float]) -> str:
    """Markdown table of ns per decision and decisions per second."""
    n = ROWS * POSITIONS
    lines = [
        f"**mask decisions ({n:,} per call, {torch.get_num_threads()} thread(s))**",
        "",
        "| method | ms per call | ns per decision | decisions per second |",
        "|---|---:|---:|---:|",
    ]
    for name, seconds in medians.items():
        lines.append(f"| {name} | {seconds * 1e3:.2f} | {seconds / n * 1e9:.2f} | {n / seconds:.3g} |")
    if not hash_kernel.available():
        lines.append(f"\n(fused kernel unavailable: {hash_kernel.disable_reason()})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(table(measure(args.repeats)))


if __name__ == "__main__":
    main()
