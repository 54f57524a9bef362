"""The MC ONNX graph under ONNX Runtime's DEFAULT session options: stochastic, per-session streams, seeded
reproducibility (equal to the torch engine), statistics equal to plain torch MC within Monte-Carlo error."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from dropwise.models.layers import DropBlock2d, DropConnectConv2d, DropConnectLinear
from dropwise.surgery.engine import MCEngine
from dropwise.surgery.mc_export import export_mc_onnx, output_names
from dropwise.surgery.summaries import CLASSIFICATION_OUTPUTS
from torch import nn

ort = pytest.importorskip("onnxruntime")

Z = 5.0
RANDOM_OPS = {
    "Bernoulli",
    "RandomUniform",
    "RandomUniformLike",
    "RandomNormal",
    "RandomNormalLike",
    "Multinomial",
}


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # default SessionOptions


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 32),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(32, 4),
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    model = _mlp()
    path = tmp_path_factory.mktemp("mc") / "model.mc.onnx"
    export_mc_onnx(model, torch.randn(3, 6), path, input_name="x")
    return model, path


def test_graph_interface_and_no_unsafe_random_op(exported: tuple[nn.Module, Path]) -> None:
    _, path = exported
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["x", "num_samples", "seed"]
    assert [o.name for o in proto.graph.output] == output_names("classification", True)
    assert "seed" in {init.name for init in proto.graph.initializer}  # optional: default -1
    ops = [n.op_type for n in proto.graph.node]
    assert not RANDOM_OPS & set(ops)
    dropouts = [n for n in proto.graph.node if n.op_type == "Dropout"]
    assert len(dropouts) == 1
    consumed = {name for n in proto.graph.node for name in n.input}
    assert dropouts[0].output[1] in consumed  # the mask output is used: EliminateDropout cannot remove it


def test_stochastic_under_default_options_and_sessions_differ(exported: tuple[nn.Module, Path]) -> None:
    _, path = exported
    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    first, second = _session(path), _session(path)
    feeds = {"x": x, "num_samples": np.array(16, dtype=np.int64)}
    a = dict(zip(output_names("classification", True), first.run(None, feeds), strict=True))
    b = dict(zip(output_names("classification", True), first.run(None, feeds), strict=True))
    c = dict(zip(output_names("classification", True), second.run(None, feeds), strict=True))
    assert a["std"].max() > 0 and a["mutual_information"].max() > 0
    samples = a["samples"]
    assert samples.shape == (16, 4, 4)
    assert not np.allclose(samples[0], samples[1])  # samples within a run differ
    assert not np.array_equal(a["samples"], b["samples"])  # runs differ
    assert not np.array_equal(a["samples"], c["samples"])  # sessions differ
    assert len({int(a["seed_used"]), int(b["seed_used"]), int(c["seed_used"])}) == 3
    assert min(int(a["seed_used"]), int(b["seed_used"]), int(c["seed_used"])) >= 0


def test_seeded_runs_reproduce_each_other_and_the_torch_engine(exported: tuple[nn.Module, Path]) -> None:
    model, path = exported
    session = _session(path)
    x = torch.randn(5, 6)
    feeds = {"x": x.numpy(), "num_samples": np.array(9, dtype=np.int64), "seed": np.array(2024, dtype=np.int64)}
    one = session.run(None, feeds)
    two = _session(path).run(None, feeds)
    for u, v in zip(one, two, strict=True):
        np.testing.assert_array_equal(u, v)
    names = output_names("classification", True)
    got = dict(zip(names, one, strict=True))
    assert int(got["seed_used"]) == 2024
    want = MCEngine(model, x)(x, samples=9, seed=2024, return_samples=True)
    np.testing.assert_allclose(got["samples"], want.samples.numpy(), rtol=1e-5, atol=1e-5)
    for name in CLASSIFICATION_OUTPUTS:
        np.testing.assert_allclose(got[name], getattr(want, name).numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
    # a row's samples do not depend on its batch companions: rows 0..1 alone give the same outputs
    part = session.run(["samples"], {**feeds, "x": x[:2].numpy()})[0]
    np.testing.assert_allclose(part, got["samples"][:, :2], rtol=1e-5, atol=1e-6)


def test_dynamic_batch_and_samples(exported: tuple[nn.Module, Path]) -> None:
    _, path = exported
    session = _session(path)
    for batch, n_samples in ((1, 1), (3, 5), (17, 40)):
        x = np.random.default_rng(batch).normal(size=(batch, 6)).astype(np.float32)
        out = dict(
            zip(
                output_names("classification", True),
                session.run(None, {"x": x, "num_samples": np.array(n_samples, dtype=np.int64)}),
                strict=True,
            )
        )
        assert out["probabilities"].shape == (batch, 4)
        assert out["predictive_entropy"].shape == (batch,)
        assert out["samples"].shape == (n_samples, batch, 4)
        np.testing.assert_allclose(out["probabilities"].sum(-1), 1.0, atol=1e-5)
        if n_samples == 1:
            assert np.all(out["mutual_information"] == 0) and np.all(out["std"] == 0)


def test_statistics_match_plain_torch_mc(exported: tuple[nn.Module, Path]) -> None:
    model, path = exported
    n_samples = 2000
    x = torch.randn(4, 6)
    onnx_samples = _session(path).run(["samples"], {"x": x.numpy(), "num_samples": np.array(n_samples)})[0]
    onnx_probs = torch.from_numpy(onnx_samples).double()  # per-sample probabilities
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.train()
    torch.manual_seed(3)
    with torch.no_grad():
        torch_probs = torch.stack([model(x).softmax(-1) for _ in range(n_samples)]).double()
    model.eval()
    se = (onnx_probs.var(0) / n_samples + torch_probs.var(0) / n_samples).sqrt()
    z = (onnx_probs.mean(0) - torch_probs.mean(0)) / se
    assert z.abs().max() < Z, z
    ratio = onnx_probs.std(0) / torch_probs.std(0)
    assert ((ratio - 1).abs() < Z * math.sqrt(1 / n_samples) * 2).all(), ratio


def test_regression_graph_with_a_site_subset_and_a_drop_connect_site(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(3, 16),
        nn.Tanh(),
        nn.Dropout(0.4),  # not chosen: eval
        DropConnectLinear(16, 16, p=0.3, activation="tanh"),  # no hash form: keyed train-mode draws
        nn.Dropout(0.2),
        nn.Linear(16, 2),
    )
    x = torch.randn(4, 3)
    sites = ["3", "4"]
    path = export_mc_onnx(model, x, tmp_path / "reg.onnx", sites=sites, task="regression", return_samples=False)
    assert not RANDOM_OPS & {n.op_type for n in onnx.load(str(path)).graph.node}
    session = _session(path)
    assert [o.name for o in session.get_outputs()] == ["mean", "std", "seed_used"]
    mean, std, seed = session.run(None, {"input": x.numpy(), "num_samples": np.array(12), "seed": np.array(77)})
    want = MCEngine(model, x, sites=sites, task="regression")(x, samples=12, seed=77)
    np.testing.assert_allclose(mean, want.mean.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(std, want.std.numpy(), rtol=1e-4, atol=1e-5)
    assert int(seed) == 77 and std.min() > 0
    unseeded = [session.run(["mean"], {"input": x.numpy(), "num_samples": np.array(12)})[0] for _ in range(2)]
    assert not np.array_equal(*unseeded)


def test_drop_block_graph_equals_the_engine_and_rows_ignore_their_companions(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1),
        nn.ReLU(),
        DropBlock2d(0.3, 3),  # no hash form: keyed train-mode draws, per-sample rescale
        nn.Conv2d(8, 4, 3, padding=1),
        nn.Flatten(),
        nn.Linear(4 * 36, 5),
    )
    x = torch.randn(3, 2, 6, 6)
    path = export_mc_onnx(model, x, tmp_path / "block.onnx", input_name="x")
    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert "MaxPool" in ops and "ScatterND" not in ops  # blocks as one max-pool, not shifted in-place ORs
    session = _session(path)
    names = [o.name for o in session.get_outputs()]

    def run(rows: torch.Tensor) -> np.ndarray:
        out = session.run(None, {"x": rows.numpy(), "num_samples": np.array(10), "seed": np.array(5)})
        return dict(zip(names, out, strict=True))["samples"]

    batch = run(x)
    want = MCEngine(model, x)(x, samples=10, seed=5, return_samples=True).samples.numpy()
    np.testing.assert_allclose(batch, want, rtol=1e-5, atol=1e-5)
    assert batch.std(0).min() > 0
    # a batch-wide DropBlock rescale would move row 0's samples when its companions go away
    np.testing.assert_allclose(run(x[:1]), batch[:, :1], rtol=1e-5, atol=1e-6)


def test_per_example_drop_connect_conv_exports_with_run_time_rows_and_equals_the_engine(
    tmp_path: Path,
) -> None:
    # the grouped convolution of the eager layer has groups = rows (T * B, known only at run time); the graph
    # carries the im2col + batched-matmul form with the same keyed masks
    torch.manual_seed(2)
    model = nn.Sequential(
        DropConnectConv2d(2, 6, 3, stride=2, padding=1, groups=2, p=0.4, activation="relu"),
        DropConnectConv2d(6, 4, (3, 2), padding="same", dilation=(1, 2), p=0.3),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(4 * 16, 5),
    )
    x = torch.randn(3, 2, 8, 7)
    session = _session(export_mc_onnx(model, x, tmp_path / "dc_conv.onnx", input_name="x"))
    names = [o.name for o in session.get_outputs()]

    def run(rows: torch.Tensor, samples: int) -> dict[str, np.ndarray]:
        out = session.run(None, {"x": rows.numpy(), "num_samples": np.array(samples), "seed": np.array(9)})
        return dict(zip(names, out, strict=True))

    for batch, samples in ((5, 7), (1, 3)):  # row counts other than the example's 2 * 3
        rows = torch.randn(batch, 2, 8, 7)
        got = run(rows, samples)
        want = MCEngine(model, rows)(rows, samples=samples, seed=9, return_samples=True)
        np.testing.assert_allclose(got["samples"], want.samples.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["probabilities"], want.probabilities.numpy(), rtol=1e-5, atol=1e-6)
        assert got["std"].min() > 0
    # per-example masks keyed per row: row 0 draws the same masks whatever shares its batch
    full = run(x, 6)["samples"]
    np.testing.assert_allclose(run(x[:1], 6)["samples"], full[:, :1], rtol=1e-5, atol=1e-6)
