"""The ONNX Runtime runtime: deterministic predictions from `model.onnx`, MC from `model.mc.onnx`.

The MC graph (`dropwise.surgery.mc_export`) takes the inputs, `num_samples` (int64 scalar T; `samples` in graphs
exported before the output table) and `seed` (int64 scalar)
and answers the summaries of `dropwise.surgery.summaries` by the names of `dropwise.surgery.outputs`
(`probabilities`, ..., or regression `mean`, `std`), optionally `samples` [T, B, K] (graphs exported
before the output table say `mean_probs` and `sample_outputs`; `encode_mc` reads both). Its masks hash
(seed, row within the request, sample, site, position), so each request runs as its own call and its
result does not depend on its batch company.

Sessions are opened through `dropwise.surgery.providers.create_session`, which detects ONNX Runtime's silent CPU
fallback; the provider that really runs is what the service reports. Both graphs take the manifest's
inputs by name (one for most models; ``input_ids`` and ``attention_mask`` for a text classifier); the
deterministic graph has one output `output` (logits, or the standardised regression value), see
`dropwise.surgery.export`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from dropwise.service.model_inputs import ModelInputs, as_tuple, example_inputs, take_rows
from dropwise.service.runtimes.base import (
    MCGroup,
    Outputs,
    PackageSpec,
    encode_deterministic,
    encode_mc,
)
from dropwise.surgery.calibration import graph_temperature
from dropwise.surgery.outputs import LEGACY_NAMES, NUM_SAMPLES, SAMPLES

DETERMINISTIC_FILE = "model.onnx"
MC_FILE = "model.mc.onnx"
CHECK_INTERVAL_S = 0.02
"""How often a watcher calls the batch's `check` while an MC graph call runs."""


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
        self._mc_outputs: list[str] = []
        self._count_input = NUM_SAMPLES
        #: temperatures this runtime applies to graph outputs: the manifest's, unless the graph has them baked in
        self._temperatures = (1.0, 1.0)

    @property
    def supports_mc(self) -> bool:
        """MC needs the package's `model.mc.onnx`."""
        return self._mc_session is not None

    @property
    def mc_returns_samples(self) -> bool:
        """Whether the MC graph exposes its per-sample outputs (`return_samples` can be honoured)."""
        return any(SAMPLES in (name, LEGACY_NAMES.get(name)) for name in self._mc_outputs)

    def load(self) -> None:
        """Verify the package, open the sessions and warm up; raises when `model.onnx` is missing."""
        from dropwise.package import load_package
        from dropwise.surgery.providers import create_session

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
        self._inputs = [i.name for i in self._session.get_inputs()]
        expected = [spec.name for spec in self.spec.inputs] or [self.spec.input_name]
        if self._inputs != expected:
            raise ValueError(f"{path / DETERMINISTIC_FILE}: graph inputs {self._inputs}, manifest {expected}")
        self._vocabulary_from_manifest(loaded.manifest.model_dump(mode="json"))
        t_det, t_mc = self.spec.temperatures
        t_det = 1.0 if graph_temperature(self._session.get_modelmeta().custom_metadata_map) is not None else t_det
        if MC_FILE in loaded.manifest.files:
            self._mc_session, mc_info = create_session(path / MC_FILE, self.requested_device)
            self.provider_info["mc_placement"] = mc_info.placement  # CUDA: nodes left to the CPU (None on CPU)
            # `seed` has a default (an initializer), so ONNX Runtime lists it as an overridable initializer
            self._mc_inputs = [i.name for i in self._mc_session.get_inputs()] + [
                i.name for i in self._mc_session.get_overridable_initializers() if i.name == "seed"
            ]
            self._mc_outputs = [o.name for o in self._mc_session.get_outputs()]
            count = [name for name in (NUM_SAMPLES, "samples") if name in self._mc_inputs]
            unknown = set(self._mc_inputs) - {*self._inputs, NUM_SAMPLES, "samples", "seed"}
            if unknown or len(count) != 1 or "seed" not in self._mc_inputs:
                raise ValueError(f"{path / MC_FILE}: unexpected MC graph inputs {self._mc_inputs}")
            self._count_input = count[0]
            if graph_temperature(self._mc_session.get_modelmeta().custom_metadata_map) is not None:
                t_mc = 1.0
        self._temperatures = (t_det, t_mc)
        self.predict_deterministic(example_inputs(self.spec, rows=1))

    def _vocabulary_from_manifest(self, manifest: dict[str, Any]) -> None:
        """Token models: bound the ids by the embedding size recorded in the architecture kwargs."""
        if self.spec.input_dtype != "int64":
            return
        kwargs = manifest.get("architecture", {}).get("kwargs", {})
        vocab = kwargs.get("vocab_size") or kwargs.get("num_embeddings")
        if isinstance(vocab, int) and vocab > 0:
            from dataclasses import replace

            self.spec = replace(self.spec, input_range=(0, vocab))

    def _feeds(self, x: ModelInputs) -> dict[str, np.ndarray]:
        """Each input array by its graph input name."""
        return dict(zip(self._inputs, as_tuple(x), strict=True))

    def predict_deterministic(self, x: ModelInputs) -> Outputs:
        """One pass of the deterministic graph."""
        (raw,) = self._session.run(None, self._feeds(x))[:1]
        return encode_deterministic(np.asarray(raw), self.spec, self._temperatures[0])

    def predict_mc(
        self, x: ModelInputs, groups: Sequence[MCGroup], check: Callable[[], None] | None = None
    ) -> list[Outputs]:
        """MC-dropout through `model.mc.onnx`, one graph call per request (its own T and seed); `check` runs
        before each call and, from a watcher thread, during it: when it raises (every request of the batch
        past its deadline or gone) the call in flight is terminated (`RunOptions.terminate`) and `check`'s
        exception propagates, so abandoned work stops consuming compute within one graph node."""
        if self._mc_session is None:
            raise RuntimeError(f"{self.spec.name}: no {MC_FILE} in the package")
        results: list[Outputs] = []
        start = 0
        for group in groups:
            if check is not None:
                check()
            rows = take_rows(x, start, start + group.rows)
            start += group.rows
            feeds = {**self._feeds(rows), self._count_input: np.array(group.num_samples, dtype=np.int64)}
            if "seed" in self._mc_inputs:
                feeds["seed"] = np.array(group.seed, dtype=np.int64)
            values = dict(zip(self._mc_outputs, self._run_mc(feeds, check), strict=True))
            results.append(encode_mc(values, self.spec, group.return_samples, self._temperatures[1]))
        return results

    def _run_mc(self, feeds: dict[str, np.ndarray], check: Callable[[], None] | None) -> list[Any]:
        """One MC graph call, terminated from a watcher thread as soon as `check` raises."""
        if check is None:
            return list(self._mc_session.run(self._mc_outputs, feeds))
        import onnxruntime

        options = onnxruntime.RunOptions()
        done = threading.Event()

        def watch() -> None:
            while not done.wait(CHECK_INTERVAL_S):
                try:
                    check()
                except Exception:
                    options.terminate = True  # ONNX Runtime checks it between nodes; the run then raises
                    return

        watcher = threading.Thread(target=watch, name=f"{self.spec.name}-mc-watch", daemon=True)
        watcher.start()
        try:
            return list(self._mc_session.run(self._mc_outputs, feeds, run_options=options))
        except Exception:
            if options.terminate:
                check()  # raises the batcher's abandonment, answered 504 as for the torch runtime
            raise
        finally:
            done.set()
            watcher.join()
