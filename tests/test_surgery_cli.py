"""dropwise inspect | fold | mc on a package, a zoo name and a module:factory reference with safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dropwise.models.zoo import ZOO, build
from dropwise.models.zoo.mlp import dropout_mlp
from dropwise.package import load_package, save_package
from dropwise.surgery.sources import apply_surgery, resolve_source
from safetensors.torch import save_file

from dropwise.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


NET = "mlp_classic_digits"  # classic dropout: a fold that forgot q would change the outputs


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "w.safetensors"
    save_file(build(NET).state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory, weights: Path) -> Path:
    from safetensors.torch import load_file

    model = build(NET)
    model.load_state_dict(load_file(str(weights)))
    spec = ZOO[NET]
    return save_package(
        tmp_path_factory.mktemp("repo"),
        NET,
        model.eval(),
        task="classification",
        input_shape=[64],
        input_dtype="float32",
        architecture={"factory": spec.factory, "kwargs": spec.kwargs},
    )


def test_inspect_table_and_json(package: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(package)]) == 0
    out = capsys.readouterr().out
    assert "3 site(s)" in out and "classic_dropout" in out and "scale" in out
    assert main(["inspect", "cnn_mnist", "--json"]) == 0  # zoo name without weights is fine for inspect
    data = json.loads(capsys.readouterr().out)
    recipe = ZOO["cnn_mnist"].kwargs  # the sites inspect must report are the recipe's rates
    assert [(s["kind"], s["p"]) for s in data["sites"]] == [
        ("drop_block", recipe["p_block"]),
        ("dropout2d", recipe["p_spatial"]),
        ("dropout", recipe["p_head"]),
    ]


def test_fold_writes_a_package_that_replays_to_the_folded_model(
    package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fold", str(package), "--output", str(tmp_path)]) == 0
    assert "folded package" in capsys.readouterr().out
    written = tmp_path / NET / "1"
    manifest = json.loads((written / "manifest.json").read_text())
    assert manifest["surgery"] == ["fold"] and manifest["sites"] == []
    resolved = resolve_source(str(written))
    assert resolved.surgery == ["fold"]
    x = torch.randn(5, 64)
    source = load_package(package).model
    with torch.no_grad():
        want = source(x)
        got = resolved.model(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert not any(type(m).__name__ == "Scale" for m in resolved.model.modules())  # no multiply kept
    # a reader that ignores `surgery` gets the source network, whose eval output is the same
    with torch.no_grad():
        assert torch.allclose(load_package(written).model(x), want)
    assert main(["inspect", str(written)]) == 0
    assert "0 site(s), surgery ['fold']" in capsys.readouterr().out


def test_mc_from_factory_reference(weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = ZOO[NET]
    args = ["mc", spec.factory, "--kwargs", json.dumps(spec.kwargs), "--weights", str(weights)]
    assert main([*args, "--input-shape", "64", "-o", str(tmp_path), "--package-name", "m"]) == 0
    assert "3 stochastic site(s)" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "m" / "1" / "manifest.json").read_text())
    assert manifest["surgery"] == ["mc"] and len(manifest["sites"]) == 3
    base = load_package(tmp_path / "m" / "1").model
    mc = apply_surgery(base, ["mc"])
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert not torch.equal(mc(x), mc(x))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "no_such_net"], "is not a package or Hugging Face directory"),
        (["fold", "cnn_mnist", "-o", "OUT"], "needs --weights"),
        (
            ["fold", "dropwise.models.zoo.mlp:dropout_mlp", "-w", "x.pt", "-o", "OUT"],
            "weights file not found",
        ),
        (["mc", "os:getcwd", "-w", "W", "-o", "OUT"], "--allow-module"),
        (["mc", "os:getcwd", "-w", "W", "-o", "OUT", "--allow-module", "os"], "not an nn.Module"),
        (["inspect", "W"], "a weights file holds no network"),
        (["inspect", "cnn_mnist", "--input-shape", "a,b"], "--input-shape"),
    ],
)
def test_errors_are_one_line(
    argv: list[str], message: str, tmp_path: Path, weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(tmp_path) if a == "OUT" else str(weights) if a == "W" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dropwise: error:") and message in err and "\n" not in err


def test_mc_without_site_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    kwargs = {"in_features": 4, "hidden": [8], "out_features": 2, "p_input": 0.0, "p_hidden": 0.0}
    factory = ZOO[NET].factory
    path = tmp_path / "w.safetensors"
    save_file(dropout_mlp(**kwargs).state_dict(), str(path))
    argv = [
        "mc",
        factory,
        "--kwargs",
        json.dumps(kwargs),
        "-w",
        str(path),
        "--input-shape",
        "4",
        "-o",
        str(tmp_path),
    ]
    assert main(argv) == 2
    assert "no stochastic site" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="fine-tune"):
        assert main([*argv, "--add-dropout-before-head", "0.2"]) == 0
    manifest = json.loads((tmp_path / "dropout_mlp" / "1" / "manifest.json").read_text())
    assert manifest["surgery"] == ["mc:head_dropout=0.2"]
