"""The runtime contract: how the service runs one model package on one backend.

A runtime follows LitServe's decode / predict / encode split. The service decodes and validates the request
(`dropwise.service.inference`), the runtime *predicts* on a whole dynamic batch, and encodes the raw network output
into named numpy outputs (`probabilities`, `predictions` or `mean`, and for MC the uncertainty summaries).
Two runtimes implement it: `dropwise.service.runtimes.torch_runtime.TorchRuntime` and
`dropwise.service.runtimes.onnx_runtime.OnnxRuntime`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from dropwise.package import InputSpec

Task = Literal["classification", "regression"]
Outputs = dict[str, np.ndarray]

#: Output names a runtime produces (the contract in docs/CONTRACTS.md, "Service internals").
DETERMINISTIC_CLASSIFICATION = ("probabilities", "predictions")
DETERMINISTIC_REGRESSION = ("mean",)
MC_SUMMARIES = ("predictive_entropy", "expected_entropy", "mutual_information", "variation_ratio", "std")


@dataclass(frozen=True)
class PackageSpec:
    """What the service needs to know about one package version, read from its manifest.

    `input_shape` includes the batch dimension as -1. `target_mean`/`target_std` undo the standardisation
    of a regression target (identity for classification).
    """

    name: str
    version: int
    path: Path
    task: Task
    input_name: str
    input_shape: tuple[int, ...]
    input_dtype: str
    preprocessing: str = ""
    labels: tuple[str, ...] | None = None
    sites: tuple[dict[str, Any], ...] = ()
    target_mean: float = 0.0
    target_std: float = 1.0
    input_range: tuple[int, int] | None = None  #: [low, high) of token ids for integer inputs
    files: tuple[str, ...] = ()
    manifest: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    #: every named input in ``forward`` order (the manifest's ``inputs``); ``input_*`` describe the first
    inputs: tuple[InputSpec, ...] = ()

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The input shape of one example (without the batch dimension)."""
        return tuple(self.input_shape[1:])

    @property
    def has_mc_sites(self) -> bool:
        """True when the package lists at least one stochastic site (MC mode is meaningful)."""
        return len(self.sites) > 0


@dataclass(frozen=True)
class MCGroup:
    """One request's share of an MC batch: which rows it owns, its T, seed and whether to return samples."""

    rows: int
    samples: int
    seed: int
    return_samples: bool = False


@runtime_checkable
class Runtime(Protocol):
    """A loaded model on one backend and device.

    Implementations must be safe to call from one worker thread at a time (the batcher guarantees that)
    and must give each MC request the same result whatever else shares its batch: masks are drawn from the
    request's own seed, never from a generator shared across requests.
    """

    backend: str  #: "torch" or "onnxruntime"
    device: str  #: "cpu" or "cuda" (or "cuda:N")
    provider: str  #: what actually runs it, e.g. "torch-cpu", "CUDAExecutionProvider"
    spec: PackageSpec

    def load(self) -> None:
        """Read weights / build sessions and warm up; raises on a broken package."""
        ...

    @property
    def supports_mc(self) -> bool:
        """Whether `predict_mc` is available for this package and backend."""
        ...

    def predict_deterministic(self, x: np.ndarray) -> Outputs:
        """One deterministic (eval-mode) pass over a batch `x` [B, ...] -> named outputs with batch dim B."""
        ...

    def predict_mc(self, x: np.ndarray, groups: Sequence[MCGroup]) -> list[Outputs]:
        """MC-dropout for several requests stacked in `x` (rows in `groups` order) -> one output dict each.

        Requests with different T share the trunk pass. Each dict holds `probabilities` (or `mean`), the MC
        summaries, and `samples` [T, rows, K] when that group asked for it.
        """
        ...


def standardised_to_target(values: np.ndarray, spec: PackageSpec, *, scale_only: bool = False) -> np.ndarray:
    """Undo the target standardisation of a regression package (`scale_only` for standard deviations)."""
    out = values.astype(np.float64) * spec.target_std
    if not scale_only:
        out = out + spec.target_mean
    return out.astype(np.float32)


def encode_deterministic(raw: np.ndarray, spec: PackageSpec) -> Outputs:
    """Encode one deterministic pass: logits -> `probabilities` + `predictions`, or regression -> `mean`."""
    import torch

    if spec.task == "classification":
        logits = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))
        probs = torch.softmax(logits, dim=-1).numpy()
        return {"probabilities": probs, "predictions": probs.argmax(axis=-1).astype(np.int64)}
    return {"mean": standardised_to_target(np.asarray(raw), spec)}


def encode_mc(samples: Any, spec: PackageSpec, return_samples: bool) -> Outputs:
    """Encode T stochastic passes `[T, B, K]` (torch tensor) with `dropwise.surgery.summaries` into named outputs."""
    import torch
    from dropwise.surgery.summaries import classification_summaries, regression_summaries

    samples = samples if isinstance(samples, torch.Tensor) else torch.from_numpy(np.asarray(samples))
    samples = samples.detach().float().cpu()
    if spec.task == "classification":
        s = classification_summaries(samples)
        probs = s.mean_probs.numpy()
        out: Outputs = {
            "probabilities": probs,
            "predictions": probs.argmax(axis=-1).astype(np.int64),
            "predictive_entropy": s.predictive_entropy.numpy(),
            "expected_entropy": s.expected_entropy.numpy(),
            "mutual_information": s.mutual_information.numpy(),
            "variation_ratio": s.variation_ratio.numpy(),
            "std": s.std.numpy(),
        }
        if return_samples:
            out["samples"] = torch.softmax(samples, dim=-1).numpy()
        return out
    r = regression_summaries(samples)
    out = {
        "mean": standardised_to_target(r.mean.numpy(), spec),
        "std": standardised_to_target(r.std.numpy(), spec, scale_only=True),
    }
    if return_samples:
        out["samples"] = standardised_to_target(samples.numpy(), spec)
    return out
