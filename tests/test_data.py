"""dropwise.models.data: package-shipped datasets, fixed seeded stratified splits, value ranges."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dropwise.models.data import DATASETS, SPLIT_SEED, _split_indices, load_dataset

SIZES = {"digits": 1797, "digits_tokens": 1797, "mnist": 5000, "diabetes": 442}


@pytest.mark.parametrize("name", DATASETS)
def test_splits_partition_the_data_and_are_recorded(name: str) -> None:
    ds = load_dataset(name)
    n = SIZES[name]
    sizes = [len(ds.train[0]), len(ds.val[0]), len(ds.test[0])]
    assert sum(sizes) == n
    assert [ds.split["train"], ds.split["val"], ds.split["test"]] == sizes
    assert ds.split["seed"] == SPLIT_SEED
    assert abs(sizes[2] - 0.2 * n) <= 1 and abs(sizes[1] - 0.15 * n) <= 1
    for x, y in (ds.train, ds.val, ds.test):
        assert len(x) == len(y)
        assert tuple(x.shape[1:]) == ds.input_shape
        assert str(x.dtype).removeprefix("torch.") == ds.input_dtype


def test_split_indices_are_disjoint_seeded_and_stratified() -> None:
    strata = np.repeat(np.arange(10), 50)
    train, val, test = _split_indices(len(strata), strata)
    assert not (set(train) & set(val)) and not (set(train) & set(test)) and not (set(val) & set(test))
    assert sorted([*train, *val, *test]) == list(range(500))
    again = _split_indices(len(strata), strata)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again, strict=True))
    other = _split_indices(len(strata), strata, seed=SPLIT_SEED + 7)
    assert not np.array_equal(test, other[2])
    for part, size in ((train, 325), (val, 75), (test, 100)):
        counts = np.bincount(strata[part], minlength=10)
        assert counts.max() - counts.min() <= 1, counts
        assert counts.sum() == size


def test_split_rows_do_not_overlap_in_digits() -> None:
    """Rows of the splits are disjoint by index; duplicated images aside, no test row is a train row."""
    ds = load_dataset("digits_tokens")
    train = {tuple(r.tolist()) for r in ds.train[0]}
    shared = sum(tuple(r.tolist()) in train for r in ds.test[0])
    assert shared == 0


def test_splits_are_fixed_across_releases() -> None:
    """Pinned: a change here silently changes every reported test metric."""
    assert load_dataset("digits").split["indices_sha256"].startswith("26d4eed4b164")
    assert load_dataset("mnist").split["indices_sha256"].startswith("fa9d16458291")
    assert load_dataset("diabetes").split["indices_sha256"].startswith("fced2c2087ba")


@pytest.mark.parametrize("name", ["digits", "mnist", "digits_tokens"])
def test_classification_splits_are_stratified(name: str) -> None:
    ds = load_dataset(name)
    assert ds.labels == [str(i) for i in range(10)] and ds.num_classes == 10
    for _, y in (ds.train, ds.val, ds.test):
        assert y.dtype == torch.int64
        counts = torch.bincount(y, minlength=10).float()
        assert float(counts.max() - counts.min()) <= 0.03 * len(y) + 2


def test_digits_are_standardised_pixels() -> None:
    ds = load_dataset("digits")
    x = ds.train[0]
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    raw = torch.cat([ds.train[0], ds.val[0], ds.test[0]]) * ds.normalisation["std"] + ds.normalisation["mean"]
    pixels = raw * 16
    assert float(pixels.min()) > -1e-4 and float(pixels.max()) < 16 + 1e-4
    assert torch.allclose(pixels, pixels.round(), atol=1e-4)


def test_digit_tokens_are_pixel_intensities() -> None:
    ds = load_dataset("digits_tokens")
    tokens = ds.train[0]
    assert tokens.dtype == torch.int64 and int(tokens.min()) == 0 and int(tokens.max()) == 16
    floats = load_dataset("digits")
    back = (floats.train[0] * floats.normalisation["std"] + floats.normalisation["mean"]) * 16
    assert torch.equal(back.round().long(), tokens)
    assert torch.equal(floats.train[1], ds.train[1])


def test_mnist_is_standardised_images() -> None:
    ds = load_dataset("mnist")
    x = ds.train[0]
    assert x.shape[1:] == (1, 28, 28) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    unit = ds.test[0] * ds.normalisation["std"] + ds.normalisation["mean"]
    assert float(unit.min()) > -1e-5 and float(unit.max()) < 1 + 1e-5
    assert torch.bincount(torch.cat([ds.train[1], ds.val[1], ds.test[1]])).tolist() == [500] * 10


def test_diabetes_target_is_standardised_with_recorded_statistics() -> None:
    from sklearn.datasets import load_diabetes

    ds = load_dataset("diabetes")
    assert ds.task == "regression" and ds.labels is None and ds.num_classes is None
    y = ds.train[1]
    assert y.shape == (ds.split["train"], 1) and y.dtype == torch.float32
    assert abs(float(y.mean())) < 1e-5 and abs(float(y.std(unbiased=False)) - 1) < 1e-4
    target = load_diabetes(scaled=False).target
    standardised = torch.cat([ds.train[1], ds.val[1], ds.test[1]]).squeeze(1).double()
    restored = standardised * ds.target["std"] + ds.target["mean"]
    assert sorted(np.round(restored.numpy())) == sorted(np.round(target))
    assert abs(float(ds.train[0].mean(0).abs().max())) < 1e-5


def test_unknown_dataset_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("cifar10")
