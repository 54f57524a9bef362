"""MC summaries (docs/DESIGN.md §3): values against a float64 reference, edge cases, ONNX export."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from dropwise.surgery.summaries import (
    CLASSIFICATION_OUTPUTS,
    SummaryHead,
    classification_summaries,
    regression_summaries,
)


def _reference(logits: np.ndarray) -> dict[str, np.ndarray]:
    """Straightforward float64 formulas (probabilities, not log space)."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)  # [T, B, K]
    p_bar = p.mean(axis=0)
    h = -(p_bar * np.log(p_bar)).sum(-1)
    e = (-(p * np.log(p)).sum(-1)).mean(0)
    votes = p.argmax(-1)  # [T, B]
    k = p.shape[-1]
    mode = np.stack([(votes == c).sum(0) for c in range(k)], -1).max(-1)
    return {
        "probabilities": p_bar,
        "predictive_entropy": h,
        "expected_entropy": e,
        "mutual_information": h - e,
        "variation_ratio": 1 - mode / p.shape[0],
        "std": p.std(axis=0),
    }


def test_classification_matches_float64_reference() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=2.0, size=(17, 6, 5)).astype(np.float32)
    got = classification_summaries(torch.from_numpy(logits))
    want = _reference(logits)
    for name in CLASSIFICATION_OUTPUTS:
        np.testing.assert_allclose(getattr(got, name).numpy(), want[name], rtol=1e-4, atol=1e-5, err_msg=name)
    assert got.probabilities.shape == (6, 5)
    assert got.predictive_entropy.shape == (6,)


def test_known_values_disagreeing_samples() -> None:
    # two confident samples voting for different classes: H ~ log 2, E ~ 0, MI ~ log 2, variation ratio 1/2
    logits = torch.tensor([[[30.0, 0.0]], [[0.0, 30.0]]])
    s = classification_summaries(logits)
    assert s.predictive_entropy.item() == pytest.approx(math.log(2), abs=1e-6)
    assert s.expected_entropy.item() == pytest.approx(0.0, abs=1e-6)
    assert s.mutual_information.item() == pytest.approx(math.log(2), abs=1e-6)
    assert s.variation_ratio.item() == pytest.approx(0.5)
    assert s.std[0].tolist() == pytest.approx([0.5, 0.5], abs=1e-6)


def test_extreme_logits_never_nan_and_mi_nonnegative() -> None:
    logits = torch.tensor(
        [
            [[1e4, -1e4, 0.0], [0.0, 0.0, 0.0], [-3e38, 3e38, 1.0]],
            [[1e4, -1e4, 0.0], [1e-30, 0.0, 0.0], [-3e38, 3e38, 1.0]],
        ]
    )
    s = classification_summaries(logits)
    for name in CLASSIFICATION_OUTPUTS:
        value = getattr(s, name)
        assert torch.isfinite(value).all(), name
    assert (s.mutual_information >= 0).all()
    torch.testing.assert_close(s.probabilities.sum(-1), torch.ones(3))


def test_identical_samples_give_zero_epistemic_terms() -> None:
    torch.manual_seed(0)
    logits = (torch.randn(1, 40, 7) * 3).expand(9, 40, 7)
    s = classification_summaries(logits)
    mi = s.mutual_information
    assert (mi >= 0).all() and mi.max() < 1e-6  # clamped: never a tiny negative, only rounding above 0
    assert torch.equal(s.variation_ratio, torch.zeros(40))
    assert s.std.abs().max() < 1e-6
    single = classification_summaries(torch.randn(1, 4, 7))
    assert torch.equal(single.std, torch.zeros(4, 7))


def test_half_precision_logits_are_upcast() -> None:
    s = classification_summaries(torch.randn(5, 2, 3).half())
    assert s.probabilities.dtype == torch.float32


def test_regression_mean_and_population_std() -> None:
    y = torch.randn(11, 3, 2, dtype=torch.float64)
    r = regression_summaries(y)
    torch.testing.assert_close(r.mean, y.mean(0))
    torch.testing.assert_close(r.std, y.std(0, correction=0))


def test_wrong_rank_is_refused() -> None:
    with pytest.raises(ValueError):
        classification_summaries(torch.randn(4, 3))
    with pytest.raises(ValueError):
        regression_summaries(torch.randn(4))


def test_summary_head_exports_with_dynamic_samples_and_batch(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "summaries.onnx"
    dims = {"samples": {0: torch.export.Dim("T", min=1), 1: torch.export.Dim("B", min=1)}}
    torch.onnx.export(
        SummaryHead("classification").eval(),
        (torch.randn(4, 3, 5),),
        str(path),
        input_names=["samples"],
        output_names=list(CLASSIFICATION_OUTPUTS),
        dynamic_shapes=dims,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for t, b in ((1, 1), (7, 2), (33, 6)):
        logits = torch.randn(t, b, 5) * 3
        got = session.run(None, {"samples": logits.numpy()})
        want = classification_summaries(logits).as_tuple()
        for name, g, w in zip(CLASSIFICATION_OUTPUTS, got, want, strict=True):
            np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-6, err_msg=f"{name} T={t} B={b}")
