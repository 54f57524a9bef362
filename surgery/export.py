"""Deterministic ONNX export: a folded (or eval-mode) model as a graph with no random node.

The model is exported with the dynamo exporter (`torch.onnx.export(..., dynamo=True)`, opset 20; run through
`dropwise.surgery.dynamo_export`, which builds its translation registry once per process) with a
dynamic batch dimension. Its `training=` argument is ignored by that exporter, so the model is put in eval
mode before export (docs/DESIGN.md §6). The resulting graph is then searched, including sub-graphs and local
functions, for any node that would make it stochastic (Dropout, RandomUniform*, RandomNormal*, Bernoulli,
Multinomial); finding one is an error, not a warning. `onnx.checker` with full shape inference runs last.

Graph interface (see docs/CONTRACTS.md): the manifest's inputs by name (one ``input`` for most models; a text
classifier takes ``input_ids`` and ``attention_mask``), each of shape ``[batch, ...]`` with float32 or int64
elements and one shared batch dimension, and one output ``output`` of shape ``[batch, ...]``
(logits for classification, the standardised prediction for regression).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import onnx
import torch
from dropwise.surgery.dynamo_export import export_program
from torch import nn
from torch.export import Dim

from dropwise.errors import DropwiseError

DEFAULT_OPSET = 20
DEFAULT_INPUT_NAME = "input"
DEFAULT_OUTPUT_NAME = "output"

RANDOM_OP_TYPES: frozenset[str] = frozenset(
    {
        "Dropout",
        "RandomUniform",
        "RandomUniformLike",
        "RandomNormal",
        "RandomNormalLike",
        "Bernoulli",
        "Multinomial",
    }
)


class ExportError(DropwiseError, RuntimeError):
    """The model could not be exported, or the exported graph is not what was asked for."""


def iter_nodes(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.NodeProto]]:
    """Every node of `model` with its location: main graph, sub-graphs (If/Loop/Scan) and functions."""

    def walk(graph: onnx.GraphProto, where: str) -> Iterator[tuple[str, onnx.NodeProto]]:
        for node in graph.node:
            yield where, node
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attribute.g, f"{where}/{node.name}.{attribute.name}")
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    for index, sub in enumerate(attribute.graphs):
                        yield from walk(sub, f"{where}/{node.name}.{attribute.name}[{index}]")

    yield from walk(model.graph, "graph")
    for function in model.functions:
        for node in function.node:
            yield f"function {function.domain}::{function.name}", node


def random_nodes(model: onnx.ModelProto) -> list[str]:
    """Descriptions (``op_type 'name' in location``) of every stochastic node in `model`."""
    return [
        f"{node.op_type} {node.name!r} in {where}"
        for where, node in iter_nodes(model)
        if node.op_type in RANDOM_OP_TYPES and node.domain in ("", "ai.onnx")
    ]


def assert_deterministic(model: onnx.ModelProto) -> None:
    """Raise `ExportError` naming every Dropout or random node found in `model`."""
    found = random_nodes(model)
    if found:
        raise ExportError(f"the deterministic graph still has {len(found)} random node(s): {'; '.join(found)}")


def with_min_batch(example_input: torch.Tensor, min_batch: int = 2) -> torch.Tensor:
    """`example_input` with at least `min_batch` rows: torch.export specialises a batch of 1 to a constant."""
    if example_input.dim() == 0:
        raise ExportError("the example input must have a batch dimension")
    if example_input.shape[0] >= min_batch:
        return example_input
    repeats = -(-min_batch // max(example_input.shape[0], 1))
    return example_input.repeat(repeats, *([1] * (example_input.dim() - 1)))[:min_batch]


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's registration chatter (e.g. 'torchvision is not installed') during export."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        logger.setLevel(previous)


def export_graph(
    model: nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    input_name: str = DEFAULT_INPUT_NAME,
    output_names: list[str] | None = None,
    dynamic_batch: bool = True,
    opset: int = DEFAULT_OPSET,
    input_names: Sequence[str] | None = None,
) -> onnx.ModelProto:
    """Export `model` as it is (modes untouched) with the dynamo exporter; return the ONNX model in memory.

    `example_input` is one tensor or a tuple of the model's positional inputs, named by `input_names`
    (default: `input_name` for one input). Their shared batch dimension becomes the symbolic dimension
    ``batch`` when `dynamic_batch`.
    """
    if opset < 18:
        raise ExportError(f"opset {opset} is too old: the dynamo exporter needs opset >= 18")
    examples = example_input if isinstance(example_input, tuple) else (example_input,)
    names = list(input_names) if input_names is not None else [input_name]
    if len(names) != len(examples):
        raise ExportError(f"{len(examples)} example input(s) but {len(names)} input name(s): {names}")
    if dynamic_batch:
        examples = tuple(with_min_batch(x) for x in examples)
    batch = Dim("batch")
    dynamic_shapes = tuple({0: batch} for _ in examples) if dynamic_batch else None
    try:
        with _quiet_exporter(), torch.no_grad():
            program = export_program(
                model,
                examples,
                input_names=names,
                output_names=output_names or [DEFAULT_OUTPUT_NAME],
                dynamic_shapes=dynamic_shapes,
                opset=opset,
            )
    except Exception as exc:  # the exporter raises many types; report the first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: {first}") from exc
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise ExportError("torch.onnx.export returned no program")
    return program.model_proto


def check_graph(model: onnx.ModelProto) -> None:
    """Run `onnx.checker` with full shape inference, turning its failure into `ExportError`."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"onnx.checker rejected the graph: {str(exc).strip().splitlines()[0]}") from exc


def set_metadata(model: onnx.ModelProto, values: dict[str, str]) -> None:
    """Add or replace ``metadata_props`` entries of `model`."""
    kept = [prop for prop in model.metadata_props if prop.key not in values]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in values.items():
        model.metadata_props.add(key=key, value=value)


def export_deterministic(
    model: nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    path: str | Path,
    *,
    input_name: str = DEFAULT_INPUT_NAME,
    output_name: str = DEFAULT_OUTPUT_NAME,
    opset: int = DEFAULT_OPSET,
    input_names: Sequence[str] | None = None,
) -> Path:
    """Export `model` in eval mode to `path` as a deterministic graph with a dynamic batch dimension.

    The model's modes are restored afterwards. The file holds its weights (no external data).

    Raises:
        ExportError: export failed, the graph has a Dropout or random node, or `onnx.checker` rejects it.
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise ExportError(f"an ONNX file name must end in .onnx: {path}")
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        proto = export_graph(
            model,
            example_input,
            input_name=input_name,
            output_names=[output_name],
            opset=opset,
            input_names=input_names,
        )
    finally:
        for module, training in modes.items():
            module.train(training)
    assert_deterministic(proto)
    check_graph(proto)
    set_metadata(proto, {"dropwise.flavour": "deterministic"})
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(path))
    return path
