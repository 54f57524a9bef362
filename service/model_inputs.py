"""A batch of model inputs as the service carries it: one array, or a tuple of arrays for named inputs.

Most models take one tensor (``np.ndarray`` [B, ...]); a text classifier takes several named ones
(``input_ids``, ``attention_mask``), carried as a tuple in the manifest's order, all with the same B rows.
The batcher concatenates requests and the runtimes slice them back through these helpers, so one-input
models keep their plain arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from dropwise.service.runtimes.base import PackageSpec

ModelInputs = np.ndarray | tuple[np.ndarray, ...]

__all__ = ["ModelInputs", "as_tuple", "batch_rows", "concat_rows", "example_inputs", "take_rows"]


def as_tuple(x: ModelInputs) -> tuple[np.ndarray, ...]:
    """The arrays of ``x`` in input order."""
    return x if isinstance(x, tuple) else (x,)


def batch_rows(x: ModelInputs) -> int:
    """The batch size B (rows of the first input)."""
    return int(as_tuple(x)[0].shape[0])


def take_rows(x: ModelInputs, start: int, stop: int) -> ModelInputs:
    """Rows ``start:stop`` of every input."""
    if isinstance(x, tuple):
        return tuple(a[start:stop] for a in x)
    return x[start:stop]


def concat_rows(parts: Sequence[ModelInputs]) -> ModelInputs:
    """Several requests' inputs stacked along the batch dimension (input by input)."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], tuple):
        return tuple(np.concatenate([as_tuple(p)[i] for p in parts], axis=0) for i in range(len(parts[0])))
    return np.concatenate(parts, axis=0)


def example_inputs(spec: PackageSpec, rows: int) -> ModelInputs:
    """A warm-up batch for ``spec``: zeros of each input's shape and dtype (the lowest value of an integer
    input's range), one array for a one-input model, a tuple otherwise."""
    if len(spec.inputs) <= 1:
        low = spec.input_range[0] if spec.input_range else 0
        return np.full((rows, *(max(d, 1) for d in spec.sample_shape)), low, dtype=spec.input_dtype)
    return tuple(
        np.full((rows, *(max(d, 1) for d in s.shape[1:])), s.range[0] if s.range else 0, dtype=s.dtype)
        for s in spec.inputs
    )
