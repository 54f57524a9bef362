"""`dropwise export-triton`: a Triton model repository whose configs parse and whose ONNX files run.

Each `config.pbtxt` is parsed with the `ModelConfig` protobuf that tritonclient ships (the schema Triton
itself reads), checked against the ONNX graph it describes, and each ONNX file is run with ONNX Runtime's
default session options.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from dropwise.package.serving import set_serving_config
from google.protobuf import text_format
from test_service_fixtures import DROPWISE, build_onnx_repository
from tritonclient.grpc import model_config_pb2

NP_TYPES = {
    model_config_pb2.TYPE_FP32: np.float32,
    model_config_pb2.TYPE_INT64: np.int64,
}


@pytest.fixture(scope="module")
def onnx_repo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_onnx_repository(request, tmp_path_factory.mktemp("svc"))


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DROPWISE, *args], capture_output=True, text=True, timeout=300)


def _parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_export_triton_writes_configs_triton_parses_and_graphs_that_run(onnx_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(onnx_repo, repo)
    set_serving_config(repo / "mlp_digits" / "1", {"max_batch_size": 16, "max_queue_delay_ms": 1.5})
    out = tmp_path / "triton"
    done = _run("export-triton", str(repo), str(out))
    assert done.returncode == 0, done.stderr
    assert "skipped embedding_digits_tokens_mc/1" in done.stderr  # that package carries no MC graph

    written = sorted(p.name for p in out.iterdir())
    assert written == ["embedding_digits_tokens", "mlp_diabetes", "mlp_diabetes_mc", "mlp_digits", "mlp_digits_mc"]
    rng = np.random.default_rng(0)
    for name in written:
        config = _parse(out / name / "config.pbtxt")
        assert config.name == name and config.platform == "onnxruntime_onnx"
        assert config.version_policy.WhichOneof("policy_choice") == "latest"
        model_path = out / name / "1" / "model.onnx"
        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])  # default options
        graph_inputs = {i.name: i for i in session.get_inputs()}
        graph_inputs.update({i.name: i for i in session.get_overridable_initializers()})
        assert {i.name for i in config.input} == set(graph_inputs)
        assert [o.name for o in config.output] == [o.name for o in session.get_outputs()]
        mc = name.endswith("_mc")
        if mc:
            assert config.max_batch_size == 0
            by_name = {i.name: i for i in config.input}
            for scalar in ("num_samples", "seed"):
                assert by_name[scalar].data_type == model_config_pb2.TYPE_INT64
                assert list(by_name[scalar].dims) == [1] and list(by_name[scalar].reshape.shape) == []
            assert by_name["seed"].optional and not by_name["num_samples"].optional
            assert {p: v.string_value for p, v in config.parameters.items()}["dropwise_flavour"] == "mc"
        else:
            expected_batch = 16 if name == "mlp_digits" else 64
            assert config.max_batch_size == expected_batch
        data_input = next(i for i in config.input if i.name not in ("num_samples", "seed"))
        dims = list(data_input.dims)[1:] if mc else list(data_input.dims)
        dtype = NP_TYPES[data_input.data_type]
        batch = 3
        x = (rng.integers(0, 10, size=(batch, *dims)) if dtype == np.int64 else rng.normal(size=(batch, *dims))).astype(
            dtype
        )
        feeds: dict[str, np.ndarray] = {data_input.name: x}
        if mc:
            feeds["num_samples"] = np.array(8, dtype=np.int64)
            seeded = dict(feeds, seed=np.array(11, dtype=np.int64))
            first = dict(zip([o.name for o in config.output], session.run(None, seeded), strict=True))
            again = dict(zip([o.name for o in config.output], session.run(None, seeded), strict=True))
            np.testing.assert_array_equal(first["std"], again["std"])
            assert int(first["seed_used"]) == 11
            assert first["samples"].shape[:2] == (8, batch)
            fresh = dict(zip([o.name for o in config.output], session.run(None, feeds), strict=True))
            assert int(fresh["seed_used"]) >= 0  # seed left out: the graph drew one
        else:
            (output,) = session.run(None, feeds)
            assert output.shape == (batch, *config.output[0].dims)  # declared dims are all fixed here
            assert np.isfinite(output).all()
    digits = _parse(out / "mlp_digits" / "config.pbtxt")
    assert digits.dynamic_batching.max_queue_delay_microseconds == 1500
    assert digits.output[0].label_filename == "labels.txt"
    labels = (out / "mlp_digits" / "labels.txt").read_text().split()
    assert len(labels) == digits.output[0].dims[0] == 10


def test_export_triton_refuses_with_one_line(onnx_repo: Path, tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("x")
    done = _run("export-triton", str(onnx_repo), str(busy))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "not an empty directory" in done.stderr
    done = _run("export-triton", str(tmp_path / "nothing"), str(tmp_path / "out"))
    assert done.returncode == 2 and "no model packages" in done.stderr
    assert not (tmp_path / "out").exists()
