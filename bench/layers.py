"""Benchmark: forward + backward time of each models.layers member against its closest PyTorch counterpart
or a straightforward implementation, side by side in one run.

Not a test: it never asserts on time. Repetitions of all pairs are interleaved (ours and the reference
alternate, in alternating order) so that load changes on a shared machine hit both sides alike; the table
reports medians and the ratio ours / reference (< 1: ours is faster).

    python -m bench.layers                    # CPU, default sizes
    python -m bench.layers --reps 15 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from dropwise.models.layers import (
    ClassicDropout,
    Cutout,
    DropBlock2d,
    DropConnectConv2d,
    DropConnectLinear,
    DropPath,
    EmbeddingDropout,
    FractalJoin,
    max_norm_,
)
from torch import Tensor, nn


@dataclass
class Pair:
    """One row of the table: two callables doing the same job on the same inputs."""

    name: str
    reference: str
    ours: Callable[[], object]
    ref: Callable[[], object]


def _fwd_bwd(fn: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[], object]:
    """Forward + backward of ``fn`` at ``x`` (gradient of the sum)."""

    def run() -> object:
        x.grad = None
        fn(x).sum().backward()
        return x.grad

    return run


def _naive_drop_block(x: Tensor, p: float, block: int, gen: torch.Generator) -> Tensor:
    """Straightforward DropBlock: draw valid-region seeds, zero a block per seed in a Python loop."""
    b, c, h, w = x.shape
    bh, bw = min(block, h), min(block, w)
    gamma = p / (bh * bw) * h * w / ((h - bh + 1) * (w - bw + 1))
    seeds = torch.rand(b, c, h - bh + 1, w - bw + 1, generator=gen, device=x.device) < gamma
    mask = torch.ones_like(x)
    for n, ch, i, j in seeds.nonzero().tolist():
        mask[n, ch, i : i + bh, j : j + bw] = 0
    return x * mask * (mask.numel() / mask.sum().clamp_min(1))


def _naive_cutout(x: Tensor, size: int, gen: torch.Generator) -> Tensor:
    """DeVries & Taylor's reference algorithm, one image at a time."""
    out = x.clone()
    _, _, h, w = x.shape
    for img in out:
        cy = int(torch.randint(h, (1,), generator=gen, device=x.device))
        cx = int(torch.randint(w, (1,), generator=gen, device=x.device))
        top, left = max(cy - size // 2, 0), max(cx - size // 2, 0)
        img[:, top : cy - size // 2 + size, left : cx - size // 2 + size] = 0
    return out


def build_pairs(device: torch.device, scale: int = 1) -> list[Pair]:
    """The benchmark rows. ``scale`` multiplies the batch sizes."""
    torch.manual_seed(0)

    def gen() -> torch.Generator:
        return torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, device=device).requires_grad_()

    pairs: list[Pair] = []
    b = 64 * scale

    x = rand(4 * b, 1024)
    classic, torch_dropout = ClassicDropout(0.5, generator=gen()), nn.Dropout(0.5)
    pairs.append(Pair("ClassicDropout", "nn.Dropout", _fwd_bwd(classic, x), _fwd_bwd(torch_dropout, x)))

    x = rand(b, 128, 256)
    emb, drop2d = EmbeddingDropout(0.3, generator=gen()), nn.Dropout2d(0.3)
    pairs.append(
        Pair(
            "EmbeddingDropout",
            "Dropout2d on [B, E, L, 1]",
            _fwd_bwd(emb, x),
            _fwd_bwd(lambda t: drop2d(t.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2), x),
        )
    )

    x = rand(b, 256)
    dcl = DropConnectLinear(256, 256, p=0.5, generator=gen()).to(device)
    weight, bias = dcl.weight, dcl.bias
    g_ref = gen()

    def explicit_mask(t: Tensor) -> Tensor:
        mask = (torch.rand(t.shape[0], *weight.shape, generator=g_ref, device=device) < 0.5).to(t.dtype)
        return torch.einsum("boi,bi->bo", mask * weight, t) + bias

    pairs.append(
        Pair(
            "DropConnectLinear per-example",
            "einsum, explicit mask",
            _fwd_bwd(dcl, x),
            _fwd_bwd(explicit_mask, x),
        )
    )
    pairs.append(
        Pair(
            "DropConnectLinear per-example",
            "nn.Linear (no masks)",
            _fwd_bwd(dcl, x),
            _fwd_bwd(lambda t: F.linear(t, weight, bias), x),
        )
    )
    shared = DropConnectLinear(256, 256, p=0.5, per_example=False, generator=gen()).to(device)
    g_shared = gen()
    pairs.append(
        Pair(
            "DropConnectLinear shared mask",
            "F.linear(x, M*W), explicit mask",
            _fwd_bwd(shared, x),
            _fwd_bwd(
                lambda t: F.linear(
                    t,
                    (torch.rand(shared.weight.shape, generator=g_shared, device=device) < 0.5) * shared.weight,
                    shared.bias,
                ),
                x,
            ),
        )
    )
    gauss = DropConnectLinear(256, 256, p=0.5, activation="relu", inference="gaussian").to(device).eval()
    mean_rule = DropConnectLinear(256, 256, p=0.5, activation="relu", inference="mean").to(device).eval()
    pairs.append(
        Pair(
            "DropConnectLinear eval Gaussian Z=64",
            "eval mean rule",
            _fwd_bwd(gauss, x),
            _fwd_bwd(mean_rule, x),
        )
    )

    x = rand(max(b // 4, 2), 32, 16, 16)
    dcc = DropConnectConv2d(32, 32, 3, padding=1, p=0.5, generator=gen()).to(device)
    g_loop = gen()

    def per_sample_loop(t: Tensor) -> Tensor:
        outs = []
        for sample in t.split(1):
            mask = (torch.rand(dcc.weight.shape, generator=g_loop, device=device) < 0.5).to(t.dtype)
            outs.append(F.conv2d(sample, mask * dcc.weight, dcc.bias, padding=1))
        return torch.cat(outs)

    pairs.append(
        Pair(
            "DropConnectConv2d per-example",
            "per-sample loop of F.conv2d",
            _fwd_bwd(dcc, x),
            _fwd_bwd(per_sample_loop, x),
        )
    )

    x = rand(b, 64, 16, 16)
    dpath = DropPath(0.2, generator=gen())
    g_path = gen()
    pairs.append(
        Pair(
            "DropPath (per sample)",
            "x * bernoulli(B,1,1,1) / q",
            _fwd_bwd(dpath, x),
            _fwd_bwd(
                lambda t: t * (torch.rand(t.shape[0], 1, 1, 1, generator=g_path, device=device) < 0.8) / 0.8,
                x,
            ),
        )
    )

    xs = [rand(b, 32, 16, 16) for _ in range(3)]
    join = FractalJoin(3, p=0.15, generator=gen())

    def join_run(fn: Callable[[list[Tensor]], Tensor]) -> Callable[[], object]:
        def run() -> object:
            for t in xs:
                t.grad = None
            fn(xs).sum().backward()
            return xs[0].grad

        return run

    pairs.append(
        Pair(
            "FractalJoin (local drop)",
            "torch.stack(...).mean(0)",
            join_run(join),
            join_run(lambda ts: torch.stack(ts).mean(0)),
        )
    )

    x = rand(max(b // 2, 2), 64, 14, 14)
    block = DropBlock2d(0.1, 5, generator=gen())
    g_block = gen()
    pairs.append(
        Pair(
            "DropBlock2d",
            "per-seed Python loop",
            _fwd_bwd(block, x),
            _fwd_bwd(lambda t: _naive_drop_block(t, 0.1, 5, g_block), x),
        )
    )

    images = torch.randn(4 * b, 3, 32, 32, device=device)
    cut = Cutout(16, generator=gen())
    g_cut = gen()
    pairs.append(
        Pair(
            "Cutout (forward only)",
            "per-image slicing loop",
            lambda: cut(images),
            lambda: _naive_cutout(images, 16, g_cut),
        )
    )

    model = nn.Sequential(nn.Linear(784, 1024), nn.Linear(1024, 1024), nn.Linear(1024, 10)).to(device)

    def project_each() -> None:
        with torch.no_grad():
            for layer in model:
                norms = layer.weight.norm(dim=1, keepdim=True)
                layer.weight.mul_((3.0 / norms).clamp(max=1.0))

    pairs.append(
        Pair(
            "max_norm_ (projection only)",
            "norm, clamp, mul per layer",
            lambda: max_norm_(model, 3.0),
            project_each,
        )
    )
    return pairs


def _time(fn: Callable[[], object], device: torch.device, inner: int) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / inner * 1e3


def run(pairs: list[Pair], device: torch.device, reps: int, inner: int) -> list[tuple[Pair, float, float]]:
    """Warm up, then ``reps`` interleaved rounds; returns (pair, ours ms, reference ms) medians."""
    for pair in pairs:
        pair.ours()
        pair.ref()
    ours: dict[int, list[float]] = {i: [] for i in range(len(pairs))}
    refs: dict[int, list[float]] = {i: [] for i in range(len(pairs))}
    for rep in range(reps):
        for i, pair in enumerate(pairs):
            if rep % 2 == 0:
                ours[i].append(_time(pair.ours, device, inner))
                refs[i].append(_time(pair.ref, device, inner))
            else:
                refs[i].append(_time(pair.ref, device, inner))
                ours[i].append(_time(pair.ours, device, inner))
    return [(pair, statistics.median(ours[i]), statistics.median(refs[i])) for i, pair in enumerate(pairs)]


def format_table(rows: list[tuple[Pair, float, float]]) -> str:
    """Markdown table of the medians and the ratio ours / reference."""
    lines = [
        "| layer | reference | ours (ms) | reference (ms) | ours / ref |",
        "|---|---|---:|---:|---:|",
    ]
    for pair, ours, ref in rows:
        lines.append(f"| {pair.name} | {pair.reference} | {ours:.3f} | {ref:.3f} | {ours / ref:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--reps", type=int, default=9, help="interleaved rounds; medians are reported")
    parser.add_argument("--inner", type=int, default=5, help="calls per timing")
    parser.add_argument("--scale", type=int, default=1, help="multiplier of the batch sizes")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.inner < 1 or args.scale < 1:
        parser.error("--reps, --inner and --scale must be positive")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = run(build_pairs(device, args.scale), device, args.reps, args.inner)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"dropwise.models.layers forward+backward, torch {torch.__version__}, {name}, "
        f"medians of {args.reps} interleaved rounds"
    )
    print(format_table(rows))


if __name__ == "__main__":
    main()
