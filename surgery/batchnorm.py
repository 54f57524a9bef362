"""Re-estimate BatchNorm statistics with dropout off: the variance-shift remedy.

Li, Chen, Hu, Yang, "Understanding the Disharmony between Dropout and Batch Normalization by Variance Shift",
CVPR 2019. During training an inverted-dropout site before a BatchNorm layer raises the variance of that
layer's input (the mask's ``1/q`` scaling), so the running variance BatchNorm accumulates is the dropout-ON
variance; at test time dropout is off and the input variance is smaller: the statistics no longer match.
Their remedy: after training, run the training data once more with every stochastic site in eval form and
recompute the BatchNorm statistics.

``method="population"`` is a refinement (exact statistics per layer, in forward order, with the upstream
layers already recalibrated): the per-batch average of the cumulative method misses the spread of the batch
means, which matters in deep layers with small batches.

``recalibrate_batchnorm`` does exactly that, in place: running statistics reset, ``momentum=None``
(cumulative average over all batches), sites and every other module in eval, BatchNorm layers in train,
no gradients, then the original momentum and training flags are restored.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .sites import call_model

__all__ = ["BatchNormChange", "BatchNormReport", "recalibrate_batchnorm"]

_BatchNorm = nn.modules.batchnorm._BatchNorm


def _stats(bn: _BatchNorm) -> tuple[Tensor, Tensor, Tensor]:
    """``running_mean``, ``running_var`` and ``num_batches_tracked`` of a layer that tracks them."""
    mean, var, count = bn.running_mean, bn.running_var, bn.num_batches_tracked
    assert mean is not None and var is not None and count is not None
    return mean, var, count


@dataclass
class BatchNormChange:
    """One BatchNorm layer: mean running variance before / after, and the mean relative change per channel."""

    name: str
    var_before: float
    var_after: float
    relative_change: float
    mean_shift: float


@dataclass
class BatchNormReport:
    """Per-layer changes of the running statistics, and how many batches / samples were used."""

    layers: list[BatchNormChange] = field(default_factory=list)
    batches: int = 0
    samples: int = 0

    def __str__(self) -> str:
        head = f"{'layer':<32} {'var before':>11} {'var after':>11} {'rel change':>11} {'mean shift':>11}"
        rows = [
            f"{c.name:<32} {c.var_before:>11.4g} {c.var_after:>11.4g} {c.relative_change:>+11.3%} {c.mean_shift:>11.4g}"
            for c in self.layers
        ]
        return "\n".join([head, *rows, f"{self.batches} batches, {self.samples} samples"])


def _batches(data: Any, batch_size: int) -> Iterable[Any]:
    if isinstance(data, Tensor):
        if data.dim() == 0 or data.shape[0] == 0:
            raise ValueError("data must be a non-empty batch of inputs")
        return data.split(batch_size)
    return data


def _inputs(batch: Any) -> Any:
    """A batch of a DataLoader is often ``(x, y)``: keep the inputs only."""
    if isinstance(batch, tuple | list) and len(batch) == 2 and isinstance(batch[1], Tensor):
        return batch[0]
    return batch


def _run(model: nn.Module, data: Any, batch_size: int, max_batches: int | None, device: Any) -> tuple[int, int]:
    """One pass over the data; returns (batches, samples)."""
    batches = samples = 0
    for batch in _batches(data, batch_size):
        if max_batches is not None and batches >= max_batches:
            break
        x = _inputs(batch)
        if device is not None and isinstance(x, Tensor):
            x = x.to(device)
        call_model(model, x)
        batches += 1
        first = x if isinstance(x, Tensor) else next(iter(x.values() if isinstance(x, dict) else x))
        samples += int(first.shape[0])
    if batches == 0:
        raise ValueError("no data: recalibration needs at least one batch")
    return batches, samples


def _forward_order(
    model: nn.Module, layers: dict[str, _BatchNorm], data: Any, batch_size: int, device: Any
) -> list[str]:
    """BatchNorm layer names in the order the forward pass first reaches them (one batch)."""
    order: list[str] = []
    hooks = [
        m.register_forward_pre_hook(lambda _m, _a, n=n: order.append(n) if n not in order else None)
        for n, m in layers.items()
    ]
    try:
        _run(model, data, batch_size, 1, device)
    finally:
        for h in hooks:
            h.remove()
    return order + [n for n in layers if n not in order]


def _population(
    model: nn.Module,
    layers: dict[str, _BatchNorm],
    data: Any,
    batch_size: int,
    max_batches: int | None,
    device: Any,
) -> tuple[int, int]:
    """Exact statistics, layer by layer in forward order, every upstream layer already recalibrated."""
    counts = (0, 0)
    for name in _forward_order(model, layers, data, batch_size, device):
        bn = layers[name]
        acc: dict[str, Any] = {}

        def hook(_m: nn.Module, args: tuple[Tensor, ...], acc: dict[str, Any] = acc) -> None:
            t = args[0].detach().transpose(0, 1).reshape(args[0].shape[1], -1).double()
            acc["s"] = acc.get("s", 0.0) + t.sum(1)
            acc["ss"] = acc.get("ss", 0.0) + (t * t).sum(1)
            acc["n"] = acc.get("n", 0) + t.shape[1]

        handle = bn.register_forward_pre_hook(hook)
        try:
            counts = _run(model, data, batch_size, max_batches, device)
        finally:
            handle.remove()
        n = acc["n"]
        mean = acc["s"] / n
        var = (acc["ss"] / n - mean * mean).clamp_min(0.0) * (n / max(n - 1, 1))
        running_mean, running_var, tracked = _stats(bn)
        running_mean.copy_(mean.to(running_mean.dtype))
        running_var.copy_(var.to(running_var.dtype))
        tracked.add_(counts[0])
    return counts


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    data: Tensor | Iterable[Any],
    *,
    batch_size: int = 256,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    method: Literal["cumulative", "population"] = "cumulative",
) -> BatchNormReport:
    """Recompute every BatchNorm layer's running statistics with dropout off (in place).

    Args:
        model: the model (changed in place: running statistics only).
        data: a tensor of inputs (split into ``batch_size`` chunks) or an iterable of batches (a tensor,
            ``(x, y)`` pairs from a DataLoader, a tuple of positional inputs or a dict of keyword inputs).
        batch_size: chunk size when ``data`` is a tensor.
        max_batches: stop after this many batches.
        device: move tensor batches here first.
        method: ``"cumulative"`` (Li et al.: BatchNorm in train mode, ``momentum=None``, so the running
            variance is the average of the per-batch variances; one pass) or ``"population"`` (exact
            mean and unbiased variance of each layer's input over all the data, with every upstream layer
            already recalibrated and in eval form, i.e. what the layer sees at test time; one pass per layer).

    Returns:
        a ``BatchNormReport`` with each layer's mean running variance before and after.

    Raises:
        ValueError: no BatchNorm layer with running statistics, no data, or an unknown method.
    """
    if method not in ("cumulative", "population"):
        raise ValueError(f"method must be 'cumulative' or 'population', got {method!r}")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer with running statistics")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if method == "population" and not isinstance(data, Tensor) and iter(data) is data:
        data = list(data)  # several passes: a one-shot iterator is materialised
    saved_state = {n: tuple(t.clone() for t in _stats(m)) for n, m in layers.items()}
    flags = {name: m.training for name, m in model.named_modules()}
    momenta = {n: m.momentum for n, m in layers.items()}
    report = BatchNormReport()
    try:
        for m in model.modules():  # every site and every other layer in eval form (not model.eval():
            m.training = False  # an MC model's eval() would keep its sites on)
        if method == "population":
            report.batches, report.samples = _population(model, layers, data, batch_size, max_batches, device)
        else:
            for m in layers.values():
                m.reset_running_stats()
                m.momentum = None  # cumulative moving average: every batch weighs the same
                m.train()
            report.batches, report.samples = _run(model, data, batch_size, max_batches, device)
    except BaseException:
        for n, m in layers.items():
            for current, saved in zip(_stats(m), saved_state[n], strict=True):
                current.copy_(saved)
        raise
    finally:
        for n, m in layers.items():
            m.momentum = momenta[n]
        for name, m in model.named_modules():
            m.training = flags[name]
    for n, m in layers.items():
        mean0, var0, _ = saved_state[n]
        mean1, var1, _ = _stats(m)
        rel = ((var1 - var0) / var0.clamp_min(1e-12)).mean()
        report.layers.append(
            BatchNormChange(
                name=n,
                var_before=float(var0.mean()),
                var_after=float(var1.mean()),
                relative_change=float(rel),
                mean_shift=float((mean1 - mean0).abs().mean()),
            )
        )
    return report
