"""`dropwise evaluate` on quick-trained packages, and the metrics it reports against known answers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dropwise.package import verify_package
from dropwise.surgery import evaluate_metrics as m
from dropwise.surgery.evaluate import SCORES, evaluate_package
from scipy.special import softmax

CLI = [sys.executable, "-m", "dropwise.cli"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("evaluate_repo")
    done = subprocess.run(
        [*CLI, "train", "mlp_digits", "mlp_diabetes", "--quick", "--no-export", "--no-progress", "-r", str(root)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return root


def test_cli_writes_the_report_plots_and_summary_into_the_package(repo: Path) -> None:
    package = repo / "mlp_digits" / "1"
    done = subprocess.run(
        [*CLI, "evaluate", str(package), "-T", "4", "-T", "8", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "abstain when" in done.stdout and "OOD inverted" in done.stdout
    manifest = verify_package(package)  # every new file is checksummed
    for name in ("evaluation.json", "evaluation_reliability.png", "evaluation_risk_coverage.png"):
        assert name in manifest.files
        assert (package / name).read_bytes()[:4] in (b"\x89PNG", b"{\n  ")
    report = json.loads((package / "evaluation.json").read_text())
    assert report["num_samples"] == [4, 8]
    assert set(report["ood"]) == {"gaussian_noise", "inverted", "mnist_resized"}
    for block in (report["deterministic"], report["mc"]["8"]):
        assert 0 <= block["accuracy"] <= 1 and block["nll"] > 0 and 0 <= block["ece"] <= 1
    cal = report["calibration"]
    # temperature scaling never raises the validation-fitted NLL much on the test split of the same data
    assert cal["after"]["deterministic"]["nll"] <= cal["before"]["deterministic"]["nll"] + 0.05
    assert cal["mc"]["method"] in ("per_sample_logits", "log_mean")
    extra = manifest.model_dump()
    assert extra["evaluation"]["abstention"]["score"] in SCORES
    assert extra["abstention"]["target_keep"] == 0.95 and extra["calibration"]["deterministic"]["temperature"] > 0

    from dropwise.service.app import create_app
    from dropwise.service.settings import Settings
    from fastapi.testclient import TestClient

    with TestClient(create_app(Settings(repository=repo, device="cpu"))) as client:
        info = client.get("/v1/models/mlp_digits").json()
        assert info["evaluation"]["num_samples"] == 8
        assert info["evaluation"]["abstention"] == extra["abstention"]
        assert client.get("/v1/models/mlp_diabetes").json()["evaluation"] is None
        # acting on uncertainty: the stored rule ("auto") or a threshold, per row, both APIs
        rng = np.random.default_rng(3)
        x = np.concatenate([rng.normal(size=(3, 64)), np.zeros((1, 64))]).astype(np.float32).tolist()
        body = {"inputs": x, "mode": "mc", "num_samples": 8, "seed": 1}
        auto = client.post("/v1/models/mlp_digits/predict", json={**body, "abstain": "auto"}).json()
        rule = extra["abstention"]
        score = auto["uncertainty"][rule["score"]] if rule["score"] != "max_probability" else None
        if score is not None:
            assert auto["abstain"] == [v > rule["threshold"] for v in score]
        assert len(auto["abstain"]) == 4
        every = client.post("/v1/models/mlp_digits/predict", json={**body, "abstain": -1.0}).json()
        assert every["abstain"] == [True] * 4
        assert (
            client.post("/v1/models/mlp_digits/predict", json={**body, "abstain": 1e9}).json()["abstain"] == [False] * 4
        )
        assert "abstain" not in client.post("/v1/models/mlp_digits/predict", json=body).json()
        for bad in ({"inputs": x, "abstain": "auto"}, {**body, "abstain": "sometimes"}):
            r = client.post("/v1/models/mlp_digits/predict", json=bad)
            assert r.status_code in (400, 422) and r.json()["error"]["field"].startswith("abstain"), r.text
        r = client.post("/v1/models/mlp_diabetes/predict", json={"inputs": [[0.0] * 10], "mode": "mc", "abstain": 1})
        assert r.status_code == 400 and r.json()["error"]["field"] == "abstain"
        v2 = {
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [4, 64], "data": np.ravel(x).tolist()}],
            "parameters": {"mode": "mc", "num_samples": 8, "seed": 1, "abstain": "auto"},
        }
        answer = client.post("/v2/models/mlp_digits/infer", json=v2).json()
        (flags,) = [o for o in answer["outputs"] if o["name"] == "abstain"]
        assert flags["datatype"] == "BOOL" and flags["data"] == auto["abstain"]


def test_regression_reports_rmse_nll_and_interval_coverage(repo: Path) -> None:
    result = evaluate_package(repo / "mlp_diabetes", num_samples=(4, 16), progress=False, plots=False)
    mc = result.report["mc"]["16"]
    assert set(mc["coverage"]) == {"0.5", "0.9", "0.95"}
    assert mc["coverage"]["0.5"] <= mc["coverage"]["0.9"] <= mc["coverage"]["0.95"]
    assert mc["rmse"] > 1.0  # target units (diabetes progression score), not standardised
    assert result.summary()["task"] == "regression"


def test_bad_data_file_is_one_line_and_exit_2(repo: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((30, 64), dtype=np.float32))
    done = subprocess.run(
        [*CLI, "evaluate", str(repo / "mlp_digits"), "--data", str(bad), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "needs arrays 'x' and 'y'" in done.stderr
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((30, 10), dtype=np.float32))  # digits inputs have 64 features
    done = subprocess.run(
        [*CLI, "evaluate", str(repo / "mlp_digits"), "--ood", str(wrong), "--no-progress", "--no-write"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "[N, 64]" in done.stderr, done.stderr


def test_metrics_against_known_answers() -> None:
    rng = np.random.default_rng(0)
    # a calibrated predictor: labels drawn from its own probabilities -> ECE near 0
    logits = rng.normal(size=(20000, 4)) * 2
    probs = softmax(logits, axis=1)
    y = np.array([rng.choice(4, p=p) for p in probs])
    assert m.ece(probs, y) < 0.02
    # the same logits sharpened by 1/3: temperature scaling recovers tau ~ 3
    tau = m.fit_temperature(lambda t: m.tempered_softmax(logits * 3, t), y)
    assert abs(tau - 3.0) < 0.2
    onehot = np.eye(4)[y]
    assert m.brier(onehot, y) == 0.0 and m.nll(onehot, y) < 1e-9
    # perfect separation and its reverse
    assert m.ood_scores(np.zeros(50), np.ones(50)) == {"auroc": 1.0, "fpr_at_95_tpr": 0.0}
    assert m.ood_scores(np.ones(50), np.zeros(50))["fpr_at_95_tpr"] == 1.0
    # abstaining on the wrong answers first gives accuracy 1 until coverage reaches the accuracy
    correct = np.array([True] * 8 + [False] * 2)
    curve = m.risk_coverage(np.array([0.0] * 8 + [1.0] * 2), correct, points=10)
    assert curve["accuracy"][:8] == [1.0] * 8 and curve["accuracy"][-1] == 0.8
    assert curve["aurc"] == pytest.approx(np.mean([0] * 8 + [1 / 9, 2 / 10]))
    assert m.gaussian_interval_coverage(np.zeros(100000), np.ones(100000), rng.normal(size=100000), 0.9) == (
        pytest.approx(0.9, abs=0.01)
    )
