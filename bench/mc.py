"""MC-dropout benchmark: the same network, T, batch and process for every method, interleaved repetitions.

Methods (every MC method ends with the same summaries, ``dropwise.surgery.summaries.classification_summaries``):

* ``deterministic``: one eval-mode forward (no summaries), the unit of the ratios;
* ``naive loop``: T forward passes with the chosen dropout modules in train mode (torch's ``F.dropout``);
* ``Baal replicate on/off``: Baal 2.1.0 ``MCDropoutModule`` + ``ModelWrapper.predict_on_batch`` with
  ``replicate_in_memory`` True (one pass over T stacked copies) or False (a Python loop);
* ``TorchUncertainty``: ``torch_uncertainty.methods.mc_dropout.mc_dropout(model, T)`` (``on_batch=True``),
  its module file imported by path so the package's heavy ``__init__`` is not needed;
* ``ours (torch)``: ``dropwise.surgery.engine.MCEngine`` (trunk once, batched tail, hash masks), unseeded;
* ``ours (torch.compile)``: the same with the tail through ``torch.compile`` (``--compile``);
* ``ours (ONNX Runtime)``: ``dropwise.surgery.mc_export.export_mc_onnx`` under default session options;
* ``ours (ONNX Runtime, CUDA-op hash)``: the same graph as a CUDA session gets it
  (``dropwise.surgery.onnx_cuda.cuda_compatible``: the hash without bitwise ops), timed on the CPU provider.

Networks: ``a`` MLP 64-256-256-10, p = 0.5 after each hidden layer; ``b`` 64-1024-1024-1024 trunk and a
1024-10 head, the only dropout (p = 0.5) before the head; ``c`` the zoo MNIST CNN (``cnn_mnist``, random
weights, random 1x28x28 inputs) with its torch dropout modules (Dropout2d, Dropout) stochastic for every
method (the peers do not know DropBlock, which stays in eval); ``c+`` the same CNN with DropBlock too
(ours only). Timing: each repetition runs every method once in a rotated order; a measurement is the mean
over enough back-to-back calls to last >= 20 ms; the table gives medians over repetitions and ratios of
medians, so load from other processes hits all methods alike. Nothing is asserted.

Peers are not dependencies of dropwise; install them into the environment without their heavy deps:

    pip install --no-deps baal==2.1.0 torch-uncertainty
    pip install scipy scikit-learn 'structlog<23' tqdm torchmetrics einops

Run: ``python -m bench.mc`` (options: ``--networks a,b,c``, ``--samples 32``, ``--batch 64``,
``--repeats 11``, ``--compile``, ``--threads 1``, ``--device cuda``). With ``--threads 1`` ONNX Runtime
gets one intra-op thread too; otherwise its default pool.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from dropwise.surgery import hash_kernel
from dropwise.surgery.engine import MCEngine
from dropwise.surgery.summaries import classification_summaries
from torch import nn

TORCH_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def network(name: str, batch: int) -> tuple[nn.Module, torch.Tensor, list[str] | None]:
    """(model, input batch, chosen site names or None for all) of benchmark network ``name``."""
    torch.manual_seed(0)
    if name == "a":
        model = nn.Sequential(
            nn.Linear(64, 256),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(256, 256),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(256, 10),
        )
        return model.eval(), torch.randn(batch, 64), None
    if name == "b":
        layers: list[nn.Module] = [nn.Linear(64, 1024), nn.ReLU()]
        for _ in range(2):
            layers += [nn.Linear(1024, 1024), nn.ReLU()]
        model = nn.Sequential(*layers, nn.Dropout(0.5), nn.Linear(1024, 10))
        return model.eval(), torch.randn(batch, 64), None
    if name in ("c", "c+"):
        from dropwise.models.zoo import build

        model = build("cnn_mnist").eval()
        sites = None if name == "c+" else [n for n, m in model.named_modules() if isinstance(m, TORCH_DROPOUTS)]
        return model, torch.randn(batch, 1, 28, 28), sites
    raise ValueError(f"unknown network {name!r}")


def _stochastic_copy(model: nn.Module, sites: list[str] | None) -> nn.Module:
    """A copy in eval mode with the chosen dropout modules in train mode (the naive MC recipe)."""
    work = copy.deepcopy(model).eval()
    for name, module in work.named_modules():
        if (sites is None and isinstance(module, TORCH_DROPOUTS)) or (sites is not None and name in sites):
            module.train()
    return work


def _load_torch_uncertainty_mc_dropout() -> Callable[..., nn.Module]:
    """``mc_dropout`` from TorchUncertainty's module file (needs torch and einops only)."""
    spec = importlib.util.find_spec("torch_uncertainty")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("torch-uncertainty is not installed (pip install --no-deps torch-uncertainty einops)")
    path = Path(next(iter(spec.submodule_search_locations))) / "methods" / "mc_dropout.py"
    module_spec = importlib.util.spec_from_file_location("_tu_mc_dropout", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.mc_dropout


def methods(
    model: nn.Module,
    x: torch.Tensor,
    samples: int,
    sites: list[str] | None,
    *,
    use_compile: bool,
    with_peers: bool,
    with_onnx: bool,
    workdir: Path,
) -> dict[str, Callable[[], Any]]:
    """Name -> zero-argument callable doing one full MC prediction (or one deterministic forward)."""
    out: dict[str, Callable[[], Any]] = {}
    det = copy.deepcopy(model).eval()

    def deterministic() -> Any:
        with torch.inference_mode():
            return det(x)

    out["deterministic"] = deterministic
    naive_model = _stochastic_copy(model, sites)

    def naive() -> Any:
        with torch.inference_mode():
            return classification_summaries(torch.stack([naive_model(x) for _ in range(samples)]))

    out["naive loop"] = naive
    if (with_peers and sites is None) or (
        with_peers and all(isinstance(model.get_submodule(s), TORCH_DROPOUTS) for s in sites)
    ):
        try:
            from baal.bayesian.dropout import MCDropoutModule
            from baal.modelwrapper import ModelWrapper, TrainingArgs

            for replicate in (True, False):
                wrapped = MCDropoutModule(copy.deepcopy(model).eval())
                wrapper = ModelWrapper(wrapped, TrainingArgs(replicate_in_memory=replicate, use_cuda=x.is_cuda))

                def baal(wrapper: Any = wrapper) -> Any:
                    pred = wrapper.predict_on_batch(x, iterations=samples)  # [B, K, T]
                    return classification_summaries(pred.permute(2, 0, 1))

                out[f"Baal 2.1.0, replicate {'on' if replicate else 'off'}"] = baal
        except ImportError as exc:
            print(f"(Baal skipped: {exc})")
        try:
            mc_dropout = _load_torch_uncertainty_mc_dropout()
            tu = mc_dropout(copy.deepcopy(model), num_estimators=samples, last_layer=False, on_batch=True).eval()

            def torch_uncertainty() -> Any:
                with torch.inference_mode():
                    return classification_summaries(tu(x).reshape(samples, x.shape[0], -1))

            out["TorchUncertainty mc_dropout"] = torch_uncertainty
        except ImportError as exc:
            print(f"(TorchUncertainty skipped: {exc})")
    engine = MCEngine(model, x, sites)
    out["ours (torch)"] = lambda: engine(x, samples=samples)
    if use_compile:
        compiled = MCEngine(model, x, sites, compile=True)
        out["ours (torch.compile)"] = lambda: compiled(x, samples=samples)
    if with_onnx and x.device.type == "cpu":
        import numpy as np
        import onnxruntime as ort
        from dropwise.surgery.mc_export import export_mc_onnx

        path = export_mc_onnx(model, x, workdir / "mc.onnx", sites=sites, return_samples=False)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # silence the optional-input warning; optimisations stay at default
        if torch.get_num_threads() == 1:
            options.intra_op_num_threads = 1  # same thread count as torch when --threads 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feeds = {"input": x.numpy(), "num_samples": np.array(samples, dtype=np.int64)}
        out["ours (ONNX Runtime)"] = lambda: session.run(None, feeds)
        # the graph a CUDA session gets (hash without bitwise ops, dropwise.surgery.onnx_cuda), timed on the CPU
        import onnx
        from dropwise.surgery.onnx_cuda import cuda_compatible

        cuda_graph = cuda_compatible(onnx.load(str(path))).SerializeToString()
        cuda_session = ort.InferenceSession(cuda_graph, options, providers=["CPUExecutionProvider"])
        out["ours (ONNX Runtime, CUDA-op hash)"] = lambda: cuda_session.run(None, feeds)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    candidates: dict[str, Callable[[], Any]],
    repeats: int,
    device: torch.device,
    block: float = 0.02,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per call of each candidate: ``repeats`` interleaved measurements (rotated order).

    ``clock``: ``time.perf_counter`` (wall) or ``time.process_time`` (this process's CPU time: with one
    thread, the figure a loaded machine disturbs least).
    """
    inner: dict[str, int] = {}
    for name, fn in candidates.items():
        for _ in range(2):
            fn()  # warm-up (compilation, allocator, caches)
        _sync(device)
        start = clock()
        fn()
        _sync(device)
        inner[name] = max(1, math.ceil(block / max(clock() - start, 1e-6)))
    names = list(candidates)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = candidates[name]
            _sync(device)
            start = clock()
            for _ in range(inner[name]):
                fn()
            _sync(device)
            times[name].append((clock() - start) / inner[name])
    return times


def table(title: str, times: dict[str, list[float]]) -> str:
    """Markdown table: median ms, ratio to one deterministic forward and to the naive loop."""
    med = {n: statistics.median(v) for n, v in times.items()}
    det, naive = med["deterministic"], med["naive loop"]
    lines = [
        f"**{title}**",
        "",
        "| method | median ms | x deterministic | x naive loop |",
        "|---|---:|---:|---:|",
    ]
    for name, value in med.items():
        lines.append(f"| {name} | {value * 1e3:.2f} | {value / det:.1f} | {value / naive:.3f} |")
    return "\n".join(lines)


def goals(results: dict[str, dict[str, list[float]]]) -> list[str]:
    """The issue's goals, each with the measured ratio."""
    lines = []

    def med(net: str, name: str) -> float | None:
        values = results.get(net, {}).get(name)
        return statistics.median(values) if values else None

    ours = "ours (torch)"
    if (b := med("b", ours)) is not None:
        r = b / med("b", "deterministic")
        lines.append(f"- (b) MC / one deterministic forward = {r:.2f} (goal <= 2.5: {'met' if r <= 2.5 else 'missed'})")
        if (bc := med("b", "ours (torch.compile)")) is not None:
            lines.append(f"  - with torch.compile: {bc / med('b', 'deterministic'):.2f}")
    if (a := med("a", ours)) is not None:
        r = a / med("a", "naive loop")
        lines.append(f"- (a) ours / naive loop = {r:.3f} (goal <= 0.2: {'met' if r <= 0.2 else 'missed'})")
    for net in results:
        o, t = med(net, "ours (ONNX Runtime)"), med(net, ours)
        if o is not None and t is not None:
            verdict = "met" if o <= t else "missed"
            lines.append(f"- ({net}) ONNX Runtime / ours in torch = {o / t:.2f} (goal <= 1: {verdict})")
    return lines


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print markdown tables and the goals."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", default="a,b,c")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--compile", action="store_true", help="also time the engine with torch.compile")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--no-onnx", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="cpu: process CPU time (use with --threads 1)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    hash_kernel.available()  # wait for the mask kernel's build (started in the background otherwise)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
        f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
        f"T={args.samples}, batch {args.batch}, {args.clock} clock, load average {os.getloadavg()[0]:.1f}"
    )
    results: dict[str, dict[str, list[float]]] = {}
    titles = {
        "a": "(a) MLP 64-256-256-10, p=0.5 after each hidden layer",
        "b": "(b) 64-1024-1024-1024 trunk, dropout p=0.5 before the 1024-10 head",
        "c": "(c) zoo cnn_mnist, Dropout2d + Dropout stochastic (DropBlock in eval for all)",
        "c+": "(c+) zoo cnn_mnist with DropBlock stochastic too (ours only)",
    }
    with tempfile.TemporaryDirectory() as tmp:
        for net in args.networks.split(","):
            model, x, sites = network(net, args.batch)
            model, x = model.to(device), x.to(device)
            workdir = Path(tmp) / net.replace("+", "plus")
            workdir.mkdir()
            candidates = methods(
                model,
                x,
                args.samples,
                sites,
                use_compile=args.compile,
                with_peers=not args.no_peers and net != "c+",
                with_onnx=not args.no_onnx,
                workdir=workdir,
            )
            clock = time.process_time if args.clock == "cpu" else time.perf_counter
            results[net] = measure(candidates, args.repeats, device, clock=clock)
            print()
            print(table(titles[net], results[net]))
    print()
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    print("\n".join(goals(results)))


if __name__ == "__main__":
    main()
