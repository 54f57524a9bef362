"""Temperature scaling applied: the temperatures `dropwise evaluate` stores, used by runtimes and ONNX graphs.

Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks") divides the logits by one
scalar T fitted on the validation split (`dropwise.surgery.evaluate`). A package's manifest ``calibration``
holds two temperatures:

* deterministic: ``probabilities = softmax(z / T_det)`` (eval-mode logits z);
* MC dropout: ``probabilities = softmax(log p_bar / T_mc)``, i.e. the MC predictive mean
  ``p_bar = mean_t softmax(z_t)`` (Gal & Ghahramani 2016) raised to ``1 / T_mc`` and renormalised.

Only ``probabilities`` is calibrated. ``predictions`` do not change (dividing by T > 0 keeps the argmax),
and the uncertainty scores (``predictive_entropy``, ``expected_entropy``, ``mutual_information``,
``variation_ratio``, ``std``) and the per-sample ``samples`` stay those of the raw T passes: they are the
scores `dropwise evaluate` measured for OOD detection and fitted the abstention threshold on, and
``mutual_information = H[p_bar] - mean_t H[p_t]`` stays a non-negative difference of two entropies of the
same passes. Regression packages have no temperature.

Both ONNX graphs carry the temperatures themselves (`bake_temperatures`), so a graph served anywhere
(Triton, another ONNX Runtime) answers calibrated values: ``model.onnx``'s ``output`` becomes ``z / T_det``
(calibrated logits) and ``model.mc.onnx``'s ``probabilities`` becomes ``softmax(log max(p_bar, tiny) /
T_mc)``. A baked graph records its temperature in its metadata (`TEMPERATURE_KEY`), so the ONNX Runtime
runtime never applies it twice, and baking again replaces the value. The torch runtime applies the same
formulas (`scale_logits`, `calibrate_mean`) to its eval-mode logits and MC mean. A package without
``calibration`` behaves exactly as before (T = 1 everywhere).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "TEMPERATURE_KEY",
    "bake_temperatures",
    "calibrate_mean",
    "graph_temperature",
    "scale_logits",
    "temperatures",
]

TEMPERATURE_KEY = "dropwise.temperature"
"""ONNX metadata key of the temperature a graph has baked in."""
TINY = 1e-30
"""Floor of p_bar before its log (an underflowed class keeps a finite, tiny calibrated probability)."""
_PREFIX = "dropwise_calibration"


def temperatures(manifest: Mapping[str, Any]) -> tuple[float, float]:
    """(T_det, T_mc) from a manifest dict; 1.0 for what is missing (uncalibrated, or regression)."""
    if manifest.get("task", "classification") != "classification":
        return 1.0, 1.0
    cal = manifest.get("calibration") or {}

    def pick(block: Any) -> float:
        value = block.get("temperature") if isinstance(block, Mapping) else None
        return float(value) if isinstance(value, int | float) and np.isfinite(value) and value > 0 else 1.0

    return pick(cal.get("deterministic")), pick(cal.get("mc"))


def scale_logits(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``logits / T`` in float32 (unchanged when T == 1)."""
    if temperature == 1.0:
        return logits
    return (np.asarray(logits, dtype=np.float32) / np.float32(temperature)).astype(np.float32)


def calibrate_mean(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log max(p_bar, TINY) / T)`` over the last axis, float32 (unchanged when T == 1)."""
    if temperature == 1.0:
        return probabilities
    import torch

    p = torch.from_numpy(np.ascontiguousarray(probabilities, dtype=np.float32))
    return torch.softmax(p.clamp(min=TINY).log() / temperature, dim=-1).numpy()


def graph_temperature(metadata: Mapping[str, str]) -> float | None:
    """The temperature a graph has baked in, from its metadata map (ONNX Runtime's
    ``get_modelmeta().custom_metadata_map``); None for a graph without one."""
    value = metadata.get(TEMPERATURE_KEY)
    return float(value) if value is not None else None


def _bake(model: Any, output: str, temperature: float, mc: bool) -> None:
    """Insert the temperature nodes in front of graph output ``output`` (or update them when present)."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    t_name = f"{_PREFIX}_temperature"
    existing = [init for init in graph.initializer if init.name == t_name]
    if existing:
        dtype = numpy_helper.to_array(existing[0]).dtype
        existing[0].CopyFrom(numpy_helper.from_array(np.array(temperature, dtype=dtype), t_name))
    else:
        out_info = next((o for o in graph.output if o.name == output), None)
        if out_info is None:
            raise ValueError(f"the graph has no output {output!r}")
        elem = out_info.type.tensor_type.elem_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
        raw = f"{output}_uncalibrated"
        for node in graph.node:  # the producer and every consumer read the raw tensor now
            node.output[:] = [raw if name == output else name for name in node.output]
            node.input[:] = [raw if name == output else name for name in node.input]
        graph.initializer.append(numpy_helper.from_array(np.array(temperature, dtype=dtype), t_name))
        if mc:
            graph.initializer.append(numpy_helper.from_array(np.array(TINY, dtype=dtype), f"{_PREFIX}_tiny"))
            graph.node.extend(
                [
                    helper.make_node("Max", [raw, f"{_PREFIX}_tiny"], [f"{_PREFIX}_floor"], name=f"{_PREFIX}_max"),
                    helper.make_node("Log", [f"{_PREFIX}_floor"], [f"{_PREFIX}_log"], name=f"{_PREFIX}_log"),
                    helper.make_node("Div", [f"{_PREFIX}_log", t_name], [f"{_PREFIX}_scaled"], name=f"{_PREFIX}_div"),
                    helper.make_node("Softmax", [f"{_PREFIX}_scaled"], [output], name=f"{_PREFIX}_softmax", axis=-1),
                ]
            )
        else:
            graph.node.append(helper.make_node("Div", [raw, t_name], [output], name=f"{_PREFIX}_div"))
    props = [p for p in model.metadata_props if p.key != TEMPERATURE_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    model.metadata_props.append(onnx.StringStringEntryProto(key=TEMPERATURE_KEY, value=repr(float(temperature))))
    onnx.checker.check_model(model)


def bake_temperatures(package_dir: str | Path, det_temperature: float, mc_temperature: float) -> list[str]:
    """Write the temperatures into the package's ``model.onnx`` (deterministic) and ``model.mc.onnx`` (MC)
    when it has them (see the module docstring); files rewritten through `dropwise.package.add_file`."""
    import onnx
    from dropwise.package import add_file, verify_package

    package_dir = Path(package_dir)
    manifest = verify_package(package_dir)
    if manifest.task != "classification":
        return []
    done = []
    for filename, output, temperature, mc in (
        ("model.onnx", "output", det_temperature, False),
        ("model.mc.onnx", "probabilities", mc_temperature, True),
    ):
        if filename not in manifest.files:
            continue
        model = onnx.load(str(package_dir / filename))
        if mc and not any(o.name == output for o in model.graph.output):
            output = "mean_probs"  # an MC graph exported before the output table
        _bake(model, output, temperature, mc)
        add_file(package_dir, filename, model.SerializeToString())
        done.append(filename)
    return done
