"""dropwise.package: round trip, checksums, names, versions, factory allow-list, never unpickling."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from dropwise.models.data import load_dataset
from dropwise.models.zoo import ZOO, build
from dropwise.package import (
    MANIFEST,
    WEIGHTS,
    PackageError,
    add_file,
    list_models,
    load_package,
    package_path,
    resolve_factory,
    save_package,
    update_manifest,
    validate_name,
    validate_version,
    verify_package,
)
from safetensors import safe_open


def _save(repository: Path, name: str = "mlp_digits", version: int | None = None) -> tuple[Path, torch.nn.Module]:
    spec = ZOO[name]
    torch.manual_seed(0)
    model = build(name).eval()
    ds = load_dataset(spec.dataset)
    path = save_package(
        repository,
        name,
        model,
        task=spec.task,
        input_shape=ds.input_shape,
        input_dtype=ds.input_dtype,
        preprocessing=ds.preprocessing,
        labels=ds.labels,
        architecture={"factory": spec.factory, "kwargs": spec.kwargs},
        training={"epochs": 0},
        metrics={"test_accuracy": 0.5},
        target=ds.target,
        version=version,
    )
    return path, model


@pytest.mark.parametrize("name", ["mlp_digits", "cnn_mnist", "embedding_digits_tokens", "mlp_diabetes"])
def test_round_trip_gives_the_same_outputs(tmp_path: Path, name: str) -> None:
    path, model = _save(tmp_path, name)
    assert path == tmp_path / name / "1"
    assert sorted(os.listdir(path)) == [MANIFEST, WEIGHTS]
    loaded = load_package(tmp_path, name)
    assert not loaded.model.training
    x = load_dataset(ZOO[name].dataset).test[0][:5]
    assert torch.equal(loaded.model(x), model(x))
    m = loaded.manifest
    assert (m.name, m.version, m.task) == (name, 1, ZOO[name].task)
    assert m.input.shape[0] == -1 and m.input.shape[1:] == list(x.shape[1:])
    assert m.files[WEIGHTS] and m.versions["torch"] == torch.__version__
    assert m.architecture.factory == ZOO[name].factory
    assert (m.target is None) == (ZOO[name].task == "classification")


def test_quick_repository_holds_a_verified_package_per_network(quick_repository: Path) -> None:
    assert list_models(quick_repository) == sorted(ZOO)
    for name in ZOO:
        loaded = load_package(quick_repository, name)
        m = loaded.manifest
        assert m.training["quick"] is True and m.training["split"]["seed"] > 0
        assert m.metrics["epochs"] == 1
        x = load_dataset(ZOO[name].dataset).val[0][:2]
        assert torch.isfinite(loaded.model(x)).all()


def test_weights_are_safetensors_and_loading_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, model = _save(tmp_path)
    with safe_open(str(path / WEIGHTS), framework="pt") as fh:
        assert set(fh.keys()) == set(model.state_dict())

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load must not be called")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr("pickle.load", refuse)
    monkeypatch.setattr("pickle.loads", refuse)
    assert load_package(path).model is not None


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    path, _ = _save(tmp_path)
    data = bytearray((path / WEIGHTS).read_bytes())
    data[-1] ^= 0x01
    (path / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(PackageError, match="sha256 mismatch"):
        load_package(path)


def test_tampered_manifest_checksum_is_refused(tmp_path: Path) -> None:
    path, _ = _save(tmp_path)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"][WEIGHTS] = "0" * 64
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="sha256 mismatch"):
        load_package(path)


@pytest.mark.parametrize("kind", ["missing", "extra", "subdir", "symlink", "bad_json", "no_manifest"])
def test_incomplete_or_altered_packages_are_refused(tmp_path: Path, kind: str) -> None:
    path, _ = _save(tmp_path)
    if kind == "missing":
        (path / WEIGHTS).unlink()
        match = "missing file"
    elif kind == "extra":
        (path / "model.onnx").write_bytes(b"not listed")
        match = "not listed"
    elif kind == "subdir":
        (path / "nested").mkdir()
        match = "unexpected entry"
    elif kind == "symlink":
        (path / WEIGHTS).rename(tmp_path / "elsewhere")
        (path / WEIGHTS).symlink_to(tmp_path / "elsewhere")
        match = "unexpected entry"
    elif kind == "bad_json":
        (path / MANIFEST).write_text("{not json")
        match = "unreadable manifest"
    else:
        (path / MANIFEST).unlink()
        match = "manifest|no package"
    with pytest.raises(PackageError, match=match):
        load_package(path)


def test_manifest_that_lies_about_its_location_is_refused(tmp_path: Path) -> None:
    path, _ = _save(tmp_path)
    moved = tmp_path / "mlp_digits" / "7"
    path.rename(moved)
    with pytest.raises(PackageError, match="does not match its location"):
        load_package(moved)


def test_versions_latest_by_default_and_never_overwritten(tmp_path: Path) -> None:
    first, _ = _save(tmp_path)
    second, _ = _save(tmp_path)
    assert (first.name, second.name) == ("1", "2")
    assert load_package(tmp_path, "mlp_digits").manifest.version == 2
    assert load_package(tmp_path / "mlp_digits").manifest.version == 2
    assert load_package(tmp_path, "mlp_digits", version=1).manifest.version == 1
    assert load_package(tmp_path, "mlp_digits", version="1").manifest.version == 1
    with pytest.raises(PackageError, match="already exists"):
        _save(tmp_path, version=2)
    with pytest.raises(PackageError, match="no version 5"):
        load_package(tmp_path, "mlp_digits", version=5)
    with pytest.raises(PackageError, match="no package named"):
        package_path(tmp_path, "absent")


@pytest.mark.parametrize(
    "name", ["", "../etc", "a/b", "..", ".hidden", "-x", "x" * 65, "a b", "naïve", "a\\b", "name\n"]
)
def test_bad_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(PackageError, match="invalid model name"):
        validate_name(name)
    with pytest.raises(PackageError, match="invalid model name"):
        load_package(tmp_path, name)
    with pytest.raises(PackageError, match="invalid model name"):
        save_package(
            tmp_path, name, torch.nn.Linear(2, 2), task="regression", input_shape=[2], input_dtype="float32",
            architecture={"factory": "dropwise.models.zoo.mlp:dropout_mlp"},
        )  # fmt: skip
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("version", [0, -1, "01", "abc", "1.5", True, 1.0, "../1"])
def test_bad_versions_are_refused(version: object) -> None:
    with pytest.raises(PackageError, match="invalid version"):
        validate_version(version)  # type: ignore[arg-type]


def test_factory_allow_list(tmp_path: Path) -> None:
    assert resolve_factory("dropwise.models.zoo.mlp:dropout_mlp") is not None
    for ref in ("os:system", "subprocess:run", "modelsevil.x:y", "models_x.y:z"):
        with pytest.raises(PackageError, match="allow-list"):
            resolve_factory(ref)
    for ref in ("os.system", "dropwise.models.zoo.mlp:dropout_mlp()", "models/zoo:x", ":x"):
        with pytest.raises(PackageError, match="invalid factory"):
            resolve_factory(ref)
    with pytest.raises(PackageError, match="does not name a callable"):
        resolve_factory("dropwise.models.zoo.mlp:nothing_here")
    # opt-in for a user module
    assert resolve_factory("torch.nn:Identity", allow_modules=["torch.nn"]) is torch.nn.Identity
    path = save_package(
        tmp_path, "ident", torch.nn.Identity(), task="regression", input_shape=[3], input_dtype="float32",
        architecture={"factory": "torch.nn:Identity"},
    )  # fmt: skip
    with pytest.raises(PackageError, match="allow-list"):
        load_package(path)
    loaded = load_package(path, allow_modules=["torch.nn."])
    assert isinstance(loaded.model, torch.nn.Identity)


def test_manifest_factory_swapped_to_a_forbidden_module_is_refused(tmp_path: Path) -> None:
    path, _ = _save(tmp_path)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["architecture"]["factory"] = "os:system"
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="allow-list"):
        load_package(path)


def test_add_file_and_update_manifest(tmp_path: Path) -> None:
    path, _ = _save(tmp_path)
    digest = add_file(path, "parity.json", b'{"ok": true}')
    source = tmp_path / "graph.bin"
    source.write_bytes(b"\x08\x01")
    add_file(path, "model.onnx", source)
    manifest = verify_package(path)
    assert manifest.files["parity.json"] == digest and "model.onnx" in manifest.files
    updated = update_manifest(path, surgery=["fold"], metrics={"test_accuracy": 0.9})
    assert updated.surgery == ["fold"] and load_package(path).manifest.metrics == {"test_accuracy": 0.9}
    for bad in ("../x", "manifest.json", "a/b"):
        with pytest.raises(PackageError, match="invalid package file name"):
            add_file(path, bad, b"")
    with pytest.raises(PackageError, match="save_package only"):
        add_file(path, WEIGHTS, b"")
    with pytest.raises(PackageError, match="cannot update"):
        update_manifest(path, name="other")
    with pytest.raises(PackageError, match="invalid manifest update"):
        update_manifest(path, task="segmentation")
    (path / "parity.json").write_bytes(b"{}")
    with pytest.raises(PackageError, match="sha256 mismatch"):
        add_file(path, "extra.txt", b"x")


def test_weights_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    path, _ = _save(tmp_path)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["architecture"]["kwargs"]["hidden"] = [128, 128]
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="weights do not fit"):
        load_package(path)


def test_several_named_inputs_and_the_one_input_format(tmp_path: Path) -> None:
    from dropwise.package import InputSpec, Manifest

    inputs = [
        InputSpec(name="input_ids", shape=[-1, 8], dtype="int64", range=(0, 50)),
        InputSpec(name="attention_mask", shape=[-1, 8], dtype="int64", range=(0, 2)),
    ]
    path = save_package(
        tmp_path,
        "two",
        torch.nn.Identity(),
        task="classification",
        inputs=inputs,
        architecture={"factory": "dropwise.models.zoo.mlp:dropout_mlp"},
    )
    manifest = load_package(path, build=False).manifest
    assert [(i.name, i.range) for i in manifest.inputs] == [("input_ids", (0, 50)), ("attention_mask", (0, 2))]
    data = json.loads((path / "manifest.json").read_text())
    assert "input" not in data and [i["name"] for i in data["inputs"]] == ["input_ids", "attention_mask"]
    # a manifest written in the one-input format still reads, as a list of one
    old = {k: v for k, v in data.items() if k != "inputs"}
    old["input"] = {"name": "input", "shape": [-1, 4], "dtype": "float32", "preprocessing": ""}
    read = Manifest.model_validate(old)
    assert [i.name for i in read.inputs] == ["input"] and read.input.shape == [-1, 4]
    with pytest.raises(ValueError, match="unique"):
        Manifest.model_validate({**data, "inputs": [data["inputs"][0], data["inputs"][0]]})
    with pytest.raises(ValueError, match="input name"):
        InputSpec(name="../x", shape=[-1, 1], dtype="float32")
