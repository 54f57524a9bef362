"""Constants shared by the serving benchmark's modules (`bench.serving`)."""

from __future__ import annotations

from pathlib import Path

CLIENTS = 64
SAMPLES = 32
MAX_BATCH = 64
MLP_NAME = "mlp_p05"
CNN_NAME = "cnn_mnist"
ROOT = Path(__file__).resolve().parents[1]
