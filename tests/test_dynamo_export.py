"""One translation registry per process (`dropwise.surgery.dynamo_export`): same graphs as torch.onnx.export."""

from __future__ import annotations

import warnings

import onnx
import pytest
import torch
from dropwise.surgery import dynamo_export
from dropwise.surgery.dynamo_export import export_program, shared_registry_available
from dropwise.surgery.engine import MCEngine
from dropwise.surgery.mask_onnx import onnx_translation_table
from dropwise.surgery.mc_export import MCGraph
from torch import nn
from torch.export import Dim


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3)).eval()


def _bytes(program: object) -> bytes:
    proto = program.model_proto  # type: ignore[attr-defined]
    return proto.SerializeToString(deterministic=True)


def _public(model: nn.Module, args: tuple[torch.Tensor, ...], **kwargs: object) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _bytes(torch.onnx.export(model, args, dynamo=True, verbose=False, opset_version=20, **kwargs))


def test_the_registry_layout_of_this_torch_is_supported() -> None:
    # The pinned torch has the internals; a silent fallback would hide the lost speed-up.
    assert shared_registry_available()


def test_deterministic_graph_is_the_one_torch_onnx_export_writes() -> None:
    model, x = _mlp(), torch.randn(2, 8)
    shapes = ({0: Dim("batch")},)
    expected = _public(model, (x,), input_names=["input"], output_names=["output"], dynamic_shapes=shapes)
    ours = export_program(model, (x,), input_names=["input"], output_names=["output"], dynamic_shapes=shapes, opset=20)
    assert _bytes(ours) == expected
    again = export_program(model, (x,), input_names=["input"], output_names=["output"], dynamic_shapes=shapes, opset=20)
    assert _bytes(again) == expected  # the second export reuses the registry and writes the same graph


def test_mc_graph_with_custom_ops_is_the_one_torch_onnx_export_writes() -> None:
    model, x = _mlp(), torch.randn(2, 8)
    graph = MCGraph(MCEngine(model, x, None, task="classification", exportable=True), return_samples=False).eval()
    args = (x, torch.tensor(2), torch.tensor(0))
    names = ["input", "num_samples", "seed"]
    outputs = ["probabilities", "predictive_entropy", "expected_entropy", "mutual_information", "variation_ratio"]
    outputs += ["std", "seed_used"]
    shapes = {"args": ({0: Dim("batch", min=1)}, None, None)}
    table = onnx_translation_table()
    expected = _public(
        graph,
        args,
        input_names=names,
        output_names=outputs,
        dynamic_shapes=shapes,
        custom_translation_table=table,
    )
    ours = export_program(
        graph,
        args,
        input_names=names,
        output_names=outputs,
        dynamic_shapes=shapes,
        opset=20,
        custom_translation_table=table,
    )
    assert _bytes(ours) == expected
    assert any(node.op_type == "BitwiseXor" for node in onnx.load_from_string(expected).graph.node)


def test_custom_ops_stay_out_of_the_shared_registry() -> None:
    table = onnx_translation_table()
    with_table = dynamo_export._registry(20, table)
    plain = dynamo_export._registry(20, None)
    target = next(iter(table))
    assert with_table.is_registered(target)
    assert not plain.is_registered(target)
    assert dynamo_export._registry(20, None).functions.keys() == plain.functions.keys()


def test_an_opset_older_than_the_registry_is_refused() -> None:
    with pytest.raises(ValueError, match="opset 17"):
        export_program(
            _mlp(), (torch.randn(2, 8),), input_names=["input"], output_names=["output"], dynamic_shapes=None, opset=17
        )
