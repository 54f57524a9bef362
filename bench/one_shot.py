"""One-shot MC (`mc_predict`, which builds its own engine) against a prebuilt `MCEngine`, same batch.

Network: the zoo's ``resnet_mnist`` (random weights: the timing does not depend on training), 1000 MNIST-
shaped rows, T=32, seeded. Interleaved repetitions; process CPU seconds (less sensitive to other processes'
load than wall time) and wall seconds; the ratio of medians is the figure. Nothing is asserted.

Run: ``python -m bench.one_shot --threads 1``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from dropwise.models.zoo import build
from dropwise.surgery import hash_kernel
from dropwise.surgery.engine import MCEngine, mc_predict


def main(argv: list[str] | None = None) -> None:
    """Print CPU and wall seconds of both and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", default="resnet_mnist")
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build(args.network).eval()
    hash_kernel.available()  # wait for the mask kernel's build
    x = torch.randn(args.rows, 1, 28, 28)
    start = time.process_time()
    engine = MCEngine(model, x[:8])
    build_cpu = time.process_time() - start
    runs = {
        "prebuilt MCEngine": lambda: engine(x, samples=args.samples, seed=1),
        "mc_predict (builds its engine)": lambda: mc_predict(model, x, samples=args.samples, seed=1),
    }
    cpu: dict[str, list[float]] = {n: [] for n in runs}
    wall: dict[str, list[float]] = {n: [] for n in runs}
    for r in range(args.repeats):
        names = list(runs)[r % 2 :] + list(runs)[: r % 2]
        for name in names:
            c, w = time.process_time(), time.perf_counter()
            runs[name]()
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)
    print(
        f"{args.network}, {args.rows} rows, T={args.samples}, {torch.get_num_threads()} thread(s); "
        f"engine build on 8 rows: {build_cpu:.2f} s CPU"
    )
    print("| method | median CPU s | median wall s |")
    print("|---|---:|---:|")
    for name in runs:
        print(f"| {name} | {statistics.median(cpu[name]):.2f} | {statistics.median(wall[name]):.2f} |")
    ratio = statistics.median(cpu["mc_predict (builds its engine)"]) / statistics.median(cpu["prebuilt MCEngine"])
    print(f"mc_predict / prebuilt (CPU) = {ratio:.2f} (goal <= 1.2: {'met' if ratio <= 1.2 else 'missed'})")


if __name__ == "__main__":
    main()
