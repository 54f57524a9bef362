"""Operators per MC batch: how GPU-shaped the torch engine is, counted on any machine.

On a GPU every operator is at least one kernel launch, so the count of operators that reach the dispatcher
is a CPU-measurable proxy for launch overhead. A ``TorchDispatchMode`` counts every operator one call
issues; view operators (``view``, ``slice``, ``expand``: metadata only, no kernel) are counted apart, and
``aten._local_scalar_dense`` (``.item()``, a blocking device-to-host copy on a GPU) is reported as syncs.

Rows, per network (random weights; counts do not depend on the values):

* ``det``: one deterministic eval pass on a batch of 64 (the unit of the goal);
* ``1 x T=32``: one one-row MC request; ``64 x T=32`` / ``64 x T=256``: 64 one-row requests in one
  ``MCEngine.run_batch`` (how the service batches);
* ``naive``: the naive loop (T=32 eval passes with dropout modules in train mode) on a batch of 64;

with the engine's chunk policy for the CPU (cache-sized chunks, masks from the fused CPU kernel) and for a
GPU (one pass bounded by memory, `dropwise.surgery.engine.default_chunk_rows` with ``device="cuda"``, masks
from torch operators as on a GPU, where the CPU kernel does not run). Goal (issue 14): 64 x T=32
at most 3x ``det`` (kernel operators). Nothing is asserted.

Run: ``python -m bench.op_counts`` (``--networks mlp_digits,a,b``).
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


def count(fn: Callable[[], object]) -> OpCounter:
    """Operators of one call of ``fn`` (after one uncounted warm-up call)."""
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
    from dropwise.surgery import engine as engine_module

    chunk_rows = None
    chooser = getattr(engine_module, "default_chunk_rows", None)
    if policy == "gpu":
        if chooser is None:
            return None  # an engine without a per-device policy: same chunks on every device
        chunk_rows = chooser(model, x[:8], device=torch.device("cuda"))
    return engine_module.MCEngine(model, x[:8], sites, task=task, chunk_rows=chunk_rows)


@contextlib.contextmanager
def torch_masks() -> Iterator[None]:
    """Masks from torch operators, as on a GPU (the fused kernel is CPU-only)."""
    saved = hash_kernel.masked_factors, hash_kernel.masked_product
    hash_kernel.masked_factors = hash_kernel.masked_product = lambda *a, **k: None  # type: ignore[assignment]
    try:
        yield
    finally:
        hash_kernel.masked_factors, hash_kernel.masked_product = saved


def rows(name: str) -> dict[str, OpCounter | None]:
    """The counted calls of one network."""
    model, x, sites, task = _network(name)
    out: dict[str, OpCounter | None] = {}
    det = copy.deepcopy(model).eval()
    out["det"] = count(lambda: det(x))
    for policy in ("cpu", "gpu"):
        engine = _engine(model, x, sites, task, policy)
        if engine is None:
            out[f"{policy}: 1 x T=32"] = out[f"{policy}: 64 x T=32"] = out[f"{policy}: 64 x T=256"] = None
            continue
        with torch_masks() if policy == "gpu" else contextlib.nullcontext():
            out[f"{policy}: 1 x T=32"] = count(lambda e=engine: e(x[:1], samples=32, seed=1))
            for t in (32, 256):
                out[f"{policy}: 64 x T={t}"] = count(
                    lambda e=engine, t=t: e.run_batch(x, [1] * 64, [t] * 64, list(range(64)))
                )
    naive = copy.deepcopy(model).eval()
    for module_name, module in naive.named_modules():
        if (sites is None and isinstance(module, TORCH_DROPOUTS)) or (sites is not None and module_name in sites):
            module.train()
    out["naive"] = count(lambda: [naive(x) for _ in range(32)])
    return out


def main(argv: list[str] | None = None) -> None:
    """Print one markdown table: kernel operators (views, syncs) per call."""
    from dropwise.models.zoo import ZOO

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", default=",".join([*ZOO, "a", "b", "c"]))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    hash_kernel.available()  # counts with the CPU kernel loaded (its build runs in the background)
    names = args.networks.split(",")
    columns = ["det", "cpu: 1 x T=32", "cpu: 64 x T=32", "cpu: 64 x T=256"]
    columns += ["gpu: 1 x T=32", "gpu: 64 x T=32", "gpu: 64 x T=256", "naive"]
    print("kernel operators per call (+ views, syncs = .item()); goal: gpu 64 x T=32 <= 3x det")
    print()
    print("| network | " + " | ".join(columns) + " | gpu 64 x T=32 / det |")
    print("|---|" + "---:|" * (len(columns) + 1))
    for name in names:
        counted = rows(name)
        cells = []
        for column in columns:
            c = counted.get(column)
            cells.append("n/a" if c is None else f"{c.total} (+{c.views}v, {c.syncs}s)")
        det, batch = counted["det"], counted.get("gpu: 64 x T=32") or counted.get("cpu: 64 x T=32")
        ratio = batch.total / det.total if det and batch else float("nan")
        print(f"| {name} | " + " | ".join(cells) + f" | {ratio:.1f} |", flush=True)


if __name__ == "__main__":
    main()
