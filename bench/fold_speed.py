"""Benchmark: forward time of each zoo network in eval mode against its folded form (``dropwise.surgery.fold``).

Not a test: it never asserts on time. Repetitions are interleaved (eval and folded alternate, in alternating
order) so that load changes on a shared machine hit both sides alike; the table reports medians and the
ratio folded / eval (<= 1: the fold is no slower).

    python -m bench.fold_speed                 # batch 64, 30 repetitions, one thread
    python -m bench.fold_speed --batch 256 --reps 50 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from dropwise.models.data import load_dataset
from dropwise.models.zoo import ZOO, build
from dropwise.surgery import fold_with_report
from torch import nn


def _time(model: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model(x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("networks", nargs="*", default=list(ZOO))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'network':<26} {'eval ms':>9} {'folded ms':>10} {'ratio':>7} {'kept multiplies':>16}")
    for name in args.networks:
        spec = ZOO[name]
        x = load_dataset(spec.dataset).test[0][: args.batch]
        torch.manual_seed(0)
        model = build(name).eval()
        result = fold_with_report(model, x)
        folded = result.model
        for _ in range(3):  # warm-up
            _time(model, x), _time(folded, x)
        eval_t, fold_t = [], []
        for rep in range(args.reps):
            pair = (model, folded) if rep % 2 == 0 else (folded, model)
            for m in pair:
                (eval_t if m is model else fold_t).append(_time(m, x))
        e, f = statistics.median(eval_t) * 1e3, statistics.median(fold_t) * 1e3
        print(f"{name:<26} {e:>9.3f} {f:>10.3f} {f / e:>7.2f} {result.report.scales_kept:>16}")


if __name__ == "__main__":
    main()
