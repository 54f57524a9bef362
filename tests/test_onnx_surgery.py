"""ONNX in, MC ONNX out: surgery on the graph of an ONNX file exported from a model dropwise never built.

The source models are plain torch modules (no dropwise layer), exported with the dynamo exporter in
training mode (Dropout nodes present) and in eval mode (none: a head dropout is inserted). Everything runs
for real: ONNX Runtime sessions, the CLI in a subprocess, the service app serving the package.
"""

from __future__ import annotations

import json
import subprocess
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from dropwise.package import PackageError, load_package
from dropwise.service.app import create_app
from dropwise.service.settings import Settings
from dropwise.surgery import masks
from dropwise.surgery.engine import MCEngine
from dropwise.surgery.onnx_convert import OnnxConvertOptions, convert_onnx_file
from dropwise.surgery.onnx_hash import GraphBuilder, HashOps
from dropwise.surgery.onnx_surgery import (
    OnnxSurgeryError,
    deterministic_graph,
    find_dropouts,
    head_input,
    insert_dropouts,
    mc_graph,
)
from fastapi.testclient import TestClient
from onnx import TensorProto, helper
from test_service_fixtures import DROPWISE
from torch import nn


class _Net(nn.Module):
    """A third-party-style classifier: dropout inside and before the head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Dropout(0.25), nn.Linear(32, 24), nn.Tanh())
        self.drop = nn.Dropout(0.4)
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.body(x)))


def _export(model: nn.Module, path: Path, input_name: str = "features") -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (torch.randn(2, 12),),
            input_names=[input_name],
            output_names=["logits"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
            dynamo=True,
            verbose=False,
        )
    assert program is not None
    onnx.save(program.model_proto, str(path))
    return path


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    return _Net().eval()


@pytest.fixture(scope="module")
def files(net: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx_files")
    for module in net.modules():  # training mode for the dropout modules only: Dropout nodes are exported
        if isinstance(module, nn.Dropout):
            module.train()
    trained = _export(net, root / "trained.onnx")
    net.eval()
    evaluated = _export(net, root / "evalmode.onnx")
    return {"train": trained, "eval": evaluated}


def _x(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 12)).astype(np.float32)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_hash_nodes_draw_the_torch_masks() -> None:
    """The ONNX hash (keys, sample keys, site keys, 16-bit halves) equals `masks.keep_mask` bit for bit."""
    for shape, p, site in (((7,), 0.5, 0), ((3, 5), 0.1, 2), ((4, 2, 3), 0.9, 5)):
        builder = GraphBuilder("t")
        ops = HashOps(builder)
        batch = builder.op("Squeeze", [builder.op("Shape", ["x"], start=0, end=1)])
        keys = ops.sample_keys(ops.row_keys("seed", batch), "samples")
        tiled = builder.op("Tile", ["x", builder.i64([3] + [1] * len(shape), "rep")])
        out = ops.keep_factor(tiled, keys, site, p, TensorProto.FLOAT)
        builder.nodes.append(helper.make_node("Identity", [out], ["y"]))
        graph = helper.make_graph(
            builder.nodes,
            "hash",
            [
                helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", *shape]),
                helper.make_tensor_value_info("seed", TensorProto.INT64, []),
                helper.make_tensor_value_info("samples", TensorProto.INT64, []),
            ],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            initializer=builder.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
        x = np.ones((4, *shape), dtype=np.float32)
        for seed in (0, 2**40 + 17):
            (y,) = _session(model).run(None, {"x": x, "seed": np.array(seed), "samples": np.array(3)})
            rows = torch.arange(4)
            k = masks.sample_keys(masks.row_keys(torch.full((4,), seed), rows), 3)
            expected = masks.keep_mask(k, site, shape, p).numpy()
            assert np.array_equal(y != 0, expected)
            assert np.allclose(y[expected], 1.0 / (1.0 - masks.quantised_p(p)))


def test_find_and_remove_dropouts(files: dict[str, Path], net: nn.Module) -> None:
    source = onnx.load(str(files["train"]))
    sites = find_dropouts(source)
    assert [round(s.p, 6) for s in sites] == [0.25, 0.4]
    assert all(s.ratio_from == "input" and "True" in s.training_mode for s in sites)
    det = deterministic_graph(source)
    assert not find_dropouts(det)
    x = _x(9)
    (out,) = _session(det).run(None, {"features": x})
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    assert np.abs(out - expected).max() < 1e-5
    assert find_dropouts(onnx.load(str(files["eval"]))) == []


def test_mc_graph_reproduces_the_torch_engine(files: dict[str, Path], net: nn.Module) -> None:
    """Seeded: the MC graph's per-sample outputs equal the torch engine's (same masks, float rounding aside)."""
    mc, info = mc_graph(onnx.load(str(files["train"])))
    assert info.split and info.boundary and info.trunk_nodes > 0
    session = _session(mc)
    x = _x(6)
    feeds = {"features": x, "num_samples": np.array(16), "seed": np.array(1234)}
    names = [o.name for o in session.get_outputs()]
    assert names[-3:] == ["samples", "sample_logits", "seed_used"]
    out = dict(zip(names, session.run(None, feeds), strict=True))
    result = MCEngine(net, torch.from_numpy(x))(torch.from_numpy(x), samples=16, seed=1234, return_samples=True)
    assert result.samples is not None
    assert np.abs(out["sample_logits"] - result.sample_logits.numpy()).max() < 1e-5
    assert np.abs(out["samples"] - result.samples.numpy()).max() < 1e-5  # per-sample probabilities
    assert np.abs(out["probabilities"] - result.probabilities.numpy()).max() < 1e-6
    assert int(out["seed_used"]) == 1234
    # unseeded: fresh seeds, different samples, reported seed reproduces
    a = dict(zip(names, session.run(None, {"features": x, "num_samples": np.array(16)}), strict=True))
    b = dict(zip(names, session.run(None, {"features": x, "num_samples": np.array(16)}), strict=True))
    assert not np.array_equal(a["samples"], b["samples"])
    again = session.run(["samples"], {**feeds, "seed": a["seed_used"]})[0]
    assert np.array_equal(again, a["samples"])


def test_eval_mode_graph_needs_an_inserted_dropout(files: dict[str, Path], tmp_path: Path) -> None:
    source = onnx.load(str(files["eval"]))
    with pytest.raises(OnnxSurgeryError, match="--add-dropout-before-head"):
        mc_graph(source)
    head = head_input(source)
    with_head = insert_dropouts(source, [head], 0.3)
    assert [s.p for s in find_dropouts(with_head)] == [pytest.approx(0.3)]
    with pytest.raises(OnnxSurgeryError, match="not a tensor or node"):
        insert_dropouts(source, ["no_such_node"], 0.3)
    with pytest.raises(OnnxSurgeryError, match="graph input"):
        insert_dropouts(source, ["features"], 0.3)


def test_convert_eval_mode_file_with_head_dropout(files: dict[str, Path], tmp_path: Path) -> None:
    """Head dropout only: the MC mean of the outputs matches the deterministic output within MC error."""
    result = convert_onnx_file(
        files["eval"], repository=tmp_path, name="third_party", options=OnnxConvertOptions(add_dropout_before_head=0.3)
    )
    report = result.report
    assert report.passed, report.failures()
    assert report.mean_test is not None and report.mean_test_decides and report.mean_test.passed
    assert report.deterministic[0].max_abs <= 1e-6
    manifest = load_package(result.package_dir, build=False).manifest
    assert manifest.input.name == "features" and manifest.input.shape == [-1, 12]
    assert manifest.source["format"] == "onnx"  # type: ignore[attr-defined]
    assert "mc:head_dropout=0.3" in manifest.surgery
    assert json.loads((result.package_dir / "parity.json").read_text())["passed"] is True
    with pytest.raises(PackageError, match="onnxruntime backend"):
        load_package(result.package_dir)


def test_dropout_after_named_node(files: dict[str, Path], tmp_path: Path) -> None:
    source = onnx.load(str(files["eval"]))
    tanh = next(n.name for n in source.graph.node if n.op_type == "Tanh")
    options = OnnxConvertOptions(dropout_after=(tanh,), p=0.2)
    result = convert_onnx_file(files["eval"], repository=tmp_path, name="after", options=options)
    assert result.report.passed, result.report.failures()
    assert [s["p"] for s in result.report.sites] == [pytest.approx(0.2)]
    with pytest.raises(OnnxSurgeryError, match="--p"):
        OnnxConvertOptions(dropout_after=(tanh,))


def test_old_opset_graph_without_split(tmp_path: Path) -> None:
    """A hand-built opset-13 graph whose Reshape target comes from Shape(x): upgraded, whole graph tiled."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Dropout", ["x", "ratio"], ["dropped"]),
        helper.make_node("Reshape", ["dropped", "shape"], ["same"]),
        helper.make_node("MatMul", ["same", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "old",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        initializer=[onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(np.float32(0.5), "ratio")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    mc, info = mc_graph(model, task="regression")
    assert not info.split and "shape" in info.reason
    x = rng.standard_normal((4, 6)).astype(np.float32)
    out = _session(mc).run(["mean", "samples"], {"x": x, "num_samples": np.array(2000), "seed": np.array(3)})
    assert out[1].shape == (2000, 4, 3)
    se = out[1].std(axis=0) / np.sqrt(2000)
    assert np.all(np.abs(out[0] - x @ w) < 5 * se + 1e-4)


def test_cli_and_serving(files: dict[str, Path], tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    ok = subprocess.run(
        [DROPWISE, "convert", str(files["train"]), "--repository", str(repo), "--name", "net", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert "parity passed" in ok.stdout
    refused = subprocess.run(
        [DROPWISE, "convert", str(files["eval"]), "--repository", str(repo)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "--add-dropout-before-head" in refused.stderr

    x = _x(3).tolist()
    with TestClient(create_app(Settings(repository=repo, backend="onnxruntime", device="cpu"))) as client:
        info = client.get("/v1/models/net").json()
        assert info["backend"] == "onnxruntime" and info["mc_available"]
        assert info["placement"] is None  # only a CUDA session reports nodes left to the CPU
        det = client.post("/v1/models/net/predict", json={"inputs": x}).json()
        assert np.asarray(det["probabilities"]).shape == (3, 5)
        req = {"inputs": x, "mode": "mc", "samples": 16, "seed": 5}
        a = client.post("/v1/models/net/predict", json=req).json()
        b = client.post("/v1/models/net/predict", json=req).json()
        assert a["probabilities"] == b["probabilities"]
        assert min(a["uncertainty"]["mutual_information"]) > 0.0
    # the torch backend refuses the graph-only package and says why (repository index reason)
    torch_app = create_app(Settings(repository=repo, backend="torch", device="cpu", admin_token="t0k"))
    with TestClient(torch_app) as client:
        assert client.get("/v1/models/net").status_code == 404
        index = client.post("/v2/repository/index", json={}, headers={"Authorization": "Bearer t0k"}).json()
        (row,) = [r for r in index if r["name"] == "net"]
        assert row["state"] == "UNAVAILABLE" and "serve it with the onnxruntime backend" in row["reason"]
