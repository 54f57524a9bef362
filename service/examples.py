"""A ready request body for every model: what `GET /v1/models/{name}/example` answers.

The rows come from the package's recorded data: the first two examples of the test split of the dataset the
package was trained on (`manifest.training.dataset`, loaded with `dropwise.models.data.load_dataset`), in
the form the model takes (already preprocessed). A package without a recorded dataset gets the documented
generator instead: two rows of zeros of each input's shape and dtype (dynamic dimensions set to 1), which
is a valid input whatever the model computes from it. The body asks for an MC prediction with the model's
default T and seed 0, so pasting it gives a reproducible answer.

`preprocess(spec, raw)` applies a package's recorded preprocessing to raw inputs (`"preprocess": true`).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from dropwise.service.errors import InvalidInput
from dropwise.service.runtimes.base import PackageSpec

ROWS = 2


@functools.lru_cache(maxsize=64)
def _dataset_rows(dataset: str, rows: int) -> list[Any] | None:
    from dropwise.models.data import DATASETS, load_dataset

    if dataset not in DATASETS:
        return None
    x = load_dataset(dataset).test[0][:rows]
    return np.asarray(x).round(6).tolist()


def _zeros(shape: list[int] | tuple[int, ...], dtype: str) -> list[Any]:
    dims = [ROWS, *(d if d > 0 else 1 for d in list(shape)[1:])]
    return np.zeros(dims, dtype=np.float32 if dtype.startswith("float") else np.int64).tolist()


def example_inputs(spec: PackageSpec) -> tuple[Any, str]:
    """(inputs, where they come from) for `spec`: test-split rows, or zeros (see the module docstring)."""
    training = spec.manifest.get("training") or {}
    dataset = training.get("dataset") if isinstance(training, dict) else None
    if len(spec.inputs) <= 1 and isinstance(dataset, str):
        rows = _dataset_rows(dataset, ROWS)
        if rows is not None:
            return rows, f"the first {ROWS} rows of the {dataset!r} test split, preprocessed as the model expects"
    if len(spec.inputs) > 1:
        return {s.name: _zeros(s.shape, s.dtype) for s in spec.inputs}, "zeros of each input's shape"
    return _zeros(spec.input_shape, spec.input_dtype), "zeros of the input's shape"


def example_request(spec: PackageSpec, num_samples: int) -> dict[str, Any]:
    """A native predict body for `spec`: the example inputs, MC mode, `num_samples`, seed 0."""
    inputs, _ = example_inputs(spec)
    return {"inputs": inputs, "mode": "mc", "num_samples": num_samples, "seed": 0}


def _recorded(spec: PackageSpec) -> dict[str, Any] | None:
    """The package's recorded `training.normalisation` (written by `dropwise train` since it exists)."""
    training = spec.manifest.get("training") or {}
    norm = training.get("normalisation") if isinstance(training, dict) else None
    return norm if isinstance(norm, dict) and norm and len(spec.inputs) <= 1 else None


def preprocess(spec: PackageSpec, inputs: Any) -> np.ndarray:
    """Raw inputs -> what the model takes, by the preprocessing recorded in the package's manifest.

    `training.normalisation` (see `dropwise.models.data.Dataset.normalisation`) is either `{scale, mean,
    std}`: `x = (raw / scale - mean) / std` (image pixels; diabetes' per-feature lists broadcast over the
    last axis), or `{low, high}`: the raw integers are the token ids (digits_tokens: pixel intensities
    0..16). Raises `InvalidInput` for a package that records no such numbers (send preprocessed inputs) or
    for raw values the recorded preprocessing cannot take.
    """
    norm = _recorded(spec)
    if norm is None or isinstance(inputs, dict):
        raise InvalidInput(
            f"model {spec.name!r} records no numeric preprocessing; send preprocessed inputs "
            f"(as GET /v1/models/{spec.name} describes) without 'preprocess'",
            field="preprocess",
        )
    try:
        raw = np.asarray(inputs, dtype=np.float64)
        if {"low", "high"} <= set(norm):
            low, high = int(norm["low"]), int(norm["high"])
            if not (np.all(raw == np.round(raw)) and np.all((raw >= low) & (raw < high))):
                raise ValueError(f"raw values must be integers in [{low}, {high})")
            return raw.astype(np.int64)
        scale = float(norm["scale"])
        mean = np.asarray(norm["mean"], dtype=np.float64)
        std = np.asarray(norm["std"], dtype=np.float64)
        return ((raw / scale - mean) / std).astype(np.float32)
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInput(f"model {spec.name!r}: cannot preprocess the raw inputs: {exc}", field="preprocess") from exc


__all__ = ["example_inputs", "example_request", "preprocess"]
