"""One model-source resolver (dropwise.surgery.sources) for every command and the torch runtime.

Hugging Face directories are written by ``save_pretrained`` from tiny configs (no download); state_dict files
by ``torch.save``; every weights file is read without unpickling code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from dropwise.models.zoo import ZOO, build
from dropwise.models.zoo.mlp import dropout_mlp
from dropwise.package import PackageError, load_package, save_package
from dropwise.service.repository import spec_from_manifest
from dropwise.service.runtimes.base import MCGroup
from dropwise.service.runtimes.onnx_runtime import OnnxRuntime
from dropwise.service.runtimes.torch_runtime import TorchRuntime
from dropwise.surgery.convert import ConvertOptions, convert
from dropwise.surgery.sources import SourceError, parse_input_specs, resolve_source
from torch import nn

from dropwise.cli import main

transformers = pytest.importorskip("transformers")

NET = "mlp_classic_digits"
FAST = ConvertOptions(progress=False, samples=32, mc_batch=8, batch_sizes=(1, 5))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
        id2label={0: "neg", 1: "neutral", 2: "pos"},
        label2id={"neg": 0, "neutral": 1, "pos": 2},
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf") / "tiny-bert"
    transformers.BertForSequenceClassification(cfg).save_pretrained(str(path))
    return path


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------------------------- Hugging Face


def test_hf_directory_resolves_with_named_inputs_and_rebuilds_from_its_package(
    bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = resolve_source(str(bert_dir), input_shape="8")
    assert source.kind == "huggingface" and source.labels == ["neg", "neutral", "pos"]
    assert [(s.name, s.shape, s.dtype, s.range) for s in source.inputs] == [
        ("input_ids", [-1, 8], "int64", (0, 50)),
        ("attention_mask", [-1, 8], "int64", (0, 2)),
    ]
    code, out, err = _cli(["mc", str(bert_dir), "--input-shape", "8", "-o", str(tmp_path)], capsys)
    assert code == 0, err
    assert "attention_dropout" in out and "MC package (10 stochastic site(s))" in out
    manifest = json.loads((tmp_path / "tiny-bert" / "1" / "manifest.json").read_text())
    assert manifest["architecture"]["factory"] == "dropwise.models.hf:from_config"
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "attention_mask"]
    assert manifest["surgery"] == ["mc"]
    # the package rebuilds the same network (no transformers directory needed), and replays its MC surgery
    rebuilt = resolve_source(str(tmp_path / "tiny-bert" / "1"))
    x = source.example(batch=4)
    with torch.no_grad():
        assert torch.equal(rebuilt.base(*x), source.base(*x))
        assert not torch.equal(rebuilt.model(*x), rebuilt.model(*x))  # MC: attention dropout on


def test_hf_image_directory_and_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.2,
        num_labels=3,
    )
    vit = tmp_path / "vit"
    transformers.ViTForImageClassification(cfg).save_pretrained(str(vit))
    code, out, err = _cli(["inspect", str(vit), "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["kind"] == "huggingface" and data["inputs"][0]["shape"] == [-1, 3, 16, 16]
    assert {s["kind"] for s in data["sites"]} >= {"dropout", "attention_dropout"}
    # a directory holding pickle only is refused with the reason
    (vit / "model.safetensors").rename(vit / "pytorch_model.bin")
    code, _, err = _cli(["inspect", str(vit)], capsys)
    assert code == 2 and "pytorch_model.bin is pickle" in err and len(err.strip().splitlines()) == 1


def test_convert_hf_directory_exports_both_two_input_graphs(
    bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = convert(
        str(bert_dir),
        repository=tmp_path,
        input_shape="8",
        options=ConvertOptions(progress=False, samples=32, mc_batch=8, batch_sizes=(1, 5)),
    )
    assert result.report.passed, result.report.failures()
    assert result.report.options["inputs"].startswith("generated (input_ids int64 in [0, 50]")
    graph = onnx.load(str(result.package_dir / "model.onnx"))
    assert [i.name for i in graph.graph.input] == ["input_ids", "attention_mask"]
    mc = onnx.load(str(result.package_dir / "model.mc.onnx"))
    assert [i.name for i in mc.graph.input] == ["input_ids", "attention_mask", "num_samples", "seed"]
    assert result.report.mc is not None and result.report.mc.mean_std_onnx > 0  # hidden + attention dropout


class TwoInputNet(nn.Module):
    """Token ids and a mask in, logits out: masked mean of embeddings, dropout, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(20, 16)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.unsqueeze(-1).float()
        pooled = (self.embedding(ids) * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(self.dropout(pooled))


def two_input_net() -> nn.Module:
    return TwoInputNet()


def test_convert_two_named_inputs_writes_both_graphs_with_both_inputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file(two_input_net().state_dict(), str(weights))
    result = convert(
        f"{__name__}:two_input_net",
        weights=weights,
        allow_modules=[__name__],
        input_shape=["ids=6", "mask=6"],
        input_dtype="int64",
        repository=tmp_path / "repo",
        options=FAST,
    )
    assert result.report.passed, result.report.failures()
    manifest = load_package(result.package_dir, allow_modules=[__name__]).manifest
    assert [(i.name, i.dtype, i.range) for i in manifest.inputs] == [
        ("ids", "int64", (0, 20)),
        ("mask", "int64", (0, 20)),
    ]
    for filename, extra in (("model.onnx", []), ("model.mc.onnx", ["num_samples", "seed"])):
        graph = onnx.load(str(result.package_dir / filename))
        assert [i.name for i in graph.graph.input] == ["ids", "mask", *extra]
    assert result.report.mc is not None and result.report.mc.mean_std_onnx > 0
    # both runtimes serve the two named inputs; their deterministic answers agree, MC is seeded
    ids = np.random.default_rng(0).integers(0, 20, size=(4, 6), dtype=np.int64)
    mask = np.ones((4, 6), dtype=np.int64)
    mask[0, 3:] = 0
    spec = spec_from_manifest(manifest, result.package_dir)
    onnx_runtime = OnnxRuntime(spec, device="cpu")
    onnx_runtime.load()
    torch_runtime = TorchRuntime(spec, device="cpu")
    with pytest.raises(PackageError, match="allow-list"):  # the service trusts dropwise.models. only
        torch_runtime.load()
    deterministic = onnx_runtime.predict_deterministic((ids, mask))["probabilities"]
    with torch.no_grad():
        model = load_package(result.package_dir, allow_modules=[__name__]).model
        want = torch.softmax(model(torch.from_numpy(ids), torch.from_numpy(mask)), dim=-1).numpy()
    np.testing.assert_allclose(deterministic, want, atol=1e-5)
    group = [MCGroup(rows=4, num_samples=16, seed=5)]
    first, again = (onnx_runtime.predict_mc((ids, mask), group)[0] for _ in range(2))
    np.testing.assert_array_equal(first["probabilities"], again["probabilities"])
    assert first["std"].max() > 0


# --------------------------------------------------------------------------------------------- weights files


@pytest.fixture
def state_dict_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "w.pt"
    torch.save(build(NET).state_dict(), path)
    return path


def test_state_dict_file_with_a_factory(
    state_dict_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = ZOO[NET]
    args = ["fold", spec.factory, "--kwargs", json.dumps(spec.kwargs), "-w", str(state_dict_file)]
    code, _, err = _cli([*args, "--input-shape", "64", "-o", str(tmp_path / "repo")], capsys)
    assert code == 0, err
    written = load_package(tmp_path / "repo", spec.factory.split(":")[1])
    want = torch.load(state_dict_file, weights_only=True)
    assert all(torch.equal(written.model.state_dict()[k], v) for k, v in want.items())
    # the zoo name takes the same file
    assert resolve_source(NET, weights=state_dict_file).kind == "zoo"


def test_pickled_model_exported_program_and_links_are_refused(
    state_dict_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pickled = tmp_path / "model.pt"
    torch.save(build(NET), pickled)
    code, _, err = _cli(["inspect", NET, "-w", str(pickled)], capsys)
    assert code == 2 and "pickled objects" in err and len(err.strip().splitlines()) == 1
    code, _, err = _cli(["inspect", str(pickled)], capsys)
    assert code == 2 and "pickled objects" in err
    code, _, err = _cli(["inspect", str(state_dict_file)], capsys)
    assert code == 2 and "holds no network" in err
    program = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(nn.Linear(2, 2), (torch.randn(1, 2),)), str(program))
    code, _, err = _cli(["inspect", str(program)], capsys)
    assert code == 2 and "ExportedProgram" in err
    link = tmp_path / "link.pt"
    link.symlink_to(state_dict_file)
    with pytest.raises(SourceError, match="symbolic link"):
        resolve_source(NET, weights=link)


# --------------------------------------------------------------------------------------------- specs, trust


def test_input_specs_parse_named_and_unnamed() -> None:
    (one,) = parse_input_specs("1,28,28", None)
    assert (one.name, one.shape, one.dtype) == ("input", [-1, 1, 28, 28], "float32")
    two = parse_input_specs(["input_ids=32", "attention_mask=32"], "int64")
    assert [(s.name, s.shape, s.dtype) for s in two] == [
        ("input_ids", [-1, 32], "int64"),
        ("attention_mask", [-1, 32], "int64"),
    ]
    with pytest.raises(SourceError, match="name each one"):
        parse_input_specs(["32", "a=4"], None)
    with pytest.raises(SourceError, match="float32 or int64"):
        parse_input_specs("4", "float16")


def plain_mlp() -> nn.Module:
    """A factory outside dropwise.models (this test module): needs --allow-module."""
    return dropout_mlp(in_features=6, hidden=[8], out_features=3, p_input=0.0, p_hidden=0.2)


def test_one_trust_rule_for_every_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reference = f"{__name__}:plain_mlp"
    for command in (["inspect"], ["fold", "-o", str(tmp_path)], ["mc", "-o", str(tmp_path)]):
        code, _, err = _cli([command[0], reference, *command[1:], "--input-shape", "6"], capsys)
        assert code == 2 and "--allow-module" in err, (command, err)
    code, out, err = _cli(["inspect", reference, "--input-shape", "6", "--allow-module", __name__], capsys)
    assert code == 0 and "1 site(s)" in out, err
    # a package whose architecture names that module is refused the same way when read back
    package = save_package(
        tmp_path,
        "outside",
        plain_mlp(),
        task="classification",
        input_shape=[6],
        input_dtype="float32",
        architecture={"factory": reference},
    )
    with pytest.raises(PackageError, match="allow-list"):
        resolve_source(str(package))
    assert resolve_source(str(package), allow_modules=[__name__]).kind == "package"


def test_factory_with_input_shape_converts_on_generated_inputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "w.pt"
    kwargs = {"in_features": 6, "hidden": [16], "out_features": 3, "p_input": 0.0, "p_hidden": 0.3}
    torch.save(dropout_mlp(**kwargs).state_dict(), weights)
    result = convert(
        "dropwise.models.zoo.mlp:dropout_mlp",
        weights=weights,
        factory_kwargs=json.dumps(kwargs),
        input_shape="6",
        repository=tmp_path / "repo",
        options=FAST,
    )
    assert result.report.passed, result.report.failures()
    assert result.report.options["inputs"] == "generated (input standard normal)"
    assert result.report.mc is not None and result.report.mc.mean_std_onnx > 0


# --------------------------------------------------------------------------------------------- runtime


def test_torch_runtime_replays_a_recorded_head_dropout(tmp_path: Path) -> None:
    """`dropwise mc --add-dropout-before-head` packages are sampled with their head dropout."""
    torch.manual_seed(0)
    kwargs = {"in_features": 6, "hidden": [16], "out_features": 3, "p_input": 0.0, "p_hidden": 0.0}
    package = save_package(
        tmp_path,
        "headless",
        dropout_mlp(**kwargs),
        task="classification",
        input_shape=[6],
        input_dtype="float32",
        architecture={"factory": "dropwise.models.zoo.mlp:dropout_mlp", "kwargs": kwargs},
        surgery=["mc:head_dropout=0.3"],
    )
    loaded = load_package(package, build=False)
    runtime = TorchRuntime(spec_from_manifest(loaded.manifest, loaded.path), device="cpu")
    with pytest.warns(UserWarning, match="inserted Dropout"):
        runtime.load()
    assert runtime.supports_mc
    x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    (out,) = runtime.predict_mc(x, [MCGroup(rows=3, num_samples=16, seed=7)])
    assert out["std"].max() > 0 and out["mutual_information"].max() > 0
    (again,) = runtime.predict_mc(x, [MCGroup(rows=3, num_samples=16, seed=7)])
    np.testing.assert_array_equal(out["probabilities"], again["probabilities"])
    # deterministic predictions are the source network's eval output (the head dropout is off in eval)
    with torch.no_grad():
        want = torch.softmax(load_package(package).model(torch.from_numpy(x)), dim=-1).numpy()
    np.testing.assert_allclose(runtime.predict_deterministic(x)["probabilities"], want, atol=1e-6)
