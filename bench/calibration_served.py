"""Served answers before / after `dropwise evaluate`: NLL and ECE of what both runtimes return on the test split.

Usage: ``python -m bench.calibration_served PACKAGE`` (a digits package, e.g. one trained with ``dropwise train
mlp_digits``). Runs the torch and the ONNX Runtime runtimes on the CPU over the digits test split: the
deterministic ``probabilities`` and the MC ``probabilities`` at T = 32 (seeded per chunk of 64 rows). Run it
once before and once after ``dropwise evaluate PACKAGE`` to see the stored temperatures applied (the ONNX
runtime reads them from the graphs, the torch runtime from the manifest). Not a test: it asserts nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from dropwise.models.data import load_dataset
from dropwise.package import verify_package
from dropwise.service.repository import spec_from_manifest
from dropwise.service.runtimes.base import MCGroup
from dropwise.service.runtimes.onnx_runtime import OnnxRuntime
from dropwise.service.runtimes.torch_runtime import TorchRuntime
from dropwise.surgery import evaluate_metrics as m

CHUNK = 64


def main(package: Path) -> None:
    """Print one line per runtime: deterministic and MC (T = 32) NLL / ECE, MC accuracy."""
    x, y = (t.numpy() for t in load_dataset("digits").test)
    y = y.astype(np.int64)
    spec = spec_from_manifest(verify_package(package), package)
    for cls in (TorchRuntime, OnnxRuntime):
        runtime = cls(spec, device="cpu")
        runtime.load()
        det = runtime.predict_deterministic(x)["probabilities"]
        mc = np.concatenate(
            [
                runtime.predict_mc(x[i : i + CHUNK], [MCGroup(len(x[i : i + CHUNK]), 32, 7 + i)])[0]["probabilities"]
                for i in range(0, len(x), CHUNK)
            ]
        )
        print(
            f"{runtime.backend:12s} calibrated={spec.calibrated} deterministic NLL {m.nll(det, y):.4f} "
            f"ECE {m.ece(det, y):.4f} | MC T=32 NLL {m.nll(mc, y):.4f} ECE {m.ece(mc, y):.4f} "
            f"accuracy {m.accuracy(mc, y):.4f}"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
