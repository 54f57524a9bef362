"""The temperatures `dropwise evaluate` stores are applied: torch runtime, ONNX Runtime runtime and both graphs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from dropwise.models.data import load_dataset
from dropwise.package import verify_package
from dropwise.service.repository import spec_from_manifest
from dropwise.service.runtimes.base import MCGroup
from dropwise.service.runtimes.onnx_runtime import OnnxRuntime
from dropwise.service.runtimes.torch_runtime import TorchRuntime
from dropwise.surgery.calibration import TEMPERATURE_KEY, calibrate_mean
from dropwise.surgery.sources import resolve_source
from scipy.special import softmax

CLI = [sys.executable, "-m", "dropwise.cli"]
GROUP = [MCGroup(rows=16, num_samples=8, seed=5)]


def _run(*args: str) -> None:
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr


def _runtimes(package: Path) -> tuple[TorchRuntime, OnnxRuntime]:
    spec = spec_from_manifest(verify_package(package), package)
    torch_rt, onnx_rt = TorchRuntime(spec, device="cpu"), OnnxRuntime(spec, device="cpu")
    torch_rt.load()
    onnx_rt.load()
    return torch_rt, onnx_rt


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("calibrated_repo")
    _run("train", "mlp_digits", "--quick", "--no-progress", "-r", str(root))
    return root / "mlp_digits" / "1"


def test_evaluate_calibrates_both_runtimes_and_both_graphs(package: Path) -> None:
    x = load_dataset("digits").test[0][:16].numpy()
    torch_rt, onnx_rt = _runtimes(package)  # uncalibrated: the answers of before
    before = {rt.backend: (rt.predict_deterministic(x), rt.predict_mc(x, GROUP)[0]) for rt in (torch_rt, onnx_rt)}
    assert not torch_rt.spec.calibrated

    _run("evaluate", str(package), "-T", "4", "-T", "8", "--no-progress")
    manifest = verify_package(package)  # the rewritten graphs are checksummed
    cal = manifest.model_dump()["calibration"]
    t_det, t_mc = cal["deterministic"]["temperature"], cal["mc"]["temperature"]
    assert cal["mc"]["method"] == "log_mean" and abs(t_det - 1.0) > 1e-3 and abs(t_mc - 1.0) > 1e-3
    for name, t in (("model.onnx", t_det), ("model.mc.onnx", t_mc)):  # served elsewhere, still calibrated
        meta = ort.InferenceSession(str(package / name)).get_modelmeta().custom_metadata_map
        assert float(meta[TEMPERATURE_KEY]) == pytest.approx(t)

    torch_rt, onnx_rt = _runtimes(package)
    assert torch_rt.spec.calibrated
    # deterministic: softmax(z / T) by hand from the eval-mode network, the same from both runtimes
    with torch.no_grad():
        logits = resolve_source(str(package)).base.eval()(torch.from_numpy(x)).numpy()
    by_hand = softmax(logits / t_det, axis=1)
    for rt in (torch_rt, onnx_rt):
        det = rt.predict_deterministic(x)
        np.testing.assert_allclose(det["probabilities"], by_hand, atol=1e-5)
        np.testing.assert_array_equal(det["predictions"], before[rt.backend][0]["predictions"])
    # the raw graph's output is the calibrated logits z / T
    session = ort.InferenceSession(str(package / "model.onnx"))
    (raw,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(raw, logits / t_det, atol=1e-4)

    # MC, seeded: softmax(log p_bar / T) of the uncalibrated mean; scores unchanged; both runtimes agree
    mc = {rt.backend: rt.predict_mc(x, GROUP)[0] for rt in (torch_rt, onnx_rt)}
    for backend, out in mc.items():
        old = before[backend][1]
        p_bar = old["probabilities"]
        expected = softmax(np.log(np.maximum(p_bar.astype(np.float64), 1e-30)) / t_mc, axis=1)
        np.testing.assert_allclose(out["probabilities"], expected, atol=1e-5)
        np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, atol=1e-5)
        for name in ("predictive_entropy", "mutual_information", "expected_entropy", "variation_ratio"):
            np.testing.assert_allclose(out[name], old[name], atol=1e-6)
        np.testing.assert_array_equal(out["predictions"], old["predictions"])
    np.testing.assert_allclose(mc["torch"]["probabilities"], mc["onnxruntime"]["probabilities"], atol=1e-4)
    # calibrating sharpens an underconfident MC mean (T < 1) or flattens an overconfident one (T > 1)
    old_max = before["torch"][1]["probabilities"].max(axis=1).mean()
    new_max = mc["torch"]["probabilities"].max(axis=1).mean()
    assert (new_max > old_max) == (t_mc < 1.0)

    # evaluating again replaces the baked temperature instead of stacking a second one
    _run("evaluate", str(package), "-T", "4", "-T", "6", "--no-progress", "--seed", "1")
    t2 = verify_package(package).model_dump()["calibration"]["deterministic"]["temperature"]
    session = ort.InferenceSession(str(package / "model.onnx"))
    (raw,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(raw, logits / t2, atol=1e-4)


def test_calibrate_mean_is_identity_at_t_one_and_a_distribution() -> None:
    p = np.array([[0.7, 0.2, 0.1, 0.0]], dtype=np.float32)
    assert calibrate_mean(p, 1.0) is p
    sharp = calibrate_mean(p, 0.5)
    np.testing.assert_allclose(sharp, [[0.49 / 0.54, 0.04 / 0.54, 0.01 / 0.54, 0.0]], atol=1e-6)
