"""The ONNX Runtime runtime: deterministic predictions from `model.onnx`, MC from `model.mc.onnx`.

Sessions are opened through `surgery.providers.create_session`, which detects ONNX Runtime's silent CPU
fallback; the provider that really runs is what the service reports. The deterministic graph has one input
(named as in the manifest) and one output `output` (logits, or the standardised regression value), see
`surgery.export`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.runtimes.base import MCGroup, Outputs, PackageSpec, encode_deterministic, encode_mc

DETERMINISTIC_FILE = "model.onnx"
MC_FILE = "model.mc.onnx"


class OnnxRuntime:
    """Runs one package with ONNX Runtime on the CPU or CUDA execution provider."""

    backend = "onnxruntime"

    def __init__(self, spec: PackageSpec, device: str = "auto") -> None:
        self.spec = spec
        self.requested_device = device
        self.device = "cpu"
        self.provider = "unloaded"
        self.provider_info: dict[str, Any] = {}
        self._session: Any = None
        self._mc_session: Any = None
        self._mc_inputs: list[str] = []

    @property
    def supports_mc(self) -> bool:
        """MC needs the package's `model.mc.onnx`."""
        return self._mc_session is not None

    def load(self) -> None:
        """Verify the package, open the sessions and warm up; raises when `model.onnx` is missing."""
        from surgery.package import load_package
        from surgery.providers import create_session

        loaded = load_package(self.spec.path, build=False)  # checksums of every file, nothing unpickled
        path = Path(loaded.path)
        if DETERMINISTIC_FILE not in loaded.manifest.files:
            raise FileNotFoundError(
                f"{path}: no {DETERMINISTIC_FILE} in the package (export it, or serve with --backend torch)"
            )
        self._session, info = create_session(path / DETERMINISTIC_FILE, self.requested_device)
        self.device = info.device
        self.provider = info.provider
        self.provider_info = info.to_dict()
        self._input = self._session.get_inputs()[0].name
        self._vocabulary_from_manifest(loaded.manifest.model_dump(mode="json"))
        if MC_FILE in loaded.manifest.files:
            self._mc_session, _ = create_session(path / MC_FILE, self.requested_device)
            self._mc_inputs = [i.name for i in self._mc_session.get_inputs()]
        example = np.zeros((1, *self.spec.sample_shape), dtype=self.spec.input_dtype)
        self.predict_deterministic(example)

    def _vocabulary_from_manifest(self, manifest: dict[str, Any]) -> None:
        """Token models: bound the ids by the embedding size recorded in the architecture kwargs."""
        if self.spec.input_dtype != "int64":
            return
        kwargs = manifest.get("architecture", {}).get("kwargs", {})
        vocab = kwargs.get("vocab_size") or kwargs.get("num_embeddings")
        if isinstance(vocab, int) and vocab > 0:
            from dataclasses import replace

            self.spec = replace(self.spec, input_range=(0, vocab))

    def predict_deterministic(self, x: np.ndarray) -> Outputs:
        """One pass of the deterministic graph."""
        (raw,) = self._session.run(None, {self._input: x})[:1]
        return encode_deterministic(np.asarray(raw), self.spec)

    def predict_mc(self, x: np.ndarray, groups: Sequence[MCGroup]) -> list[Outputs]:
        """MC-dropout through `model.mc.onnx`: per-sample outputs for each request, summarised in torch."""
        if self._mc_session is None:
            raise RuntimeError(f"{self.spec.name}: no {MC_FILE} in the package")
        results: list[Outputs] = []
        start = 0
        for group in groups:
            rows = x[start : start + group.rows]
            start += group.rows
            feeds = self._mc_feeds(rows, group)
            samples = self._mc_session.run(None, feeds)[0]
            results.append(encode_mc(np.asarray(samples), self.spec, group.return_samples))
        return results

    def _mc_feeds(self, rows: np.ndarray, group: MCGroup) -> dict[str, np.ndarray]:
        raise NotImplementedError("MC graph interface pending")
