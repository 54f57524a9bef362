"""dropwise.models.training: quick steps train, seeds reproduce, max-norm, DropBlock schedule, Cutout, early
stopping; and the ``dropwise train`` command."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dropwise.models.data import load_dataset
from dropwise.models.layers import DropBlock2d
from dropwise.models.training import CutoutConfig, TrainConfig, seed_everything, train_model
from dropwise.models.zoo import ZOO, build
from dropwise.package import load_package
from torch import Tensor, nn

from dropwise.zoo_training import train_zoo

NAMES = list(ZOO)


def _quick(name: str, **update: object) -> tuple[nn.Module, dict[str, float]]:
    spec = ZOO[name]
    config = spec.train.model_copy(update=update)
    seed_everything(config.seed)
    model = build(name)
    result = train_model(model, load_dataset(spec.dataset), config, quick=True, progress=False)
    return model, result.metrics


@pytest.mark.parametrize("name", NAMES)
def test_one_quick_step_trains_every_network(name: str) -> None:
    seed_everything(0)
    before = {k: v.clone() for k, v in build(name).state_dict().items()}
    model, metrics = _quick(name, seed=0)
    after = model.state_dict()
    changed = [k for k in before if before[k].dtype.is_floating_point and not torch.equal(before[k], after[k])]
    assert changed, "no parameter moved"
    assert not model.training
    assert metrics["epochs"] == 1 and metrics["seconds"] > 0
    keys = {"test_accuracy", "val_accuracy", "test_nll"} if ZOO[name].task == "classification" else {
        "test_rmse", "test_rmse_original_units", "test_nll", "noise_variance", "val_rmse"
    }  # fmt: skip
    assert keys <= set(metrics) and all(torch.isfinite(torch.tensor(metrics[k])) for k in keys)


def test_seeds_reproduce_and_differ() -> None:
    a, _ = _quick("mlp_digits", seed=11)
    b, _ = _quick("mlp_digits", seed=11)
    c, _ = _quick("mlp_digits", seed=12)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_max_norm_is_applied_after_each_step() -> None:
    model, _ = _quick("mlp_digits", max_norm=0.25, lr=0.05)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            assert float(m.weight.detach().norm(dim=1).max()) <= 0.25 + 1e-5
    free, _ = _quick("mlp_digits", max_norm=None, lr=0.05)
    norms = [float(m.weight.detach().norm(dim=1).max()) for m in free.modules() if isinstance(m, nn.Linear)]
    assert max(norms) > 0.25


def test_dropblock_schedule_is_stepped() -> None:
    model, _ = _quick("cnn_mnist")
    blocks = [m for m in model.modules() if isinstance(m, DropBlock2d)]
    assert blocks and all(b.drop_prob == pytest.approx(b.p) for b in blocks)  # ramp 0 -> p over the 3 steps
    model, _ = _quick("cnn_mnist", dropblock_schedule=False)
    assert all(b.drop_prob == b.p for b in model.modules() if isinstance(b, DropBlock2d))


class _Recorder(nn.Module):
    """A real CNN that keeps the batches it saw in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 28 * 28, 10))
        self.seen: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.seen.append(x.detach().clone())
        return self.net(x)


def test_cutout_augments_training_batches_only() -> None:
    dataset = load_dataset("mnist")
    config = TrainConfig(epochs=1, batch_size=16, cutout=CutoutConfig(size=10, p=1.0))
    model = _Recorder()
    seed_everything(0)
    train_model(model, dataset, config, quick=True, progress=False)
    assert len(model.seen) == 3
    for batch in model.seen:
        zero = (batch == 0).flatten(1)
        # every image has a zero patch of up to 10x10 (clipped at the border); normalised pixels are never 0
        assert bool((zero.sum(1) > 0).all()) and int(zero.sum(1).max()) <= 100
        assert not bool((dataset.train[0] == 0).any())
    plain = _Recorder()
    train_model(plain, dataset, config.model_copy(update={"cutout": None}), quick=True, progress=False)
    assert not any(bool((b == 0).any()) for b in plain.seen)


def test_early_stopping_restores_the_best_epoch() -> None:
    dataset = load_dataset("diabetes")
    torch.manual_seed(0)
    model = build("mlp_diabetes")
    # a step size below float32 resolution: the validation score can never improve after epoch 1
    config = TrainConfig(epochs=30, lr=1e-30, optimizer="sgd", patience=2, batch_size=64)
    result = train_model(model, dataset, config, progress=False)
    assert result.epochs == 3 and result.best_epoch == 1
    assert [h["epoch"] for h in result.history] == [1, 2, 3]


def test_regression_reports_mc_uncertainty() -> None:
    _, metrics = _quick("mlp_diabetes")
    assert metrics["noise_variance"] > 0 and metrics["test_mean_predictive_std"] > 0
    assert metrics["test_rmse_original_units"] == pytest.approx(
        metrics["test_rmse"] * load_dataset("diabetes").target["std"]
    )


def test_full_digits_mlp_reaches_its_bar(tmp_path: Path) -> None:
    """The one full training run in the suite: the digits MLP (about 10 CPU-seconds) reaches >= 97%."""
    (path,) = train_zoo(["mlp_digits"], tmp_path, progress=False)
    metrics = load_package(path).manifest.metrics
    assert metrics["test_accuracy"] >= 0.97


def test_train_zoo_refuses_unknown_names(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="unknown network"):
        train_zoo(["mlp_digits", "nope"], tmp_path, quick=True)
    assert not any(tmp_path.iterdir())


def test_train_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dropwise.cli import main

    code = main(
        [
            *("train", "mlp_diabetes", "--quick", "--no-progress", "--no-export"),
            *("--repository", str(tmp_path), "--seed", "3"),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "mlp_diabetes v1" in out and "RMSE" in out
    manifest = load_package(tmp_path, "mlp_diabetes").manifest
    assert manifest.training["seed"] == 3 and manifest.training["quick"] is True

    assert main(["train", "no_such_net", "--repository", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dropwise: error: unknown network no_such_net") and "\n" not in err


def test_train_command_exports_through_the_convert_pipeline(tmp_path: Path) -> None:
    import json

    from dropwise.cli import main

    args = ["train", "embedding_digits_tokens", "--quick", "--no-progress", "--repository", str(tmp_path)]
    assert main(args) == 0
    package = load_package(tmp_path, "embedding_digits_tokens")
    assert {"model.onnx", "model.mc.onnx", "parity.json"} <= set(package.manifest.files)
    assert json.loads((package.path / "parity.json").read_text())["passed"] is True


def test_train_command_reports_a_failed_parity_check_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bound no float32 export can meet makes parity fail: one line, exit 2, the package still written."""
    import json

    from dropwise.cli import main

    args = ["train", "mlp_digits", "--quick", "--no-progress", "--repository", str(tmp_path), "--tolerance", "1e-12"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dropwise: error: parity failed for mlp_digits: ") and "\n" not in err
    assert "Traceback" not in err
    package = load_package(tmp_path, "mlp_digits")
    report = json.loads((package.path / "parity.json").read_text())
    assert report["passed"] is False and report["failures"]
