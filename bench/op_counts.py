"""Operators per MC batch: how GPU-shaped the torch engine is, counted on any machine.

On a GPU every operator is at least one kernel launch, so the count of kernels one call issues is a
CPU-measurable proxy for launch overhead. Two counters:

* eager calls: a ``TorchDispatchMode`` counts every operator that reaches the dispatcher; view operators
  (``view``, ``slice``, ``expand``: metadata only, no kernel) are counted apart, and
  ``aten._local_scalar_dense`` (``.item()``, a blocking device-to-host copy on a GPU) is reported as syncs;
* compiled calls (`count_launches`): a ``torch.profiler`` trace of the call, counting inductor's generated
  kernels (C++ on the CPU, visible with ``torch._inductor.config.cpp.enable_kernel_profile``; the same
  fusion graph becomes Triton kernels on a GPU) plus every operator called outside them (library matmuls and
  convolutions, the eager trunk), views, allocations and no-op conversions excepted (`NO_KERNEL`). The
  ``det (profiler)`` column applies it to the eager deterministic pass: it agrees with the dispatch count.

Rows, per network (random weights; counts do not depend on the values):

* ``det``: one deterministic eval pass on a batch of 64 (the unit of the goal); ``det compiled``: the same
  model through ``torch.compile`` (for reference);
* ``1 x T=32``: one one-row MC request; ``64 x T=32`` / ``64 x T=256``: 64 one-row requests in one
  ``MCEngine.run_batch`` (how the service batches);
* ``naive``: the naive loop (T=32 eval passes with dropout modules in train mode) on a batch of 64;

for the eager engine with the chunk policy of the CPU (``cpu``: cache-sized chunks, masks from the fused CPU
kernel; ``--policies`` to include it) or of a GPU (``gpu``: one pass bounded by memory,
`dropwise.surgery.engine.default_chunk_rows` with ``device="cuda"``, masks from torch operators as on a GPU,
where the CPU kernel does not run), and for the compiled MC batch (``compiled``: ``MCEngine(compile=True)``,
one pass per batch as on a card with the memory for 64 x 256 sample-rows). ``max gap to eager``: the largest
absolute difference of any summary between the compiled and the eager engine (64 seeded requests, T=32).
Goal (issue 14): compiled 64 x T=32 at most 3x ``det``. Nothing is asserted (tests/test_compiled_batch.py
asserts it for two networks).

Run: ``python -m bench.op_counts`` (``--networks mlp_digits,a,b``, ``--policies cpu,gpu,compiled``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from dropwise.surgery import hash_kernel
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bench.mc import TORCH_DROPOUTS, network

ZOO_INPUTS = {
    "digits": ((64,), torch.float32),
    "digits_tokens": ((64,), torch.int64),
    "mnist": ((1, 28, 28), torch.float32),
    "diabetes": ((10,), torch.float32),
}


class OpCounter(TorchDispatchMode):
    """Counts the operators dispatched while active: kernels, views and syncs (``.item()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: Counter[str] = Counter()
        self.views = 0
        self.syncs = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
        if getattr(func, "is_view", False):
            self.views += 1
        else:
            self.kernels[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.kernels.values())


#: operator events of the profiler that launch no kernel: views, allocations, no-op conversions
NO_KERNEL = frozenset(
    f"aten::{name}"
    for name in [
        "empty",
        "empty_strided",
        "empty_like",
        "new_empty",
        "new_empty_strided",
        "lift_fresh",
        "resolve_conj",
        "resolve_neg",
        "detach",
        "alias",
        "view",
        "_unsafe_view",
        "as_strided",
        "as_strided_",
        "slice",
        "select",
        "reshape",
        "_reshape_alias",
        "unsqueeze",
        "squeeze",
        "unsqueeze_",
        "squeeze_",
        "expand",
        "expand_as",
        "t",
        "transpose",
        "permute",
        "to",
        "result_type",
        "unbind",
        "split",
        "chunk",
        "narrow",
        "movedim",
        "flatten",
        "unflatten",
        "contiguous",
        "view_as",
        "broadcast_to",
        "numpy_T",
    ]
)
#: marker events of torch.compile (dynamo / AOT / inductor wrappers), descended into, never counted
_MARKERS = ("TorchDynamo", "Torch-Compiled Region", "Pregraph bytecode", "AOTDispatcher", "## Call CompiledFxGraph")


class LaunchCount:
    """Kernels one call ran, read from a ``torch.profiler`` trace (what a compiled function issues).

    ``generated``: inductor's generated kernels (C++ on the CPU, with
    ``torch._inductor.config.cpp.enable_kernel_profile``; Triton on a GPU); ``extern``: operator calls
    outside them (library matmuls and convolutions, eager operators around or between compiled graphs).
    An operator event counts once, at the outermost event that is not a view, an allocation or a no-op
    (`NO_KERNEL`); compile wrappers are descended into. ``graphs``: compiled-graph calls seen.
    """

    def __init__(self) -> None:
        self.generated = 0
        self.extern: Counter[str] = Counter()
        self.graphs = 0

    @property
    def total(self) -> int:
        return self.generated + sum(self.extern.values())

    def add(self, event: Any) -> None:
        name = str(event.name)
        if name.startswith("## Call CompiledFxGraph"):
            self.graphs += 1
        if name.startswith(_MARKERS):
            for child in event.cpu_children:
                self.add(child)
        elif "::" in name:
            if name in NO_KERNEL:
                for child in event.cpu_children:
                    self.add(child)
            else:
                self.extern[name] += 1
        elif "cpp_fused" in name or "cpp_kernel" in name or name.startswith("triton_"):
            self.generated += 1
        else:  # another marker (record_function): look inside
            for child in event.cpu_children:
                self.add(child)


def count_launches(fn: Callable[[], object]) -> LaunchCount:
    """Kernels of one call of ``fn`` (after one uncounted warm-up call), from a CPU profiler trace.

    Compiled code must have been generated with ``torch._inductor.config.cpp.enable_kernel_profile`` on
    (the CPU kernels are invisible to the profiler otherwise): checked.
    """
    import torch._inductor.config as inductor_config
    from torch.profiler import ProfilerActivity, profile

    if not inductor_config.cpp.enable_kernel_profile:
        raise RuntimeError("set torch._inductor.config.cpp.enable_kernel_profile = True before compiling")
    from torch._dynamo.utils import counters

    for _ in range(3):  # until a counted call compiles nothing (a compile's own operators are not the call's)
        with torch.inference_mode():
            fn()
        graphs = counters["stats"]["unique_graphs"]
        counted = LaunchCount()
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        if counters["stats"]["unique_graphs"] == graphs:
            break
    else:
        raise RuntimeError("every counted call compiled again: a recompilation loop")
    for event in prof.events():
        if event.cpu_parent is None:
            counted.add(event)
    return counted


def count(fn: Callable[[], object]) -> OpCounter:
    """Operators of one call of ``fn`` (after one uncounted warm-up call)."""
    with torch.inference_mode():
        fn()
    counter = OpCounter()
    with torch.inference_mode(), counter:
        fn()
    return counter


def _network(name: str) -> tuple[nn.Module, torch.Tensor, Any, str]:
    """(model, batch of 64, chosen sites, task) of a bench network (a, b, c) or a zoo network."""
    if name in ("a", "b", "c", "c+"):
        model, x, sites = network(name, 64)
        return model, x, sites, "classification"
    from dropwise.models.zoo import ZOO, build

    spec = ZOO[name]
    shape, dtype = ZOO_INPUTS[spec.dataset]
    torch.manual_seed(0)
    x = torch.randint(0, 17, (64, *shape)) if dtype == torch.int64 else torch.randn(64, *shape)
    return build(name).eval(), x, None, spec.task


def _engine(model: nn.Module, x: torch.Tensor, sites: Any, task: str, policy: str) -> Any:
    """The MC engine of ``policy``: ``cpu`` / ``gpu`` (eager, that device's chunk policy) or ``compiled``."""
    from dropwise.surgery import engine as engine_module

    if policy == "cpu":
        return engine_module.MCEngine(model, x[:8], sites, task=task)
    if policy == "gpu":
        chunk_rows = engine_module.default_chunk_rows(model, x[:8], device=torch.device("cuda"))
        return engine_module.MCEngine(model, x[:8], sites, task=task, chunk_rows=chunk_rows)
    # one pass per batch, as the GPU policy gives on a card with the memory for 64 x 256 sample-rows
    return engine_module.MCEngine(model, x[:8], sites, task=task, chunk_rows=1 << 30, compile=True)


@contextlib.contextmanager
def torch_masks() -> Iterator[None]:
    """Masks from torch operators, as on a GPU (the fused kernel is CPU-only)."""
    saved = hash_kernel.masked_factors, hash_kernel.masked_product
    hash_kernel.masked_factors = hash_kernel.masked_product = lambda *a, **k: None  # type: ignore[assignment]
    try:
        yield
    finally:
        hash_kernel.masked_factors, hash_kernel.masked_product = saved


Counted = OpCounter | LaunchCount


def rows(name: str, policies: tuple[str, ...] = ("gpu", "compiled")) -> dict[str, Counted | None]:
    """The counted calls of one network: eager ones with `OpCounter`, compiled ones with `count_launches`."""
    model, x, sites, task = _network(name)
    out: dict[str, Counted | None] = {}
    det = copy.deepcopy(model).eval()
    out["det"] = count(lambda: det(x))
    out["det (profiler)"] = count_launches(lambda: det(x))  # the compiled rows' counter, on the eager pass
    if "compiled" in policies:
        compiled_det = torch.compile(copy.deepcopy(model).eval(), dynamic=True)
        out["det compiled"] = count_launches(lambda: compiled_det(x))
    for policy in policies:
        engine = _engine(model, x, sites, task, policy)
        counter = count_launches if policy == "compiled" else count
        with torch_masks() if policy == "gpu" else contextlib.nullcontext():
            out[f"{policy}: 1 x T=32"] = counter(lambda e=engine: e(x[:1], samples=32, seed=1))
            for t in (32, 256):
                out[f"{policy}: 64 x T={t}"] = counter(
                    lambda e=engine, t=t: e.run_batch(x, [1] * 64, [t] * 64, list(range(64)))
                )
        if policy == "compiled":
            if engine.compile_error:
                print(f"({name}: compile failed, eager counts: {engine.compile_error})")
            gaps[name] = _gap_to_eager(engine, _engine(model, x, sites, task, "gpu"), x)
    naive = copy.deepcopy(model).eval()
    for module_name, module in naive.named_modules():
        if (sites is None and isinstance(module, TORCH_DROPOUTS)) or (sites is not None and module_name in sites):
            module.train()
    out["naive"] = count(lambda: [naive(x) for _ in range(32)])
    return out


#: per network: largest absolute difference of the compiled results from the eager engine's (seeded 64 x T=32)
gaps: dict[str, float] = {}


def _gap_to_eager(compiled: Any, eager: Any, x: torch.Tensor) -> float:
    """Largest absolute difference between every summary of the two engines on 64 seeded requests, T=32."""
    with torch.inference_mode():
        a = compiled.run_batch(x, [1] * 64, [32] * 64, list(range(64)))
        b = eager.run_batch(x, [1] * 64, [32] * 64, list(range(64)))
    return max(
        float((u.double() - v.double()).abs().max())
        for ra, rb in zip(a, b, strict=True)
        for u, v in zip(ra.as_dict().values(), rb.as_dict().values(), strict=True)
    )


def _cell(c: Counted | None) -> str:
    if c is None:
        return "n/a"
    if isinstance(c, LaunchCount):
        return f"{c.total} ({c.generated}g, {c.graphs} graph{'s' if c.graphs != 1 else ''})"
    return f"{c.total} (+{c.views}v, {c.syncs}s)"


def main(argv: list[str] | None = None) -> None:
    """Print one markdown table: kernels per call, eager (operators) and compiled (launches)."""
    import torch._inductor.config as inductor_config
    from dropwise.models.zoo import ZOO

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", default=",".join([*ZOO, "a", "b", "c"]))
    parser.add_argument("--policies", default="gpu,compiled", help="of cpu, gpu, compiled")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    inductor_config.cpp.enable_kernel_profile = True  # the generated CPU kernels appear in the profiler
    hash_kernel.available()  # counts with the CPU kernel loaded (its build runs in the background)
    names = args.networks.split(",")
    policies = tuple(args.policies.split(","))
    columns = ["det", "det (profiler)"] + (["det compiled"] if "compiled" in policies else [])
    for policy in policies:
        columns += [f"{policy}: 1 x T=32", f"{policy}: 64 x T=32", f"{policy}: 64 x T=256"]
    columns.append("naive")
    goal = "compiled" if "compiled" in policies else policies[-1]
    print(
        f"kernels per call (eager: operators +views, syncs; compiled: launches, g = generated kernels); "
        f"goal: {goal} 64 x T=32 <= 3x det"
    )
    print()
    print("| network | " + " | ".join(columns) + f" | {goal} 64 x T=32 / det | goal | max gap to eager |")
    print("|---|" + "---:|" * (len(columns) + 3))
    for name in names:
        counted = rows(name, policies)
        det, batch = counted["det"], counted.get(f"{goal}: 64 x T=32")
        ratio = batch.total / det.total if det and batch else float("nan")
        verdict = "met" if ratio <= 3.0 else f"missed by {ratio - 3.0:.1f}x"
        cells = [_cell(counted.get(column)) for column in columns]
        gap = f"{gaps[name]:.1e}" if name in gaps else "n/a"
        print(f"| {name} | " + " | ".join(cells) + f" | {ratio:.2f} | {verdict} | {gap} |", flush=True)


if __name__ == "__main__":
    main()
