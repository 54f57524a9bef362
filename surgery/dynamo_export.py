"""torch's dynamo ONNX exporter with one translation registry per process instead of one per export.

``torch.onnx.export(..., dynamo=True)`` rebuilds its ATen -> ONNX translation registry from torchlib on every
call: it infers the ONNX signature of about a thousand onnxscript functions, 0.5 to 0.9 s of CPU each time
(measured on mlp_digits, ``bench/convert_time.py``), paid twice per ``dropwise convert`` (``model.onnx`` and
``model.mc.onnx``) and twice per network in ``dropwise train``. The registry depends only on the opset, so
:func:`export_program` builds it once per opset and reuses it; a call with a custom translation table (the MC
graph's hash ops, `dropwise.surgery.mask_onnx`) registers them on a copy, so no export sees another's ops.

torch 2.13's public ``torch.onnx.export`` takes no registry. :func:`export_program` therefore makes the two
calls ``torch.onnx.export`` makes itself (``torch/onnx/_internal/exporter/_compat.py``): build the registry,
then ``_core.export`` with it. Everything else (capture by ``torch.export``, decompositions, translation,
version conversion, the onnxscript optimiser) is torch's own code, so the graphs are the same
(``tests/test_dynamo_export.py`` compares them byte for byte with ``torch.onnx.export``'s). Where those
internals are missing (another torch), it calls ``torch.onnx.export`` itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["export_program", "shared_registry_available"]

_LOCK = threading.Lock()
_REGISTRIES: dict[int, Any] = {}


def _internals() -> tuple[Any, Any, Any] | None:
    """torch's exporter modules that take a registry, or None when this torch lays them out differently."""
    try:
        from torch.onnx._internal.exporter import _core, _dynamic_shapes, _registration
    except ImportError:  # pragma: no cover - another torch layout
        return None
    needed = (
        hasattr(_core, "export")
        and hasattr(_registration, "ONNXRegistry")
        and hasattr(_dynamic_shapes, "convert_str_to_export_dim")
    )
    return (_core, _dynamic_shapes, _registration) if needed else None


def shared_registry_available() -> bool:
    """True when exports share one registry (torch's exporter internals have the expected layout)."""
    return _internals() is not None


def _registry(opset: int, table: Mapping[Callable[..., Any], Callable[..., Any]] | None) -> Any:
    """The torchlib registry for `opset` (built once per process), with `table` registered on a copy."""
    internals = _internals()
    assert internals is not None
    registration = internals[2]
    with _LOCK:
        base = _REGISTRIES.get(opset)
        if base is None:
            base = registration.ONNXRegistry.from_torchlib(opset_version=opset)
            _REGISTRIES[opset] = base
    registry = registration.ONNXRegistry()
    registry._opset_version = base.opset_version
    registry.functions = {target: list(decomps) for target, decomps in base.functions.items()}
    for torch_op, onnx_op in (table or {}).items():
        registry.register_op(torch_op, onnx_op, is_complex=False)
    return registry


def export_program(
    model: nn.Module,
    args: tuple[Any, ...],
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_shapes: Any,
    opset: int,
    custom_translation_table: Mapping[Callable[..., Any], Callable[..., Any]] | None = None,
) -> Any:
    """What ``torch.onnx.export(model, args, dynamo=True, ...)`` returns (an ``ONNXProgram``), same graph.

    Args:
        model: the module to export, in the modes it should be traced in.
        args: its positional example inputs.
        input_names, output_names: names of the graph's inputs and outputs, in order.
        dynamic_shapes: as for ``torch.export.export`` (``Dim`` objects; axis names as strings also work).
        opset: the ONNX opset of the graph (the registry targets it; 18 or newer).
        custom_translation_table: extra ``{torch op: onnxscript function}`` translations.

    Raises:
        Whatever ``torch.onnx.export`` raises for the same call (callers turn it into their own error).
    """
    internals = _internals()
    if internals is None:  # pragma: no cover - another torch layout: the public path, one registry per call
        return torch.onnx.export(
            model,
            args,
            dynamo=True,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            custom_translation_table=dict(custom_translation_table) if custom_translation_table else None,
            verbose=False,
        )
    core, dynamic, _ = internals
    if opset < 18:
        raise ValueError(f"opset {opset} is too old: the dynamo exporter's registry needs opset >= 18")
    shapes, rename_axes = dynamic.convert_str_to_export_dim(dynamic_shapes)
    program = core.export(
        model,
        args,
        None,
        registry=_registry(opset, custom_translation_table),
        dynamic_shapes=shapes,
        input_names=list(input_names),
        output_names=list(output_names),
        verbose=False,
        optimize=True,
        opset_version=opset,
    )
    if rename_axes and dynamic_shapes is not None:
        program._rename_dynamic_axes(dynamic_shapes)
    return program
