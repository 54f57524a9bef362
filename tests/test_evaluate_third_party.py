"""`dropwise evaluate` on a package converted from a third-party model: a plain PyTorch module outside
`dropwise.models`, trained here on digits, saved as a state_dict `.pt` and converted with `dropwise convert`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from dropwise.models.data import load_dataset
from dropwise.package import verify_package
from scipy.special import softmax

CLI = [sys.executable, "-m", "dropwise.cli"]

NETWORK = '''
from torch import nn


class DigitsNet(nn.Module):
    """A user's own classifier: PyTorch layers only, torch's own nn.Dropout."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(0.3), nn.Linear(hidden, 10))

    def forward(self, x):
        return self.body(x.flatten(1))


def build(hidden: int = 64) -> nn.Module:
    return DigitsNet(hidden)
'''


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_evaluate_runs_on_a_converted_third_party_module(tmp_path: Path) -> None:
    (tmp_path / "user_nets.py").write_text(NETWORK)
    sys.path.insert(0, str(tmp_path))
    try:
        import user_nets  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(tmp_path))
    torch.manual_seed(0)
    model = user_nets.build(hidden=64)
    x, y = load_dataset("digits").train
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(15):
        for i in range(0, len(x), 64):
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i : i + 64]), y[i : i + 64]).backward()
            optimiser.step()
    torch.save(model.state_dict(), tmp_path / "w.pt")

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    repo = tmp_path / "repo"
    _run(
        [
            "convert", "user_nets:build", "--weights", str(tmp_path / "w.pt"), "--kwargs", '{"hidden": 64}',
            "--allow-module", "user_nets", "--dataset", "digits", "--name", "user_digits", "-r", str(repo),
            "--no-progress",
        ],
        env,
    )  # fmt: skip
    package = repo / "user_digits" / "1"
    done = _run(["evaluate", str(package), "-T", "4", "-T", "8", "--allow-module", "user_nets", "--no-progress"], env)
    assert "OOD inverted" in done.stdout
    manifest = verify_package(package)
    report = json.loads((package / "evaluation.json").read_text())
    assert report["dataset"] == "digits" and report["deterministic"]["accuracy"] > 0.85
    assert report["mc"]["8"]["accuracy"] > 0.8
    t_det = manifest.model_dump()["calibration"]["deterministic"]["temperature"]
    # the converted graph answers calibrated logits: z / T of the trained network in eval mode
    x_test = load_dataset("digits").test[0][:32]
    with torch.no_grad():
        logits = model.eval()(x_test).numpy()
    session = ort.InferenceSession(str(package / "model.onnx"))
    (raw,) = session.run(None, {session.get_inputs()[0].name: x_test.numpy()})
    np.testing.assert_allclose(softmax(raw, axis=1), softmax(logits / t_det, axis=1), atol=1e-5)
