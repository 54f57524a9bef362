"""The runtime contract: how the service runs one model package on one backend.

A runtime follows LitServe's decode / predict / encode split. The service decodes and validates the request
(`dropwise.service.inference`), the runtime *predicts* on a whole dynamic batch, and encodes the raw network output
into named numpy outputs (`probabilities`, `predictions` or `mean`, and for MC the uncertainty summaries).
Output names, dtypes and shapes come from one table, `dropwise.surgery.outputs`; `encode_deterministic` and
`encode_mc` are the only encoders (every runtime and every MC path goes through them). Two runtimes
implement it: `dropwise.service.runtimes.torch_runtime.TorchRuntime` and
`dropwise.service.runtimes.onnx_runtime.OnnxRuntime`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from dropwise.package import InputSpec
from dropwise.service.model_inputs import ModelInputs
from dropwise.surgery.calibration import calibrate_mean, scale_logits, temperatures
from dropwise.surgery.outputs import SAMPLE_LOGITS, SAMPLES, output_names, rename_legacy, summary_names

Task = Literal["classification", "regression"]
Outputs = dict[str, np.ndarray]


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
    def temperatures(self) -> tuple[float, float]:
        """(T_det, T_mc) that `dropwise evaluate` stored in the manifest; (1.0, 1.0) when uncalibrated
        (`dropwise.surgery.calibration`)."""
        return temperatures(self.manifest or {"task": self.task})

    @property
    def calibrated(self) -> bool:
        """True when the manifest holds temperatures (classification answers are temperature-scaled)."""
        return self.task == "classification" and bool((self.manifest or {}).get("calibration"))

    @property
    def has_mc_sites(self) -> bool:
        """True when the package lists at least one stochastic site (MC mode is meaningful)."""
        return len(self.sites) > 0


@dataclass(frozen=True)
class MCGroup:
    """One request's share of an MC batch: which rows it owns, its T, seed and whether to return samples."""

    rows: int
    num_samples: int
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

    @property
    def mc_returns_samples(self) -> bool:
        """Whether `predict_mc` can answer the per-sample `samples` output (`return_samples`)."""
        ...

    def predict_deterministic(self, x: ModelInputs) -> Outputs:
        """One deterministic (eval-mode) pass over a batch `x` [B, ...] -> named outputs with batch dim B."""
        ...

    def predict_mc(
        self, x: ModelInputs, groups: Sequence[MCGroup], check: Callable[[], None] | None = None
    ) -> list[Outputs]:
        """MC-dropout for several requests stacked in `x` (rows in `groups` order) -> one output dict each.

        Requests with different T share the trunk pass. Each dict holds the outputs of
        `dropwise.surgery.outputs.output_names(task, "mc", group.return_samples)`, made by `encode_mc`.
        `check` is called between chunks of work; an exception it raises abandons the computation (the
        batcher stops work past its deadline).
        """
        ...


def standardised_to_target(values: np.ndarray, spec: PackageSpec, *, scale_only: bool = False) -> np.ndarray:
    """Undo the target standardisation of a regression package (`scale_only` for standard deviations)."""
    out = values.astype(np.float64) * spec.target_std
    if not scale_only:
        out = out + spec.target_mean
    return out.astype(np.float32)


def _numpy(value: Any) -> np.ndarray:
    """A tensor or array as a float32 numpy array on the CPU (no copy when it already is one: this runs
    for every output of every request)."""
    if hasattr(value, "detach"):
        import torch  # here, as everywhere in this module: the module itself stays importable without torch

        if value.dtype is torch.float32 and not value.requires_grad and value.device.type == "cpu":
            return value.numpy()
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def encode_deterministic(raw: np.ndarray, spec: PackageSpec, temperature: float = 1.0) -> Outputs:
    """Encode one deterministic pass: logits -> `probabilities` + `predictions`, or regression -> `mean`.

    ``temperature``: the logits are divided by it first (temperature scaling; 1.0 = as they are).
    """
    import torch

    if spec.task == "classification":
        logits = torch.from_numpy(np.ascontiguousarray(scale_logits(raw, temperature), dtype=np.float32))
        probs = torch.softmax(logits, dim=-1).numpy()
        return {"probabilities": probs, "predictions": probs.argmax(axis=-1).astype(np.int64)}
    return {"mean": standardised_to_target(np.asarray(raw), spec)}


def encode_mc(values: Mapping[str, Any], spec: PackageSpec, return_samples: bool, temperature: float = 1.0) -> Outputs:
    """The one MC encoder: named MC values (summaries, optional per-sample outputs) -> the service outputs.

    ``values`` are keyed by the names of `dropwise.surgery.outputs` (torch tensors or numpy arrays): an
    `MCResult.as_dict()`, `summarise_samples(...)`, or an MC ONNX graph's outputs by name (legacy names are
    translated). Classification adds `predictions` (argmax of `probabilities`); per-sample logits become
    per-sample probabilities; regression values go back to target units. The result holds exactly
    `output_names(task, "mc", return_samples)`. ``temperature`` calibrates `probabilities` only
    (``softmax(log p_bar / T)``, `dropwise.surgery.calibration`; 1.0 = as they are).
    """
    import torch

    values = rename_legacy(values, spec.task)
    names = output_names(spec.task, "mc", return_samples)
    out: Outputs = {}
    for name in summary_names(spec.task):
        out[name] = _numpy(values[name])
    if spec.task == "classification":
        out["probabilities"] = calibrate_mean(out["probabilities"], temperature)
        out["predictions"] = out["probabilities"].argmax(axis=-1).astype(np.int64)
    else:
        out["mean"] = standardised_to_target(out["mean"], spec)
        out["std"] = standardised_to_target(out["std"], spec, scale_only=True)
    if return_samples:
        if values.get(SAMPLES) is not None:
            per_sample = _numpy(values[SAMPLES])
        elif spec.task == "classification" and values.get(SAMPLE_LOGITS) is not None:
            per_sample = torch.softmax(torch.from_numpy(_numpy(values[SAMPLE_LOGITS])), dim=-1).numpy()
        else:
            raise ValueError(f"{spec.name}: the MC path produced no per-sample outputs")
        out[SAMPLES] = per_sample if spec.task == "classification" else standardised_to_target(per_sample, spec)
    return {name: out[name] for name in names}


def summarise_samples(per_sample: Any, task: str) -> dict[str, Any]:
    """Summaries of raw per-sample outputs ``[T, B, K]`` (logits or values) keyed by output name.

    For MC paths that produce the T passes themselves (the torch runtime's fallback loop); the result
    feeds `encode_mc`.
    """
    import torch
    from dropwise.surgery.summaries import classification_summaries, regression_summaries

    samples = per_sample if isinstance(per_sample, torch.Tensor) else torch.from_numpy(np.asarray(per_sample))
    samples = samples.detach().float().cpu()
    if task == "classification":
        s = classification_summaries(samples)
        named = dict(zip(summary_names(task), s.as_tuple(), strict=True))
        return {**named, SAMPLE_LOGITS: samples}
    r = regression_summaries(samples)
    return {**dict(zip(summary_names(task), r.as_tuple(), strict=True)), SAMPLES: samples}
