"""The convert pipeline and `dropwise convert` on every zoo network: real exports, real ONNX Runtime sessions.

Every zoo network of the session's `quick_repository` is converted exactly once (session fixture `converted`):
both ONNX flavours are exported and parity is verified. Further tests reuse those packages.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from dropwise.models.zoo import ZOO
from dropwise.package import PackageError, load_package
from dropwise.surgery.convert import (
    DETERMINISTIC_FILE,
    MC_FILE,
    ConvertOptions,
    convert,
    convert_package,
    default_fold,
)
from dropwise.surgery.export import random_nodes
from dropwise.surgery.parity import PARITY_FILE, ParityReport, bonferroni_threshold, compare, z_test
from dropwise.surgery.sources import SourceError
from safetensors.torch import save_file
from torch import nn

from dropwise.cli import main

# Each zoo network is exported twice (deterministic + MC) once per session: about 130 CPU-seconds in all. The
# generous timeout only absorbs a machine shared with other jobs; it is not a performance bound.
pytestmark = pytest.mark.timeout(1200)

FAST = ConvertOptions(progress=False, samples=32, mc_batch=8, batch_sizes=(1, 5, 32))


class _Converted(dict):
    """name -> (package dir, report); a network whose conversion raised fails its own tests only."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: dict[str, BaseException] = {}
        self.repository = Path()

    def __getitem__(self, name: str) -> tuple[Path, ParityReport]:
        if name in self.errors:
            raise AssertionError(f"converting {name} failed") from self.errors[name]
        return super().__getitem__(name)


@pytest.fixture(scope="session")
def converted(quick_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> _Converted:
    """Every zoo network converted once, in a private copy of the quick repository."""
    out = _Converted()
    out.repository = tmp_path_factory.mktemp("convert") / "repo"
    shutil.copytree(quick_repository, out.repository)
    for name in ZOO:
        package_dir = load_package(out.repository, name, build=False).path
        try:
            out[name] = (package_dir, convert_package(package_dir, FAST))
        except Exception as exc:  # recorded, re-raised by the tests of that network
            out.errors[name] = exc
    return out


@pytest.fixture(scope="session")
def repository_of(converted: _Converted) -> Path:
    return converted.repository


# --------------------------------------------------------------------------------------------- zoo


@pytest.mark.parametrize("name", ZOO)
def test_zoo_network_converts_with_parity(name: str, converted: _Converted) -> None:
    package_dir, report = converted[name]
    assert report.passed, report.failures()
    assert [c.name for c in report.deterministic] == [
        "torch eval vs folded",
        "folded vs onnx",
        "torch eval vs onnx",
    ]
    assert all(c.relative <= 1e-5 and c.batch_sizes == (1, 5, 32) for c in report.deterministic)
    assert report.mc is not None and report.mc.z_test.z_max <= report.mc.z_test.threshold
    assert report.mc.std_within_run > 0 and report.mc.runs_differ and report.mc.sessions_differ
    assert report.mc.spread_ok
    assert report.providers["provider"] == "CPUExecutionProvider"
    steps = ["fold", "export model.onnx", "deterministic parity", "export model.mc.onnx", "MC parity", "write package"]
    assert list(report.seconds) == steps and list(report.cpu_seconds) == steps
    assert report.cpu_seconds["export model.mc.onnx"] > 0

    loaded = load_package(package_dir, build=False)  # verifies every sha256
    assert {DETERMINISTIC_FILE, MC_FILE, PARITY_FILE} <= set(loaded.manifest.files)
    on_disk = json.loads((package_dir / PARITY_FILE).read_text())
    assert on_disk["passed"] is True and on_disk["failures"] == []
    assert on_disk["deterministic"][2]["max_abs"] == pytest.approx(report.deterministic[2].max_abs)
    export = loaded.manifest.model_extra["export"]
    assert export["parity"]["passed"] is True and export[DETERMINISTIC_FILE]["folded"] is True


@pytest.mark.parametrize("name", list(ZOO))
def test_deterministic_graph_is_clean_with_dynamic_batch(name: str, converted: _Converted) -> None:
    package_dir, _ = converted[name]
    proto = onnx.load(str(package_dir / DETERMINISTIC_FILE))
    assert random_nodes(proto) == []
    first = proto.graph.input[0]
    assert first.type.tensor_type.shape.dim[0].dim_param, "batch dimension must be symbolic"
    expected = onnx.TensorProto.INT64 if name == "embedding_digits_tokens" else onnx.TensorProto.FLOAT
    assert first.type.tensor_type.elem_type == expected
    onnx.checker.check_model(proto, full_check=True)


def test_tampered_package_is_refused(converted: _Converted, tmp_path: Path) -> None:
    package_dir, _ = converted["mlp_digits"]
    copy_dir = tmp_path / "repo" / "mlp_digits" / "1"
    shutil.copytree(package_dir, copy_dir)
    data = bytearray((copy_dir / DETERMINISTIC_FILE).read_bytes())
    data[-1] ^= 0xFF
    (copy_dir / DETERMINISTIC_FILE).write_bytes(bytes(data))
    with pytest.raises(PackageError, match="sha256 mismatch"):
        convert_package(copy_dir, FAST)
    code, err = _cli(["convert", str(copy_dir), "--no-progress"])
    assert code == 2 and "sha256 mismatch" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------- wrong models


def _perturbed_fold(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """A real fold followed by a small weight change: the kind of bug parity must catch."""
    folded = copy.deepcopy(default_fold(model, example))
    with torch.no_grad():
        last = [m for m in folded.modules() if isinstance(m, nn.Linear)][-1]
        last.bias.add_(1e-3)
    return folded


def test_parity_fails_on_a_perturbed_fold(converted: _Converted, tmp_path: Path) -> None:
    source, _ = converted["mlp_diabetes"]
    package_dir = tmp_path / "repo" / "mlp_diabetes" / "1"
    shutil.copytree(source, package_dir)
    report = convert_package(package_dir, ConvertOptions(progress=False, mc=False), fold_fn=_perturbed_fold)
    assert not report.passed
    by_name = {c.name: c for c in report.deterministic}
    assert not by_name["torch eval vs folded"].passed and not by_name["torch eval vs onnx"].passed
    assert by_name["folded vs onnx"].passed  # the export itself is faithful to the (wrong) folded model
    assert by_name["torch eval vs folded"].max_abs == pytest.approx(1e-3, rel=1e-3)
    written = json.loads((package_dir / PARITY_FILE).read_text())
    assert written["passed"] is False and "torch eval vs folded" in written["failures"][0]
    assert load_package(package_dir, build=False).manifest.model_extra["export"]["parity"]["passed"] is False


class SkewedExportMLP(nn.Module):
    """Adds 1e-3 to its output only while being exported to ONNX: torch eval and ONNX disagree."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if torch.onnx.is_in_onnx_export():
            y = y + 1e-3
        return y


def skewed_export_mlp() -> nn.Module:
    """Factory used through `dropwise convert test_convert:skewed_export_mlp --allow-module test_convert`."""
    return SkewedExportMLP()


def test_cli_exits_nonzero_when_parity_fails(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "skewed.safetensors"
    save_file({k: v.contiguous() for k, v in skewed_export_mlp().state_dict().items()}, str(weights))
    args = ["convert", f"{__name__}:skewed_export_mlp", "--weights", str(weights), "--dataset", "diabetes"]
    args += ["--repository", str(tmp_path / "repo"), "--no-mc", "--no-progress"]
    code, err = _cli(args)  # a module outside models. is refused without the explicit opt-in
    assert code == 2 and "--allow-module" in err and len(err.strip().splitlines()) == 1
    code, err = _cli([*args, "--allow-module", __name__])
    assert code == 2, err
    assert err.startswith("dropwise: error: parity failed for skewed_export_mlp v1: folded vs onnx")
    assert "parity.json" in err
    assert len(err.strip().splitlines()) == 1
    report = json.loads((tmp_path / "repo" / "skewed_export_mlp" / "1" / PARITY_FILE).read_text())
    assert report["passed"] is False
    assert report["deterministic"][1]["max_abs"] == pytest.approx(1e-3, rel=1e-3)


# --------------------------------------------------------------------------------------------- CLI


def _cli(args: list[str], capsys: pytest.CaptureFixture[str] | None = None) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(args)
    return code, err.getvalue()


def test_cli_converts_zoo_weights_into_a_new_package(converted: _Converted, tmp_path: Path) -> None:
    source, _ = converted["mlp_diabetes"]
    repo = tmp_path / "out"
    code, err = _cli(
        [
            *("convert", "mlp_diabetes", "--weights", str(source / "weights.safetensors")),
            *("--repository", str(repo), "--samples", "32", "--no-progress"),
        ]
    )
    assert code == 0, err
    loaded = load_package(repo, "mlp_diabetes")
    assert {DETERMINISTIC_FILE, MC_FILE, PARITY_FILE, "weights.safetensors"} == set(loaded.manifest.files)
    assert loaded.manifest.training["dataset"] == "diabetes" and loaded.manifest.target is not None
    report = json.loads((loaded.path / PARITY_FILE).read_text())
    assert (
        report["passed"] and report["mc"]["samples"] == 32 and report["options"]["inputs"] == "test split of diabetes"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no_such_network"], "is not a package or Hugging Face directory"),
        (["mlp_digits", "--weights", "missing.safetensors"], "weights file not found"),
        (["dropwise.models.zoo.mlp:dropout_mlp"], "needs --weights"),
        (
            ["dropwise.models.zoo.mlp:dropout_mlp", "--weights", "w.safetensors", "--kwargs", "[1]"],
            "JSON object",
        ),
        (["os:system", "--weights", "w.safetensors", "--dataset", "digits"], "not in the allow-list"),
        (["mlp_digits", "--name", "../evil"], "invalid model name"),
        (["mlp_digits", "--samples", "1"], "at least 2"),
        (["mlp_digits", "--device", "cuda"], "device 'cuda'"),
    ],
)
def test_cli_errors_are_one_line(
    args: list[str], message: str, repository_of: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if "--device" in args and _cuda_available():
        pytest.skip("this case checks the error for --device cuda without CUDA; CUDA is usable on this machine")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.safetensors").write_bytes(b"")
    code, err = _cli(["convert", *args, "--repository", str(repository_of), "--no-progress"])
    assert code == 2, err
    assert message in err and err.startswith("dropwise: error: ") and len(err.strip().splitlines()) == 1


def _cuda_available() -> bool:
    from dropwise.surgery.providers import cuda_usable

    return cuda_usable()[0]


def test_zoo_name_without_weights_and_without_package_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="dropwise train mlp_digits"):
        convert("mlp_digits", repository=tmp_path / "empty", options=FAST)


# --------------------------------------------------------------------------------------------- BatchNorm


def test_recalibrate_bn_writes_a_new_version(converted: _Converted, tmp_path: Path) -> None:
    source, _ = converted["cnn_mnist"]
    repo = tmp_path / "repo"
    shutil.copytree(source, repo / "cnn_mnist" / "1")
    result = convert(
        str(repo / "cnn_mnist" / "1"), options=ConvertOptions(progress=False, mc=False, recalibrate_bn=True)
    )
    assert result.package_dir == repo / "cnn_mnist" / "2" and result.report.passed
    old = load_package(repo, "cnn_mnist", 1)
    new = load_package(repo, "cnn_mnist", 2)
    assert new.manifest.surgery[-1] == "recalibrate_bn"
    assert new.manifest.training["converted_from"] == "cnn_mnist/1"
    old_bn = [m for m in old.model.modules() if isinstance(m, nn.BatchNorm2d)]
    new_bn = [m for m in new.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert old_bn and not torch.equal(old_bn[0].running_var, new_bn[0].running_var)


# --------------------------------------------------------------------------------------------- statistics


def test_z_test_accepts_same_distribution_and_rejects_a_shift() -> None:
    rng = np.random.default_rng(0)
    t, shape = 64, (32, 10)
    a = rng.beta(2, 5, size=(t, *shape))
    b = rng.beta(2, 5, size=(t, *shape))
    same = z_test("mean", a.mean(0), a.std(0), t, b.mean(0), b.std(0), t)
    assert same.passed and same.n_tests == 320
    shifted = b + 0.1
    moved = z_test("mean", a.mean(0), a.std(0), t, shifted.mean(0), shifted.std(0), t)
    assert not moved.passed and moved.z_max > moved.threshold
    assert bonferroni_threshold(1, 0.05) == pytest.approx(1.959964, abs=1e-5)
    nan = z_test("mean", a.mean(0), a.std(0), t, np.full(shape, np.nan), b.std(0), t)
    assert not nan.passed


def test_compare_uses_the_output_scale() -> None:
    ref = [np.array([[100.0, -50.0]])]
    assert compare("big", ref, [ref[0] + 5e-4], 1e-5).passed  # 5e-4 / 100 = 5e-6
    assert not compare("big", ref, [ref[0] + 2e-3], 1e-5).passed
    small = [np.array([[1e-3]])]
    assert not compare("small", small, [small[0] + 2e-5], 1e-5).passed  # scale floor 1: absolute 1e-5
    assert not compare("nan", small, [np.array([[np.nan]])], 1e-5).passed


def test_head_dropout_recorded_by_dropwise_mc_is_exported(tmp_path: Path) -> None:
    from dropwise.models.zoo.mlp import dropout_mlp
    from dropwise.package import save_package

    kwargs = {"in_features": 64, "hidden": [32], "out_features": 10, "p_input": 0.0, "p_hidden": 0.0}
    torch.manual_seed(0)
    package_dir = save_package(
        tmp_path / "repo",
        "plain_mlp",
        dropout_mlp(**kwargs),
        task="classification",
        input_shape=(64,),
        input_dtype="float32",
        architecture={"factory": "dropwise.models.zoo.mlp:dropout_mlp", "kwargs": kwargs},
        surgery=["mc:head_dropout=0.3"],
        training={"dataset": "digits"},
    )
    with pytest.warns(UserWarning, match="inserted Dropout"):
        report = convert_package(package_dir, FAST)
    assert report.passed, report.failures()
    assert report.mc is not None and report.mc.mean_std_onnx > 0 and report.mc.runs_differ


def test_spread_guard_flags_a_degenerate_mc_graph() -> None:
    from dropwise.surgery.parity import spread_matches

    torch_std = np.full((8, 10), 0.04)
    assert spread_matches(torch_std, torch_std * 1.3)
    assert not spread_matches(torch_std, np.full((8, 10), 1e-8))  # samples barely vary: masks not redrawn
    assert not spread_matches(torch_std, torch_std * 5)  # drop probability far too high
    assert spread_matches(np.zeros((2, 3)), np.zeros((2, 3)))
    assert not spread_matches(torch_std, np.full((8, 10), np.nan))
