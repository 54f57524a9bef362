"""The output table (`dropwise.surgery.outputs`) is what every producer of outputs follows."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from dropwise.service.runtimes.base import PackageSpec, encode_deterministic, encode_mc, summarise_samples
from dropwise.surgery import outputs
from dropwise.surgery.mc_export import output_names as graph_output_names
from dropwise.surgery.summaries import (
    CLASSIFICATION_OUTPUTS,
    REGRESSION_OUTPUTS,
    ClassificationSummaries,
    RegressionSummaries,
)


def _spec(task: str) -> PackageSpec:
    return PackageSpec(
        name="m",
        version=1,
        path=Path("."),
        task=task,  # type: ignore[arg-type]
        input_name="input",
        input_shape=(-1, 4),
        input_dtype="float32",
        target_mean=10.0 if task == "regression" else 0.0,
        target_std=2.0 if task == "regression" else 1.0,
    )


def test_summaries_follow_the_table_in_order() -> None:
    assert outputs.summary_names("classification") == CLASSIFICATION_OUTPUTS
    assert outputs.summary_names("regression") == REGRESSION_OUTPUTS
    assert [f.name for f in dataclasses.fields(ClassificationSummaries)] == list(CLASSIFICATION_OUTPUTS)
    assert [f.name for f in dataclasses.fields(RegressionSummaries)] == list(REGRESSION_OUTPUTS)
    assert graph_output_names("classification", True) == [
        *CLASSIFICATION_OUTPUTS,
        "samples",
        "sample_logits",
        "seed_used",
    ]
    assert graph_output_names("regression", False) == ["mean", "std", "seed_used"]


def test_output_names_per_task_and_mode() -> None:
    assert outputs.output_names("classification", "deterministic", True) == ["probabilities", "predictions"]
    assert outputs.output_names("classification", "mc") == [
        "probabilities",
        "predictions",
        "predictive_entropy",
        "expected_entropy",
        "mutual_information",
        "variation_ratio",
        "std",
    ]
    assert outputs.output_names("regression", "mc", True) == ["mean", "std", "samples"]
    assert outputs.output_shape("samples", "classification", 10) == [-1, -1, 10]
    assert outputs.output_shape("predictions", "classification", 10) == [-1]
    assert outputs.output_shape("std", "regression") == [-1, -1]
    with pytest.raises(KeyError):
        outputs.spec("mean_probs")  # legacy names are not outputs


@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("return_samples", [False, True])
def test_the_mc_encoder_answers_exactly_the_table(task: str, return_samples: bool) -> None:
    torch.manual_seed(0)
    raw = torch.randn(6, 3, 4)
    out = encode_mc(summarise_samples(raw, task), _spec(task), return_samples)
    assert list(out) == outputs.output_names(task, "mc", return_samples)
    for name, value in out.items():
        spec = outputs.spec(name)
        assert value.dtype == np.dtype(spec.dtype), name
        assert value.ndim == len(spec.shape), name
    if return_samples:
        if task == "classification":  # per-sample probabilities, not logits
            np.testing.assert_allclose(out["samples"], torch.softmax(raw, -1).numpy(), atol=1e-6)
            np.testing.assert_allclose(out["samples"].mean(0), out["probabilities"], atol=1e-6)
        else:  # target units
            np.testing.assert_allclose(out["samples"], 10.0 + 2.0 * raw.numpy(), rtol=1e-6)
            np.testing.assert_allclose(out["std"], 2.0 * raw.std(0, unbiased=False).numpy(), rtol=1e-5)


def test_the_mc_encoder_reads_graphs_with_legacy_names() -> None:
    torch.manual_seed(1)
    logits = torch.randn(5, 2, 3)
    current = summarise_samples(logits, "classification")
    legacy = {("mean_probs" if k == "probabilities" else k): v for k, v in current.items() if k != "sample_logits"}
    legacy["sample_outputs"] = logits.numpy()  # old graphs answered per-sample LOGITS under this name
    got = encode_mc(legacy, _spec("classification"), True)
    want = encode_mc(current, _spec("classification"), True)
    assert list(got) == list(want)
    for name in got:
        np.testing.assert_allclose(got[name], want[name], atol=1e-6)


def test_deterministic_encoder_answers_the_table() -> None:
    out = encode_deterministic(np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32), _spec("classification"))
    assert list(out) == outputs.output_names("classification", "deterministic")
    assert out["predictions"].dtype == np.int64
