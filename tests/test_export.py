"""Deterministic ONNX export on small real models: no random node, torch-eval parity, dynamic batch.

Every zoo network is exported once in tests/test_convert.py (through the convert pipeline); this file covers
the exporter's own rules on models built here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from dropwise.surgery.export import (
    ExportError,
    assert_deterministic,
    export_deterministic,
    random_nodes,
    with_min_batch,
)
from onnx import TensorProto, helper
from torch import nn


class _TokenModel(nn.Module):
    """Embedding -> dropout -> mean over positions -> classifier (int64 token input)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(17, 8)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(8, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.embed(tokens)).mean(dim=1))


class _AlwaysNoisy(nn.Module):
    """Adds noise even in eval: a model that must never pass as deterministic."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + torch.rand_like(x[:, :3])


class _FunctionalDropout(nn.Module):
    """`F.dropout(training=True)` hard-coded: stays random whatever the module mode."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.dropout(x, 0.5, training=True))


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def mlp_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(32, 32),
        nn.Tanh(),
        nn.Dropout(0.2),
        nn.Linear(32, 10),
    )
    model.train()  # export must switch to eval itself, and restore the mode afterwards
    path = export_deterministic(model, torch.randn(1, 64), tmp_path_factory.mktemp("mlp") / "model.onnx")
    return model, path


def test_exported_graph_has_no_random_node_and_passes_checker(mlp_export: tuple[nn.Module, Path]) -> None:
    model, path = mlp_export
    proto = onnx.load(str(path))
    assert random_nodes(proto) == []
    assert {n.op_type for n in proto.graph.node}.isdisjoint({"Dropout", "RandomUniformLike", "Bernoulli"})
    onnx.checker.check_model(proto, full_check=True)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 18
    assert model.training, "export_deterministic must restore the model's mode"


def test_matches_torch_eval_at_several_batch_sizes(mlp_export: tuple[nn.Module, Path]) -> None:
    model, path = mlp_export
    session = _session(path)
    batch_dim = session.get_inputs()[0].shape[0]
    assert isinstance(batch_dim, str), "batch dimension must be symbolic"
    model.eval()
    try:
        for batch in (1, 2, 7, 129):
            x = torch.randn(batch, 64, generator=torch.Generator().manual_seed(batch))
            with torch.no_grad():
                expected = model(x).numpy()
            (got,) = session.run(None, {"input": x.numpy()})
            assert got.shape == (batch, 10)
            np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    finally:
        model.train()


def test_int64_token_model(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = _TokenModel()
    tokens = torch.randint(0, 17, (3, 64))
    path = export_deterministic(model, tokens, tmp_path / "tokens.onnx", input_name="tokens")
    session = _session(path)
    assert session.get_inputs()[0].type == "tensor(int64)"
    model.eval()
    for batch in (1, 5):
        x = torch.randint(0, 17, (batch, 64), generator=torch.Generator().manual_seed(batch))
        (got,) = session.run(None, {"tokens": x.numpy()})
        np.testing.assert_allclose(got, model(x).detach().numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_cls", [_AlwaysNoisy, _FunctionalDropout])
def test_random_graph_is_refused(model_cls: type[nn.Module], tmp_path: Path) -> None:
    path = tmp_path / "noisy.onnx"
    with pytest.raises(ExportError, match="random node"):
        export_deterministic(model_cls(), torch.randn(4, 6), path)
    assert not path.exists()


def test_random_nodes_found_in_subgraphs_and_functions() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    branch_out = helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])
    noisy = helper.make_graph([helper.make_node("Dropout", ["x"], ["b"], name="hidden")], "then", [], [branch_out])
    plain = helper.make_graph([helper.make_node("Identity", ["x"], ["b"])], "else", [], [branch_out])
    node = helper.make_node("If", ["c"], ["y"], then_branch=noisy, else_branch=plain, name="branch")
    function = helper.make_function(
        "local",
        "noise",
        ["u"],
        ["v"],
        [helper.make_node("RandomUniformLike", ["u"], ["v"])],
        [helper.make_opsetid("", 20)],
    )
    model = helper.make_model(
        helper.make_graph([node], "g", [x, cond], [y]),
        functions=[function],
        opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("local", 1)],
    )
    found = random_nodes(model)
    assert any(f.startswith("Dropout 'hidden'") and "branch.then_branch" in f for f in found)
    assert any(f.startswith("RandomUniformLike") and "local::noise" in f for f in found)
    with pytest.raises(ExportError, match="2 random node"):
        assert_deterministic(model)


def test_with_min_batch_and_bad_inputs(tmp_path: Path) -> None:
    assert with_min_batch(torch.ones(1, 3)).shape == (2, 3)
    assert with_min_batch(torch.ones(5, 3)).shape == (5, 3)
    with pytest.raises(ExportError, match="batch dimension"):
        with_min_batch(torch.tensor(1.0))
    with pytest.raises(ExportError, match=r"\.onnx"):
        export_deterministic(nn.Linear(2, 2), torch.ones(2, 2), tmp_path / "model.bin")
