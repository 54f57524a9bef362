"""One prepared GPU check: everything about CUDA that a CPU cannot show, in one run of a few minutes.

    python -m bench.gpu_check OUT_DIR              # on a machine with an NVIDIA GPU
    python -m bench.gpu_check OUT_DIR --simulate   # the same code paths on the CPU (tests/test_gpu_check.py)

Writes ``OUT_DIR/gpu_check.json`` (every figure) and ``OUT_DIR/gpu_check.txt`` (a summary) and exits 1 when
a check fails. It needs only torch, numpy and onnx (no pydantic, FastAPI, uvicorn, scikit-learn: a lent GPU
machine may have nothing else), so it builds the ten zoo networks from their factory functions with a fixed
seed instead of loading packages, and it does not start the service. Sections:

1. **environment**: torch, CUDA and cuDNN versions, the card, and the precision settings, set explicitly
   (TF32 off for matmul and cuDNN: the parity checks compare float32 with float32);
2. **hash masks**: `dropwise.surgery.masks` keys and keep-masks on the CPU and on the GPU, bit-identical,
   both the eager and the export-friendly (int64) paths;
3. **seeded MC**: every zoo network, deterministic pass and seeded MC (T=32, with per-sample outputs) on the
   CPU and on the GPU; the masks are the same, so only float rounding may differ: tolerance 1e-4 absolute
   + 1e-4 relative on probabilities (regression: outputs). Also a seeded request alone vs in a batch of
   requests on the GPU (same masks, same answer to 1e-5);
4. **streams**: two models computing at once in two threads, each on its own `ComputeStream` (the torch
   runtime's per-model CUDA stream), answer what each answers alone on the default stream;
5. **operators and launches**: per network, kernel operators (a `TorchDispatchMode` count, as
   `bench/op_counts.py`), CUDA kernel launches (`torch.profiler`) and median wall time of one deterministic
   pass on 64 rows, of 1 request x T=32, 64 requests x T=32 and 64 x T=256 (the engine's GPU chunk policy);
   then the same three calls through the compiled MC batch (``MCEngine(compile="default")`` and, on CUDA,
   ``"reduce-overhead"``: CUDA graphs): CUDA launches (kernel launches of the runtime and driver APIs, so
   Triton's count, and graph replays), profiler kernels, median time and the gap to the eager engine. A
   compile failure is a failed check with its reason; the other checks still run (``--compiled``);
6. **bench.mc**: `python -m bench.mc --device cuda` on its networks (a) and (b) (its (c) needs the zoo
   registry, which needs pydantic), T=32 and T=100, batch 256;
7. **memory**: peak GPU memory allocated and reserved per section, and the device's free/total memory.

``--simulate`` maps the device to the CPU: every section runs the same code, the CUDA-only calls
(synchronise, memory statistics, the CUDA profiler activity, streams) take their CPU branch, and the
figures are labelled simulated. Nothing in README may quote a simulated figure as a GPU one.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import platform
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from dropwise.models.zoo import cnn, dropconnect, embedding, fractalnet, mlp, resnet
from dropwise.service.runtimes.streams import ComputeStream
from dropwise.surgery import masks
from dropwise.surgery.engine import MCEngine
from torch import nn

#: tolerance of CPU vs GPU outputs (float32, TF32 off): absolute + relative
ATOL = 1e-4
RTOL = 1e-4
#: a seeded request alone vs inside a batch of requests, on one device
BATCH_ATOL = 1e-5


@dataclass(frozen=True)
class Network:
    """A zoo network as its registry entry describes it (checked by tests/test_gpu_check.py)."""

    build: Callable[..., nn.Module]
    kwargs: dict[str, Any]
    input_shape: tuple[int, ...]
    input_dtype: str
    task: str


NETWORKS: dict[str, Network] = {
    "mlp_digits": Network(
        mlp.dropout_mlp,
        {"in_features": 64, "hidden": [256, 256], "out_features": 10, "p_input": 0.0, "p_hidden": [0.0, 0.5]},
        (64,),
        "float32",
        "classification",
    ),
    "mlp_classic_digits": Network(
        mlp.dropout_mlp,
        {
            "in_features": 64,
            "hidden": [256, 256],
            "out_features": 10,
            "p_input": 0.2,
            "p_hidden": 0.5,
            "dropout": "classic",
        },
        (64,),
        "float32",
        "classification",
    ),
    "dropconnect_mlp_digits": Network(
        dropconnect.dropconnect_mlp,
        {"in_features": 64, "hidden": [128, 128], "out_features": 10, "p": 0.5},
        (64,),
        "float32",
        "classification",
    ),
    "dropconnect_cnn_digits": Network(
        dropconnect.dropconnect_cnn,
        {"image_shape": [1, 8, 8], "channels": [16, 32], "out_features": 10, "p": 0.2},
        (64,),
        "float32",
        "classification",
    ),
    "cnn_mnist": Network(
        cnn.dropblock_cnn,
        {
            "in_channels": 1,
            "channels": [16, 32, 64],
            "image_size": 28,
            "hidden": 128,
            "out_features": 10,
            "p_block": 0.1,
            "block_size": 5,
            "p_spatial": 0.1,
            "p_head": 0.25,
        },
        (1, 28, 28),
        "float32",
        "classification",
    ),
    "resnet_mnist": Network(
        resnet.stochastic_depth_resnet,
        {
            "in_channels": 1,
            "widths": [24, 48],
            "blocks_per_stage": 2,
            "out_features": 10,
            "p_last": 0.2,
            "scale_by_keep": True,
            "p_head": 0.2,
        },
        (1, 28, 28),
        "float32",
        "classification",
    ),
    "resnet_classic_digits": Network(
        resnet.stochastic_depth_resnet,
        {
            "in_channels": 1,
            "widths": [16, 32],
            "blocks_per_stage": 2,
            "out_features": 10,
            "p_last": 0.2,
            "scale_by_keep": False,
            "p_head": 0.2,
            "flat_image_shape": [1, 8, 8],
            "stem_pool": False,
        },
        (64,),
        "float32",
        "classification",
    ),
    "fractal_mnist": Network(
        fractalnet.fractalnet,
        {
            "in_channels": 1,
            "widths": [16, 32],
            "columns": 3,
            "out_features": 10,
            "p_local": 0.15,
            "global_fraction": 0.5,
        },
        (1, 28, 28),
        "float32",
        "classification",
    ),
    "embedding_digits_tokens": Network(
        embedding.embedding_classifier,
        {
            "vocab_size": 17,
            "seq_len": 64,
            "embed_dim": 16,
            "hidden": 128,
            "out_features": 10,
            "p_embed": 0.2,
            "p_head": 0.3,
        },
        (64,),
        "int64",
        "classification",
    ),
    "mlp_diabetes": Network(
        mlp.dropout_mlp,
        {"in_features": 10, "hidden": [64, 64], "out_features": 1, "p_input": 0.0, "p_hidden": 0.1},
        (10,),
        "float32",
        "regression",
    ),
}
#: networks of the operator / launch / timing table
TIMED = ("mlp_digits", "cnn_mnist", "resnet_mnist", "fractal_mnist", "embedding_digits_tokens")


# --------------------------------------------------------------------------- the device, real or simulated
@dataclass
class Device:
    """The device under test; with `simulated`, the CPU standing in for it (CUDA-only calls skipped)."""

    simulated: bool
    torch_device: torch.device = field(init=False)

    def __post_init__(self) -> None:
        self.torch_device = torch.device("cpu" if self.simulated else "cuda")

    @property
    def is_cuda(self) -> bool:
        return self.torch_device.type == "cuda"

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.torch_device)

    def reset_peak(self) -> None:
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.torch_device)

    def peak_memory(self) -> dict[str, int | None]:
        if not self.is_cuda:
            return {"max_allocated_bytes": None, "max_reserved_bytes": None}
        return {
            "max_allocated_bytes": int(torch.cuda.max_memory_allocated(self.torch_device)),
            "max_reserved_bytes": int(torch.cuda.max_memory_reserved(self.torch_device)),
        }

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "simulated": self.simulated,
            "device": str(self.torch_device),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(),
            "python": platform.python_version(),
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
        }
        if self.is_cuda:
            props = torch.cuda.get_device_properties(self.torch_device)
            free, total = torch.cuda.mem_get_info(self.torch_device)
            info.update(
                name=torch.cuda.get_device_name(self.torch_device),
                capability=list(torch.cuda.get_device_capability(self.torch_device)),
                multiprocessors=props.multi_processor_count,
                total_memory_bytes=int(total),
                free_memory_bytes_at_start=int(free),
                cudnn=torch.backends.cudnn.version(),
            )
        else:
            info["name"] = "CPU standing in for a GPU (simulated)"
        return info


def explicit_precision() -> None:
    """TF32 off for matmul and cuDNN convolutions: CPU-vs-GPU parity compares float32 with float32."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


# --------------------------------------------------------------------------- helpers
def build(name: str, device: torch.device) -> tuple[nn.Module, torch.Tensor]:
    """Network `name` with fixed-seed weights (eval mode) and 8 fixed input rows, on `device`."""
    net = NETWORKS[name]
    torch.manual_seed(0)
    model = net.build(**net.kwargs).eval()
    generator = torch.Generator().manual_seed(1)
    if net.input_dtype == "int64":
        x = torch.randint(0, int(net.kwargs["vocab_size"]), (8, *net.input_shape), generator=generator)
    else:
        x = torch.randn(8, *net.input_shape, generator=generator)
    return model.to(device), x.to(device)


def outputs(result: Any, task: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mean, per-sample outputs) of an engine result, on the CPU."""
    mean = result.probabilities if task == "classification" else result.mean
    samples = result.samples
    return mean.detach().float().cpu(), None if samples is None else samples.detach().float().cpu()


def max_gap(a: torch.Tensor, b: torch.Tensor) -> tuple[float, bool]:
    """Largest absolute difference, and whether every entry is within ATOL + RTOL * |b|."""
    gap = float((a - b).abs().max()) if a.numel() else 0.0
    return gap, bool(torch.allclose(a, b, atol=ATOL, rtol=RTOL))


def median_seconds(fn: Callable[[], object], device: Device, repeats: int) -> float:
    """Median wall seconds of `fn` (after one warm-up call), the device synchronised around each call."""
    fn()
    device.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        device.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gpu_chunk_rows(model: nn.Module, x: torch.Tensor, device: Device) -> int | None:
    """The engine's chunk size for a GPU (one pass bounded by memory), when the engine has that policy."""
    from dropwise.surgery import engine as engine_module

    chooser = getattr(engine_module, "default_chunk_rows", None)
    if chooser is None:
        return None
    return int(chooser(model, x, device=device.torch_device))


# --------------------------------------------------------------------------- sections
class Check:
    """Collects pass/fail checks and figures of the sections."""

    def __init__(self) -> None:
        self.checks: list[dict[str, Any]] = []
        self.sections: dict[str, Any] = {}

    def record(self, name: str, passed: bool, **detail: Any) -> None:
        self.checks.append({"name": name, "passed": bool(passed), **detail})

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.checks)


def section_hash_masks(check: Check, device: Device) -> dict[str, Any]:
    """Keys and keep-masks on the CPU and on the device, bit-identical (eager and export-friendly paths)."""
    cases = [
        # (seeds, samples, site, shape, p)
        ([0, 1, 2**40 + 7, 2**63 - 1], 32, 0, (64,), 0.5),
        ([5, 5, 9], 7, 3, (16, 7, 7), 0.1),
        ([123456789], 256, 11, (256,), 0.2),
        ([3, 4], 4, 2, (3, 28, 28), 0.05),
    ]
    decisions = 0
    mismatches = 0
    for seeds, samples, site, shape, p in cases:
        per_device = []
        for dev in (torch.device("cpu"), device.torch_device):
            seed_t = torch.tensor(seeds, dtype=torch.int64, device=dev)
            rows = torch.arange(len(seeds), dtype=torch.int64, device=dev)
            keys = masks.sample_keys(masks.row_keys(seed_t, rows), samples)
            eager = masks.keep_mask(keys, site, shape, p)
            export = masks.keep_mask(keys, site, shape, p, exportable=True)
            per_device.append((keys.cpu(), eager.cpu(), export.cpu()))
        (k0, e0, x0), (k1, e1, x1) = per_device
        same = torch.equal(k0, k1) and torch.equal(e0, e1) and torch.equal(x0, x1) and torch.equal(e0, x0)
        decisions += e0.numel()
        mismatches += 0 if same else int((e0 != e1).sum()) + int((x0 != x1).sum()) + 1
        check.record(f"hash masks bit-identical {shape} p={p}", same, decisions=int(e0.numel()))
    return {"cases": len(cases), "decisions_compared": decisions, "mismatches": mismatches}


def section_seeded_mc(check: Check, device: Device, samples: int) -> dict[str, Any]:
    """Every zoo network: deterministic and seeded MC outputs, CPU vs device, and batch company on device."""
    table: dict[str, Any] = {}
    for name, net in NETWORKS.items():
        row: dict[str, Any] = {}
        try:
            cpu_model, cpu_x = build(name, torch.device("cpu"))
            dev_model = copy.deepcopy(cpu_model).to(device.torch_device)
            dev_x = cpu_x.to(device.torch_device)
            with torch.inference_mode():
                det_cpu, det_dev = cpu_model(cpu_x).float(), dev_model(dev_x).float().cpu()
            if net.task == "classification":
                det_cpu, det_dev = det_cpu.softmax(-1), det_dev.softmax(-1)
            row["deterministic_max_abs"], det_ok = max_gap(det_dev, det_cpu)
            cpu_engine = MCEngine(cpu_model, cpu_x[:2], task=net.task)
            dev_engine = MCEngine(dev_model, dev_x[:2], task=net.task)
            with torch.inference_mode():
                mean_cpu, samples_cpu = outputs(
                    cpu_engine(cpu_x, samples=samples, seed=7, return_samples=True), net.task
                )
                mean_dev, samples_dev = outputs(
                    dev_engine(dev_x, samples=samples, seed=7, return_samples=True), net.task
                )
                row["mc_mean_max_abs"], mean_ok = max_gap(mean_dev, mean_cpu)
                assert samples_cpu is not None and samples_dev is not None
                samples_cpu = samples_cpu.softmax(-1) if net.task == "classification" else samples_cpu
                samples_dev = samples_dev.softmax(-1) if net.task == "classification" else samples_dev
                row["mc_samples_max_abs"], samples_ok = max_gap(samples_dev, samples_cpu)
                row["mc_spread"] = float(samples_cpu.std(dim=0).mean())
                # the same seeded request alone and batched with two others, on the device
                alone = outputs(dev_engine(dev_x[1:3], samples=samples, seed=11), net.task)[0]
                company = dev_engine.run_batch(dev_x[:5], [1, 2, 2], [max(1, samples // 2), samples, 3], [3, 11, 4])
                in_batch = outputs(company[1], net.task)[0]
                row["batch_company_max_abs"] = float((alone - in_batch).abs().max())
            row["rows_independent"] = bool(dev_engine.rows_independent)
            company_ok = row["batch_company_max_abs"] <= BATCH_ATOL or not row["rows_independent"]
            row["passed"] = det_ok and mean_ok and samples_ok and company_ok and row["mc_spread"] > 0
        except Exception as exc:  # one network's failure must not hide the others
            row = {"passed": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        check.record(
            f"seeded MC CPU vs device: {name}",
            row["passed"],
            **{k: v for k, v in row.items() if k not in ("trace", "passed")},
        )
        table[name] = row
    return {"samples": samples, "atol": ATOL, "rtol": RTOL, "batch_atol": BATCH_ATOL, "networks": table}


def section_streams(check: Check, device: Device) -> dict[str, Any]:
    """Two models at once in two threads, each on its own ComputeStream, answer as each does alone."""
    names = ("mlp_digits", "cnn_mnist")
    models = {}
    expected = {}
    for name in names:
        model, x = build(name, device.torch_device)
        x = x.repeat(64, *([1] * (x.dim() - 1)))
        models[name] = (model, x)
        with torch.inference_mode():
            expected[name] = model(x).float().cpu()
    got: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    streams = {name: ComputeStream(device.torch_device) for name in names}
    errors: list[str] = []

    def work(name: str) -> None:
        model, x = models[name]
        stream = streams[name]
        stream.ready()
        try:
            for _ in range(20):
                with stream(), torch.inference_mode():
                    got[name].append(model(x).float().cpu())
        except Exception as exc:
            errors.append(f"{name}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    gaps = {
        name: max(float((g - expected[name]).abs().max()) for g in got[name]) if got[name] else None for name in names
    }
    ids = [s.stream.cuda_stream for s in streams.values() if s.stream is not None]
    distinct = len(set(ids)) == len(ids) and (not device.is_cuda or len(ids) == len(names))
    not_default = not device.is_cuda or all(
        i != torch.cuda.default_stream(device.torch_device).cuda_stream for i in ids
    )
    ok = not errors and all(g is not None and g <= BATCH_ATOL for g in gaps.values()) and distinct and not_default
    check.record("a CUDA stream per model, two models at once", ok, max_abs=gaps, errors=errors)
    return {"max_abs": gaps, "streams": len(ids), "errors": errors}


#: host-side API calls that launch work on the GPU: runtime kernels, driver launches (Triton's), graph replays
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchCooperativeKernel", "cudaGraphLaunch")


def _launches(fn: Callable[[], object], device: Device) -> int | None:
    """CUDA launches of one call (torch.profiler: kernel launches of the runtime and driver APIs, Triton's
    included, and CUDA graph replays, each counting one); None without a GPU."""
    if not device.is_cuda:
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        device.synchronize()
    return sum(e.count for e in prof.key_averages() if e.key.startswith(LAUNCH_CALLS))


def _compiled_rows(name: str, device: Device, repeats: int, big_t: int, mode: str) -> dict[str, Any]:
    """The compiled MC batch (``MCEngine(compile=mode)``) of one network: launches, median time and the
    largest gap to the eager engine, per call; a failure is returned as ``error`` (never raised)."""
    from bench.op_counts import count_launches

    net = NETWORKS[name]
    try:
        model, x8 = build(name, device.torch_device)
        x = x8.repeat(8, *([1] * (x8.dim() - 1)))  # 64 rows
        chunk_rows = gpu_chunk_rows(model, x[:8], device)
        engine = MCEngine(model, x[:8], task=net.task, chunk_rows=chunk_rows, compile=mode)
        eager = MCEngine(model, x[:8], task=net.task, chunk_rows=chunk_rows)
        seeds = list(range(64))
        with torch.inference_mode():
            got = engine.run_batch(x, [1] * 64, [32] * 64, seeds)  # compiles (minutes at most)
            want = eager.run_batch(x, [1] * 64, [32] * 64, seeds)
        if engine.compile_error:
            return {"mode": mode, "error": engine.compile_error}
        gap = max(
            float((u.float() - v.float()).abs().max())
            for a, b in zip(got, want, strict=True)
            for u, v in zip(a.as_dict().values(), b.as_dict().values(), strict=True)
        )
        calls: dict[str, Callable[[], object]] = {
            "1 x T=32": lambda: engine(x[:1], samples=32, seed=1),
            "64 x T=32": lambda: engine.run_batch(x, [1] * 64, [32] * 64, seeds),
            f"64 x T={big_t}": lambda: engine.run_batch(x, [1] * 64, [big_t] * 64, seeds),
        }
        rows: dict[str, Any] = {"mode": mode, "max_abs_vs_eager": gap}
        for label, fn in calls.items():
            with torch.inference_mode():
                counted = count_launches(fn)  # CPU profiler: generated kernels + library calls
                seconds = median_seconds(fn, device, repeats)
                launches = _launches(fn, device)
            rows[label] = {
                "profiler_kernels": counted.total,
                "generated_kernels": counted.generated,
                "graphs": counted.graphs,
                "cuda_launches": launches,
                "median_ms": round(seconds * 1000, 4),
            }
        return rows
    except Exception as exc:  # a compile failure on the device must not stop the other checks
        return {"mode": mode, "error": f"{type(exc).__name__}: {exc}"[:1000], "trace": traceback.format_exc()[-2000:]}


def section_operators(
    check: Check,
    device: Device,
    repeats: int,
    big_t: int,
    networks: tuple[str, ...] = TIMED,
    compiled: tuple[str, ...] = TIMED,
) -> dict[str, Any]:
    """Kernel operators, launches and median time of det / 1 x T=32 / 64 x T=32 / 64 x T=big_t, eager; and
    of the compiled MC batch (`compiled` networks: ``compile="default"``, and on CUDA also
    ``"reduce-overhead"``, CUDA graphs), each compile guarded: its failure is a failed check, not a crash."""
    from bench.op_counts import count

    table: dict[str, Any] = {}
    for name in networks:
        net = NETWORKS[name]
        model, x8 = build(name, device.torch_device)
        x = x8.repeat(8, *([1] * (x8.dim() - 1)))  # 64 rows
        engine = MCEngine(model, x[:8], task=net.task, chunk_rows=gpu_chunk_rows(model, x[:8], device))
        calls: dict[str, Callable[[], object]] = {
            "det (64 rows)": lambda m=model, x=x: m(x),
            "1 x T=32": lambda e=engine, x=x: e(x[:1], samples=32, seed=1),
            "64 x T=32": lambda e=engine, x=x: e.run_batch(x, [1] * 64, [32] * 64, list(range(64))),
            f"64 x T={big_t}": lambda e=engine, x=x: e.run_batch(x, [1] * 64, [big_t] * 64, list(range(64))),
        }
        rows: dict[str, Any] = {}
        for label, fn in calls.items():
            with torch.inference_mode():
                counted = count(fn)
                seconds = median_seconds(fn, device, repeats)
                launches = _launches(fn, device)
            rows[label] = {
                "kernel_ops": counted.total,
                "views": counted.views,
                "syncs": counted.syncs,
                "cuda_launches": launches,
                "median_ms": round(seconds * 1000, 4),
            }
        rows["64 x T=32 / det ops"] = round(rows["64 x T=32"]["kernel_ops"] / rows["det (64 rows)"]["kernel_ops"], 2)
        if name in compiled:
            for mode in ("default", "reduce-overhead") if device.is_cuda else ("default",):
                result = _compiled_rows(name, device, repeats, big_t, mode)
                rows[f"compiled ({mode})"] = result
                ok = "error" not in result and result["max_abs_vs_eager"] <= ATOL
                if ok:
                    per_batch = result["64 x T=32"]
                    launches = per_batch["cuda_launches"] or per_batch["profiler_kernels"]
                    result["64 x T=32 / det ops"] = round(launches / rows["det (64 rows)"]["kernel_ops"], 2)
                check.record(
                    f"compiled MC batch ({mode}): {name}",
                    ok,
                    error=result.get("error"),
                    max_abs_vs_eager=result.get("max_abs_vs_eager"),
                )
        table[name] = rows
    check.record("operator and launch counts measured", bool(table), networks=list(table))
    return {
        "chunk_policy": "engine.default_chunk_rows for the device under test (the CPU when simulated)",
        "networks": table,
    }


def section_bench_mc(
    check: Check, device: Device, batch: int, repeats: int, sample_counts: tuple[int, ...]
) -> dict[str, Any]:
    """`python -m bench.mc --device cuda` on networks a and b (in process), per T."""
    from bench import mc

    runs = {}
    for t in sample_counts:
        argv = ["--networks", "a,b", "--device", str(device.torch_device), "--no-peers", "--no-onnx"]
        argv += ["--samples", str(t), "--batch", str(batch), "--repeats", str(repeats)]
        buffer = io.StringIO()
        try:
            with contextlib.redirect_stdout(buffer):
                mc.main(argv)
            runs[f"T={t}"] = {"argv": "python -m bench.mc " + " ".join(argv), "output": buffer.getvalue()}
            ok = True
        except Exception as exc:
            runs[f"T={t}"] = {
                "argv": " ".join(argv),
                "error": f"{type(exc).__name__}: {exc}",
                "output": buffer.getvalue(),
            }
            ok = False
        check.record(f"bench.mc T={t} batch {batch}", ok)
    return runs


@contextlib.contextmanager
def timed_section(report: dict[str, Any], name: str, device: Device) -> Iterator[dict[str, Any]]:
    device.reset_peak()
    start = time.perf_counter()
    holder: dict[str, Any] = {}
    try:
        yield holder
    finally:
        device.synchronize()
        holder["seconds"] = round(time.perf_counter() - start, 2)
        holder["memory"] = device.peak_memory()
        report[name] = holder


def summary(report: dict[str, Any], check: Check) -> str:
    """The text summary written beside the JSON."""
    env = report["environment"]
    lines = [
        f"dropwise GPU check on {env['name']} ({'SIMULATED on the CPU' if env['simulated'] else env['device']}), "
        f"torch {env['torch']} (CUDA {env['torch_cuda']}), TF32 matmul={env['matmul_allow_tf32']} "
        f"cuDNN={env['cudnn_allow_tf32']}",
        f"result: {'PASSED' if check.passed else 'FAILED'} ({sum(c['passed'] for c in check.checks)} of "
        f"{len(check.checks)} checks), {report['total_seconds']} s",
        "",
    ]
    masks_ = report["hash_masks"]["result"]
    lines.append(f"hash masks: {masks_['decisions_compared']} decisions compared, {masks_['mismatches']} mismatches")
    mc_ = report["seeded_mc"]["result"]
    lines.append(f"seeded MC CPU vs device (T={mc_['samples']}, atol {ATOL} + rtol {RTOL}):")
    for name, row in mc_["networks"].items():
        if "error" in row:
            lines.append(f"  {name}: ERROR {row['error']}")
            continue
        lines.append(
            f"  {name}: {'ok' if row['passed'] else 'FAILED'} det {row['deterministic_max_abs']:.2e}, "
            f"mean {row['mc_mean_max_abs']:.2e}, samples {row['mc_samples_max_abs']:.2e}, "
            f"batch company {row['batch_company_max_abs']:.2e}"
        )
    lines.append(f"streams: max abs vs alone {report['streams']['result']['max_abs']}")
    lines.append("")
    lines.append("operators per call (kernel ops / CUDA launches / median ms):")
    for name, rows in report["operators"]["result"]["networks"].items():
        cells = [
            f"{label}: {r['kernel_ops']} / {r['cuda_launches']} / {r['median_ms']}"
            for label, r in rows.items()
            if isinstance(r, dict) and not label.startswith("compiled")
        ]
        lines.append(f"  {name}: " + "; ".join(cells) + f"; 64xT=32/det ops {rows['64 x T=32 / det ops']}")
        for label, r in rows.items():
            if not label.startswith("compiled"):
                continue
            if "error" in r:
                lines.append(f"    {label}: FAILED {r['error'][:300]}")
                continue
            cells = [
                f"{call}: {c['profiler_kernels']} / {c['cuda_launches']} / {c['median_ms']}"
                for call, c in r.items()
                if isinstance(c, dict)
            ]
            lines.append(
                f"    {label} (profiler kernels / CUDA launches / median ms): "
                + "; ".join(cells)
                + f"; 64xT=32/det {r.get('64 x T=32 / det ops')}; max abs vs eager {r['max_abs_vs_eager']:.1e}"
            )
    lines.append("")
    for t, run in report["bench_mc"]["result"].items():
        lines.append(f"bench.mc {t}: {run.get('argv', '')}")
        lines.append(run.get("output", "") or run.get("error", ""))
    lines.append("memory per section (peak allocated / reserved bytes):")
    for key in ("hash_masks", "seeded_mc", "streams", "operators", "bench_mc"):
        lines.append(f"  {key}: {report[key]['memory']} in {report[key]['seconds']} s")
    failed = [c for c in check.checks if not c["passed"]]
    if failed:
        lines.append("")
        lines.append("FAILED checks:")
        lines += [f"  {json.dumps(c, default=str)[:500]}" for c in failed]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="Folder for gpu_check.json and gpu_check.txt.")
    parser.add_argument("--simulate", action="store_true", help="Run every section on the CPU instead of CUDA.")
    parser.add_argument("--samples", type=int, default=32, help="T of the seeded MC comparison.")
    parser.add_argument("--big-t", type=int, default=256, help="T of the large operator-count row.")
    parser.add_argument("--repeats", type=int, default=10, help="Timed repeats per figure (median).")
    parser.add_argument("--timed", default=",".join(TIMED), help="Networks of the operator / timing table.")
    parser.add_argument(
        "--compiled", default=",".join(TIMED), help="Networks of the compiled MC batch rows ('' for none)."
    )
    parser.add_argument("--mc-batch", type=int, default=256, help="Batch of the bench.mc runs.")
    parser.add_argument("--mc-samples", default="32,100", help="T values of the bench.mc runs.")
    args = parser.parse_args(argv)
    if not args.simulate and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA GPU (use --simulate to run the same code on the CPU)", file=sys.stderr)
        return 2
    device = Device(simulated=args.simulate)
    explicit_precision()
    import torch._inductor.config as inductor_config

    inductor_config.cpp.enable_kernel_profile = True  # compiled CPU kernels visible to the profiler counts
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    check = Check()
    report: dict[str, Any] = {"environment": device.describe(), "command": " ".join(sys.argv)}
    with timed_section(report, "hash_masks", device) as holder:
        holder["result"] = section_hash_masks(check, device)
    with timed_section(report, "seeded_mc", device) as holder:
        holder["result"] = section_seeded_mc(check, device, args.samples)
    with timed_section(report, "streams", device) as holder:
        holder["result"] = section_streams(check, device)
    with timed_section(report, "operators", device) as holder:
        holder["result"] = section_operators(
            check,
            device,
            args.repeats,
            args.big_t,
            tuple(args.timed.split(",")),
            tuple(n for n in args.compiled.split(",") if n),
        )
    with timed_section(report, "bench_mc", device) as holder:
        sample_counts = tuple(int(t) for t in args.mc_samples.split(","))
        holder["result"] = section_bench_mc(check, device, args.mc_batch, max(3, args.repeats // 2), sample_counts)
    if device.is_cuda:
        free, total = torch.cuda.mem_get_info(device.torch_device)
        report["memory_at_end"] = {"free_bytes": int(free), "total_bytes": int(total)}
    report["total_seconds"] = round(time.perf_counter() - start, 1)
    report["checks"] = check.checks
    report["passed"] = check.passed
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    text = summary(report, check)
    (args.out / "gpu_check.txt").write_text(text)
    print(text)
    return 0 if check.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
