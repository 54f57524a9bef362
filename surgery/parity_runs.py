"""Parity measurements of the convert pipeline: run torch and ONNX Runtime on the same inputs and compare.

The statistics (element-wise bound, Bonferroni z-test, spread guard) and the report live in
``dropwise.surgery.parity``; this module produces the numbers they judge:

* deterministic: the source network in eval mode, the folded network and the deterministic ONNX graph on the
  same batches (three comparisons);
* MC: T plain stochastic passes of the torch MC model against the MC ONNX graph's summaries (z-test of the
  means), plus the checks that the graph is stochastic across runs and sessions under default options.

Inputs are a tuple of tensors in the order of the model's named inputs (one for most models); the ONNX
graphs take them by those names.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dropwise.package import InputSpec
from dropwise.surgery.export import DEFAULT_OUTPUT_NAME
from dropwise.surgery.outputs import NUM_SAMPLES, summary_names
from dropwise.surgery.parity import Comparison, MCParity, compare, spread_matches, z_test
from dropwise.surgery.providers import create_session
from dropwise.surgery.sources import generated_inputs
from torch import nn

from dropwise.errors import DropwiseError

Batch = tuple[torch.Tensor, ...]


class ParityRunError(DropwiseError, RuntimeError):
    """A parity measurement cannot run (no inputs can be made, a graph with unexpected inputs or outputs)."""


def parity_inputs(
    inputs: Sequence[InputSpec], count: int, dataset: str | None = None, seed: int = 0
) -> tuple[Batch, str]:
    """`count` rows of parity inputs: the test split of `dataset` (one-input models), else generated from
    the input specs (``dropwise.surgery.sources.generated_inputs``); returns them and a description."""
    if dataset is not None:
        from dropwise.models.data import load_dataset

        if len(inputs) > 1:
            raise ParityRunError(f"dataset {dataset!r} gives one input; the model takes {[s.name for s in inputs]}")
        x = load_dataset(dataset).test[0]
        if x.shape[0] < count:
            repeats = -(-count // x.shape[0])
            x = x.repeat(repeats, *([1] * (x.dim() - 1)))
        return (x[:count].contiguous(),), f"test split of {dataset}"
    if not inputs:
        raise ParityRunError("the input shape is unknown: pass --input-shape (or --dataset) to make parity inputs")
    described = ", ".join(
        f"{s.name} {'standard normal' if s.dtype == 'float32' else 'int64 in ' + str(list(s.range or (0, 2)))}"
        for s in inputs
    )
    return tuple(generated_inputs(inputs, count, seed)), f"generated ({described})"


def rows(batch: Batch, count: int) -> Batch:
    """The first `count` rows of every input."""
    return tuple(t[:count] for t in batch)


def feeds(names: Sequence[str], batch: Batch) -> dict[str, np.ndarray]:
    """ONNX Runtime feeds: each input by its name."""
    return {name: t.numpy() for name, t in zip(names, batch, strict=True)}


def eval_outputs(model: nn.Module, batches: Sequence[Batch]) -> list[np.ndarray]:
    """The model's eval-mode outputs on each batch."""
    model.eval()
    with torch.no_grad():
        return [model(*b).detach().cpu().numpy() for b in batches]


def onnx_outputs(session: Any, names: Sequence[str], batches: Sequence[Batch]) -> list[np.ndarray]:
    """The deterministic graph's ``output`` on each batch."""
    out_names = [o.name for o in session.get_outputs()]
    if DEFAULT_OUTPUT_NAME not in out_names:
        raise ParityRunError(f"deterministic graph has no output {DEFAULT_OUTPUT_NAME!r}: {out_names}")
    return [session.run([DEFAULT_OUTPUT_NAME], feeds(names, b))[0] for b in batches]


def deterministic_parity(
    model: nn.Module,
    folded: nn.Module,
    session: Any,
    names: Sequence[str],
    batches: Sequence[Batch],
    tolerance: float,
) -> list[Comparison]:
    """torch eval vs folded, folded vs ONNX, torch eval vs ONNX."""
    reference = eval_outputs(model, batches)
    folded_out = eval_outputs(folded, batches)
    graph_out = onnx_outputs(session, names, batches)
    return [
        compare("torch eval vs folded", reference, folded_out, tolerance),
        compare("folded vs onnx", folded_out, graph_out, tolerance),
        compare("torch eval vs onnx", reference, graph_out, tolerance),
    ]


def torch_mc_samples(mc_model: nn.Module, batch: Batch, samples: int, task: str) -> np.ndarray:
    """T plain forward passes of the MC model: probabilities (classification) or outputs (regression)."""
    outs = []
    with torch.no_grad():
        for _ in range(samples):
            y = mc_model(*batch)
            outs.append(torch.softmax(y, dim=-1) if task == "classification" else y)
    return torch.stack(outs).double().numpy()


def mc_feeds(session: Any, names: Sequence[str], batch: Batch, samples: int) -> dict[str, np.ndarray]:
    """Feeds for the MC graph: the inputs, T, and nothing else (the optional seed input is left unset)."""
    out = feeds(names, batch)
    for spec in session.get_inputs():
        if spec.name in out:
            continue
        if spec.name in (NUM_SAMPLES, "samples", "T"):
            shape = [d if isinstance(d, int) else 1 for d in spec.shape]
            out[spec.name] = np.full(shape, samples, dtype=np.int64)
    missing = [s.name for s in session.get_inputs() if s.name not in out and "seed" not in s.name]
    if missing:
        raise ParityRunError(f"the MC graph has inputs this pipeline does not know how to feed: {missing}")
    return out


def mc_mean_std(session: Any, graph_feeds: dict[str, np.ndarray], task: str) -> tuple[np.ndarray, np.ndarray]:
    """The MC graph's mean (``mean_probs`` or ``mean``) and ``std``, as float64."""
    names = [o.name for o in session.get_outputs()]
    mean_name = summary_names(task)[0]
    if mean_name not in names or "std" not in names:
        raise ParityRunError(f"the MC graph lacks outputs {mean_name!r} and 'std': it has {names}")
    mean, std = session.run([mean_name, "std"], graph_feeds)
    return mean.astype(np.float64), std.astype(np.float64)


def mc_parity(
    mc_model: nn.Module,
    mc_path: Path,
    batch: Batch,
    task: str,
    names: Sequence[str],
    *,
    samples: int,
    alpha: float,
    device: str,
) -> MCParity:
    """torch MC vs the MC graph: z-test of the means, spread, and stochastic across runs and sessions."""
    torch_samples = torch_mc_samples(mc_model, batch, samples, task)
    t_mean, t_std = torch_samples.mean(axis=0), torch_samples.std(axis=0)
    # Default session options on purpose: the MC graph must stay stochastic in any ONNX Runtime user.
    first, _ = create_session(mc_path, device)
    second, _ = create_session(mc_path, device)
    o_mean, o_std = mc_mean_std(first, mc_feeds(first, names, batch, samples), task)
    # Stochasticity across runs and sessions, checked on a small problem (the graph cost grows with T * B).
    small = mc_feeds(first, names, rows(batch, 2), min(samples, 8))
    o_mean_small, _ = mc_mean_std(first, small, task)
    o_mean_again, _ = mc_mean_std(first, small, task)
    o_mean_other, _ = mc_mean_std(second, small, task)
    if o_mean.shape != t_mean.shape:
        raise ParityRunError(f"MC graph output shape {o_mean.shape} differs from torch MC {t_mean.shape}")
    test = z_test(
        summary_names(task)[0],
        t_mean,
        t_std,
        samples,
        o_mean,
        o_std,
        samples,
        alpha=alpha,
    )
    std_within = float(o_std.max()) if o_std.size else 0.0
    spread = spread_matches(t_std, o_std)
    runs_differ = not np.array_equal(o_mean_small, o_mean_again)
    sessions_differ = not np.array_equal(o_mean_small, o_mean_other)
    return MCParity(
        samples=samples,
        batch=int(batch[0].shape[0]),
        z_test=test,
        std_within_run=std_within,
        runs_differ=runs_differ,
        sessions_differ=sessions_differ,
        mean_std_torch=float(t_std.mean()),
        mean_std_onnx=float(o_std.mean()),
        spread_ok=spread,
        passed=test.passed and std_within > 0.0 and spread and runs_differ and sessions_differ,
    )
