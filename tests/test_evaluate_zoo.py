"""`evaluate_package` on every zoo package (quick-trained), and the OOD sets built for each kind of input.

The quick packages' metrics are meaningless; what is checked is that every network (images, tokens,
regression; dropout, DropConnect, DropPath, FractalJoin, embedding dropout) evaluates end to end, that the
report has the sets and figures its data kind calls for, and that writing it keeps the package verifiable.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dropwise.models.data import load_dataset
from dropwise.models.zoo import ZOO
from dropwise.package import verify_package
from dropwise.surgery.evaluate import SCORES, evaluate_package, write_evaluation
from dropwise.surgery.evaluate_data import REGRESSION_OOD_DEFINITION, ood_sets, regression_ood_sets

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = 40
TS = (2, 4)
OOD_SETS = {
    "digits": {"gaussian_noise", "inverted", "mnist_resized"},
    "mnist": {"gaussian_noise", "inverted", "digits_resized"},
    "digits_tokens": {"uniform_tokens", "position_marginal_tokens", "shuffled_positions", "mnist_resized"},
    "diabetes": {"one_feature_beyond_range", "wide_gaussian"},
}


def _auroc_block(block: dict[str, float]) -> None:
    assert 0.0 <= block["auroc"] <= 1.0 and 0.0 <= block["fpr_at_95_tpr"] <= 1.0, block


def _check_classification(report: dict[str, Any], dataset: str) -> None:
    for block in (report["deterministic"], *report["mc"].values()):
        assert 0.0 <= block["accuracy"] <= 1.0 and block["nll"] > 0 and 0.0 <= block["ece"] <= 1.0
        assert sum(block["reliability"]["count"]) == ROWS
    assert report["calibration"]["deterministic"]["temperature"] > 0
    for entry in report["ood"].values():
        assert entry["rows"] == ROWS
        assert set(entry["mc"]) == {str(t) for t in TS}
        for by_score in entry["mc"].values():
            assert set(by_score) == set(SCORES)
            for block in by_score.values():
                _auroc_block(block)
        pred = entry["predictions"]
        assert 0 <= pred["top_class"] < 10 and 0.1 <= pred["top_class_share"] <= 1.0
        assert 0.1 <= pred["mc_mean_max_probability"] <= 1.0
    assert report["abstention"]["score"] in SCORES and 0.0 <= report["abstention"]["test_kept"] <= 1.0
    assert set(report["abstention"]["test_ood_abstained"]) == OOD_SETS[dataset]


def _check_regression(report: dict[str, Any]) -> None:
    assert report["ood_definition"] == REGRESSION_OOD_DEFINITION
    for entry in report["ood"].values():
        for by_t in entry["mc"].values():
            _auroc_block(by_t["std"])
    mc = report["mc"][str(TS[-1])]
    assert mc["rmse"] > 0 and math.isfinite(mc["nll"])
    assert mc["coverage"]["0.5"] <= mc["coverage"]["0.9"] <= mc["coverage"]["0.95"]
    assert set(report["summary"]["ood_auroc"]) == OOD_SETS["diabetes"]


@pytest.mark.parametrize("name", list(ZOO))
def test_every_zoo_package_evaluates_and_writes_its_report(name: str, quick_repository: Path, tmp_path: Path) -> None:
    spec = ZOO[name]
    package = tmp_path / name / "1"
    shutil.copytree(quick_repository / name / "1", package)  # writing bakes temperatures: keep the fixture intact
    result = evaluate_package(package, num_samples=TS, max_rows=ROWS, progress=False)
    report = result.report
    assert report["model"] == name and report["dataset"] == spec.dataset
    assert report["rows"] == {"validation": ROWS, "test": ROWS} and report["num_samples"] == list(TS)
    assert report["seconds"]["wall"] > 0 and report["seconds"]["cpu"] > 0
    assert set(report["ood"]) == OOD_SETS[spec.dataset]
    if spec.task == "classification":
        _check_classification(report, spec.dataset)
        assert set(result.plots) == {
            "evaluation_reliability.png",
            "evaluation_risk_coverage.png",
            "evaluation_convergence.png",
        }
    else:
        _check_regression(report)
        assert result.plots == {}

    names = write_evaluation(package, result)
    manifest = verify_package(package)  # every written and rewritten file is checksummed
    for file in names:
        assert file in manifest.files
    for file in result.plots:
        assert (package / file).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stored = json.loads((package / "evaluation.json").read_text())
    assert stored["summary"]["task"] == spec.task and set(stored["ood"]) == OOD_SETS[spec.dataset]
    summary = manifest.model_dump()["evaluation"]
    assert summary["files"] == names[: len(result.plots) + 1]
    assert set(summary["ood_auroc"]) == OOD_SETS[spec.dataset]
    if spec.task == "classification":
        assert manifest.model_dump()["abstention"]["score"] == report["abstention"]["score"]


def test_token_ood_sets_keep_the_vocabulary_and_break_the_structure() -> None:
    x = load_dataset("digits_tokens").test[0].numpy()
    sets = ood_sets("digits_tokens", x, "test", seed=0)
    assert set(sets) == OOD_SETS["digits_tokens"]
    for name, v in sets.items():
        assert v.dtype == x.dtype and v.shape[1:] == x.shape[1:] and v.min() >= 0 and v.max() <= 16, name
    n = len(sets["shuffled_positions"])
    # shuffled positions: the same tokens as the test rows, in another order
    np.testing.assert_array_equal(np.sort(sets["shuffled_positions"], axis=1), np.sort(x[:n], axis=1))
    assert (sets["shuffled_positions"] != x[:n]).any(axis=1).mean() > 0.95
    # position marginals: every token at position j occurs at position j in the data
    for j in range(x.shape[1]):
        assert set(sets["position_marginal_tokens"][:, j]) <= set(x[:, j])
    # uniform tokens use the whole vocabulary, unlike digits (mostly background 0)
    assert len(np.unique(sets["uniform_tokens"])) == 17
    assert (sets["uniform_tokens"] == 0).mean() < 0.1 < (x == 0).mean()
    assert not {"inverted", "gaussian_noise"} & set(sets)


def test_regression_ood_sets_lie_outside_the_data_range() -> None:
    ds = load_dataset("diabetes")
    x_val, x_test = ds.val[0].numpy(), ds.test[0].numpy()
    ref = np.concatenate([x_val, x_test])
    sets = regression_ood_sets(ref, x_test, seed=0)
    low, high, std = ref.min(0), ref.max(0), ref.std(0)
    moved = sets["one_feature_beyond_range"]
    changed = moved != x_test
    assert (changed.sum(axis=1) == 1).all()  # exactly one feature per row, the others untouched
    beyond = np.maximum(low - moved, moved - high) / std  # > 0 outside the range, in standard deviations
    assert (beyond[changed] >= 1.0 - 1e-5).all() and (beyond[changed] <= 3.0 + 1e-5).all()
    wide = sets["wide_gaussian"]
    assert wide.shape == (len(x_test), x_test.shape[1])
    assert ((wide < low) | (wide > high)).any(axis=1).mean() > 0.8  # most rows leave the range somewhere


@pytest.mark.parametrize("name", ["embedding_digits_tokens", "mlp_diabetes"])
def test_a_user_ood_file_is_one_more_set(name: str, quick_repository: Path, tmp_path: Path) -> None:
    x = load_dataset(ZOO[name].dataset).test[0].numpy()
    user = tmp_path / "user.npz"
    np.savez(user, x=x[::-1].copy() if x.dtype.kind in "iu" else x * 5.0)
    report = evaluate_package(
        quick_repository / name / "1", ood=user, num_samples=TS, max_rows=ROWS, progress=False, plots=False
    ).report
    assert set(report["ood"]) == OOD_SETS[ZOO[name].dataset] | {"user"}
    assert report["ood"]["user"]["rows"] == ROWS
